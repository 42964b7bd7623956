"""Bad input: a clear message, a distinct exit code, and nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import git

pytestmark = pytest.mark.docker

SCRIPT = "turns:\n  - text: done\n"


def assert_nothing_created(state_dir: Path, repo: Path | None) -> None:
    assert not state_dir.exists() or not any(state_dir.iterdir()), list(state_dir.iterdir())
    if repo is not None:
        assert git(repo, "branch", "--list", "sandbox/*") == ""


def test_not_a_git_repository(tmp_path, state_dir, sandbox, write_script) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    res = sandbox("run", "--repo", str(plain), "--task", "t", "--model-script", str(write_script(SCRIPT)))
    assert res.code == 2
    assert f"not a git repository: {plain}" in res.stderr
    assert_nothing_created(state_dir, None)


def test_missing_repo_path(tmp_path, state_dir, sandbox, write_script) -> None:
    res = sandbox("run", "--repo", str(tmp_path / "nope"), "--task", "t", "--model-script", str(write_script(SCRIPT)))
    assert res.code == 2 and "does not exist" in res.stderr
    assert_nothing_created(state_dir, None)


def test_missing_task(make_repo, state_dir, sandbox, write_script) -> None:
    repo = make_repo()
    res = sandbox("run", "--repo", str(repo), "--model-script", str(write_script(SCRIPT)))
    assert res.code == 2 and "a task is required" in res.stderr
    res = sandbox("run", "--repo", str(repo), "--task", "   ", "--model-script", str(write_script(SCRIPT)))
    assert res.code == 2 and "a task is required" in res.stderr
    assert_nothing_created(state_dir, repo)


def test_unknown_policy(make_repo, state_dir, sandbox, write_script) -> None:
    repo = make_repo()
    res = sandbox(
        "run", "--repo", str(repo), "--task", "t", "--policy", "nonesuch", "--model-script", str(write_script(SCRIPT))
    )
    assert res.code == 2
    assert "unknown policy 'nonesuch'" in res.stderr and "presets: default" in res.stderr
    assert_nothing_created(state_dir, repo)


def test_policy_file_with_unknown_key(make_repo, state_dir, sandbox, write_script, tmp_path) -> None:
    repo = make_repo()
    pol = tmp_path / "p.yaml"
    pol.write_text("limits:\n  wall_seconds: 60\n  budget: 3\n")
    res = sandbox(
        "run", "--repo", str(repo), "--task", "t", "--policy", str(pol), "--model-script", str(write_script(SCRIPT))
    )
    assert res.code == 2 and "limits.budget: unknown key" in res.stderr
    assert_nothing_created(state_dir, repo)


def test_missing_api_key_without_script(make_repo, state_dir, sandbox) -> None:
    repo = make_repo()
    res = sandbox("run", "--repo", str(repo), "--task", "t", drop=("ANTHROPIC_API_KEY",))
    assert res.code == 2
    assert "no model API key: set ANTHROPIC_API_KEY" in res.stderr and "--model-script" in res.stderr
    assert_nothing_created(state_dir, repo)


def test_malformed_script_names_the_entry(make_repo, state_dir, sandbox, write_script) -> None:
    repo = make_repo()
    bad = write_script("turns:\n  - bash: ls\n  - bash: ls\n    write: {path: a, content: b}\n")
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(bad))
    assert res.code == 2 and "turns[1] (entry 2): needs exactly one of" in res.stderr
    assert_nothing_created(state_dir, repo)


def test_unknown_base_ref(make_repo, state_dir, sandbox, write_script) -> None:
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--base",
        "no-such-branch",
        "--model-script",
        str(write_script(SCRIPT)),
    )
    assert res.code == 2 and "'no-such-branch' does not name a commit" in res.stderr
    assert_nothing_created(state_dir, repo)


def test_docker_not_reachable(make_repo, state_dir, sandbox, write_script, tmp_path) -> None:
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script(SCRIPT)),
        env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"},
    )
    assert res.code == 3
    assert "Docker is not reachable" in res.stderr and "ensure-docker" in res.stderr
    assert_nothing_created(state_dir, repo)


@pytest.mark.usefixtures("docker_ready")
def test_images_not_built(make_repo, state_dir, sandbox, write_script) -> None:
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script(SCRIPT)),
        env={"SANDBOX_IMAGE_NAMESPACE": "agent-sandbox-test-never-built"},
    )
    assert res.code == 3
    assert "agent-sandbox-test-never-built/base:bookworm is not built" in res.stderr
    assert "sandbox images build" in res.stderr
    assert_nothing_created(state_dir, repo)
