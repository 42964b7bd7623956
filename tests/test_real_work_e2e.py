"""Real work out of the box: a Python or Node repository, the dependency-update preset, real packages from
the real registries through the real egress proxy, and generated files kept off the branch."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from . import registries
from .conftest import audit_events, git, labelled, tool_results

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

PINNED_PY = ("six", "1.16.0")
PINNED_NPM = ("semver", "7.5.0")
TEST_PY = (
    "import six\n\n\ndef test_installed_version_is_the_pinned_one():\n"
    "    assert f'six=={six.__version__}' in open('requirements.txt').read().split()\n"
)
TEST_JS = (
    "const pinned = require('./package.json').dependencies.semver;\n"
    "const installed = require('semver/package.json').version;\n"
    "if (installed !== pinned) { console.error(`installed ${installed}, pinned ${pinned}`); process.exit(1); }\n"
    "console.log(`semver ${installed} ok`);\n"
)
PACKAGE_JSON = (
    json.dumps(
        {
            "name": "web",
            "version": "1.0.0",
            "private": True,
            "scripts": {"test": "node test.js"},
            "dependencies": {PINNED_NPM[0]: PINNED_NPM[1]},
        },
        indent=2,
    )
    + "\n"
)
# The operator's check: a fresh environment from what the branch pins, then the repository's own tests.
CHECK = (
    "set -e\n"
    "if [ -f requirements.txt ]; then python3 -m venv --system-site-packages /tmp/v; "
    "/tmp/v/bin/pip install -q -r requirements.txt; /tmp/v/bin/python -m pytest -q; fi\n"
    "if [ -f package.json ]; then npm ci --no-progress; npm test; fi\n"
)


def python_files() -> dict[str, str]:
    return {"requirements.in": "six\n", "requirements.txt": f"{PINNED_PY[0]}=={PINNED_PY[1]}\n", "test_six.py": TEST_PY}


def node_files() -> dict[str, str]:
    return {"package.json": PACKAGE_JSON, "test.js": TEST_JS}


def generated_paths(repo: Path, branch: str) -> list[str]:
    files = git(repo, "ls-tree", "-r", "--name-only", branch).splitlines()
    bad = ("__pycache__/", ".pyc", ".pytest_cache/", "node_modules/", ".venv/")
    return [f for f in files if any(b in f for b in bad)]


def test_pytest_in_a_repo_without_gitignore_leaves_no_generated_files(make_repo, sandbox, write_script) -> None:
    repo = make_repo(
        files={
            "calc.py": "def add(a, b):\n    return a - b\n",
            "test_calc.py": "from calc import add\n\n\ndef test_add():\n    assert add(2, 2) == 4\n",
        }
    )
    script = write_script(
        "turns:\n"
        "  - bash: python3 -m pytest -q; echo rc=$?\n"
        '  - edit: {path: calc.py, old: "a - b", new: "a + b"}\n'
        "  - bash: python3 -m pytest -q && python3 -m py_compile calc.py && mkdir -p node_modules/x .venv/bin"
        " && echo 'module.exports = 1' > node_modules/x/index.js && touch .venv/bin/python && git status --short\n"
        "  - text: Fixed add().\n"
    )
    res = sandbox(
        "run", "--repo", str(repo), "--task", "Fix add() so the tests pass.", "--model-script", str(script), "--json"
    )
    assert res.code == 0, res.stderr
    s = res.json()
    out = tool_results(s["run_dir"])
    assert "1 failed" in out[0] and "rc=1" in out[0], out[0]
    assert "1 passed" in out[-1], out[-1]
    # The agent's own `git status` shows its change and none of the generated files.
    assert out[-1].strip().splitlines()[-1].split() == ["M", "calc.py"], out[-1]
    assert s["files_changed"] == ["calc.py"] and s["violations"] == []
    assert generated_paths(repo, s["branch"]) == []
    assert git(repo, "show", f"{s['branch']}:calc.py").endswith("a + b")


def test_a_violated_git_rule_says_what_to_do(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    script = write_script("turns:\n  - bash: head -c 2048 /dev/urandom > blob.bin\n  - text: done\n")
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script))
    assert res.code == 15, res.stderr
    assert "blob.bin is binary" in res.stdout
    assert ".gitignore" in res.stdout and "git.allow_binary: true" in res.stdout


def test_dependency_update_bumps_python_and_npm_through_the_proxy(make_repo, sandbox, write_script, tmp_path) -> None:
    repo = make_repo("service", files={**python_files(), **node_files()})
    policy = registries.dependency_update_policy(tmp_path / "policy.yaml")
    script = write_script(
        "turns:\n"
        "  - bash: python3 -m venv --system-site-packages /tmp/venv && /tmp/venv/bin/pip install -q --upgrade six"
        " && v=$(/tmp/venv/bin/python -c 'import six; print(six.__version__)')"
        ' && sed -i "s/^six==.*/six==$v/" requirements.txt && cat requirements.txt\n'
        "    timeout_ms: 300000\n"
        "  - bash: npm install --save-exact --no-progress semver@latest && node test.js\n"
        "    timeout_ms: 300000\n"
        "  - bash: git add -A && git commit -qm 'Bump six and semver' && git show --stat --format=%s HEAD\n"
        "  - text: Both dependencies are at their latest versions and the tests pass.\n"
    )
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Update the dependencies.",
        "--policy",
        str(policy),
        "--model-script",
        str(script),
        "--check",
        CHECK,
        "--json",
        timeout=900,
    )
    assert res.code == 0, res.stderr + res.stdout
    s = res.json()
    out = tool_results(s["run_dir"])
    six, semver = registries.latest_pypi("six"), registries.latest_npm("semver")
    assert registries.version_tuple(six) > registries.version_tuple(PINNED_PY[1])
    assert out[0].strip() == f"six=={six}", out[0]
    assert f"semver {semver} ok" in out[1], out[1]
    branch = s["branch"]
    assert git(repo, "show", f"{branch}:requirements.txt").strip() == f"six=={six}"
    assert json.loads(git(repo, "show", f"{branch}:package.json"))["dependencies"]["semver"] == semver
    assert (
        json.loads(git(repo, "show", f"{branch}:package-lock.json"))["packages"]["node_modules/semver"]["version"]
        == semver
    )
    assert generated_paths(repo, branch) == []
    # Every download went through the proxy, to the registries the preset allows, and was on record.
    proxy = [e["payload"] for e in audit_events(s["run_dir"]) if e["source"] == "proxy"]
    hosts = {e["host"] for e in proxy if e["decision"] == "allow"}
    assert {"pypi.org", "files.pythonhosted.org", "registry.npmjs.org"} <= hosts, hosts
    assert all(e["decision"] == "allow" for e in proxy), [e for e in proxy if e["decision"] != "allow"]
    # The check ran the repository's tests on a clean checkout of the committed head, through the proxy too.
    (check,) = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "check"]
    assert check["exit_code"] == 0, check["output"]
    assert check["head"] == s["head"] and "1 passed" in check["output"] and f"semver {semver} ok" in check["output"]
    assert labelled(s["id"]) == []


def test_check_runs_on_a_clean_checkout_of_the_committed_head(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    # Ignored and untracked leftovers of the agent's must not be seen by the check; the committed work must.
    script = write_script(
        "turns:\n"
        "  - bash: printf 'leftover\\n' > .env.local && printf '.env.local\\n' >> .git/info/exclude"
        " && mkdir -p node_modules && touch node_modules/stale && echo 'x = 2' > a.py && git commit -qam bump\n"
        "  - text: done\n"
    )
    # The check runs code from the branch: it cannot reach the packed bundle it is checking.
    check = (
        "test ! -e .env.local && test ! -e node_modules && grep -q 'x = 2' a.py && git rev-parse HEAD"
        " && git status --porcelain | wc -l && { touch /sandbox/out/work.bundle 2>/dev/null && echo WROTE"
        " || echo refused; }"
    )
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--check", check, "--json")
    assert res.code == 0, res.stderr + res.stdout
    s = res.json()
    (ev,) = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "check"]
    assert ev["exit_code"] == 0 and ev["output"].split() == [s["head"], "0", "refused"], ev


def test_sweep_of_three_repositories_lands_real_bumps(make_repo, sandbox, tmp_path) -> None:
    repos = [
        make_repo("py-lib", files=python_files()),
        make_repo("web-app", files=node_files()),
        make_repo("full-stack", files={**python_files(), **node_files()}),
    ]
    # The deterministic updaters a team would use: pip-compile --upgrade, and npm's own latest.
    pre = (
        "set -e\n"
        "if [ -f requirements.in ]; then python3 -m venv /tmp/pre; /tmp/pre/bin/pip install -q pip-tools; "
        "/tmp/pre/bin/pip-compile -q --upgrade --no-header --strip-extras -o requirements.txt requirements.in; fi\n"
        "if [ -f package.json ]; then for p in $(jq -r '.dependencies | keys[]' package.json); do "
        'npm install --save-exact --no-progress "$p@latest"; done; fi\n'
    )
    (tmp_path / "agent.yaml").write_text("turns:\n  - text: The update passes the tests.\n")
    manifest = tmp_path / "sweep.yaml"
    manifest.write_text(
        json.dumps(
            {
                "name": "nightly-deps",
                "task": "Update the dependencies; make the tests pass.",
                "concurrency": 2,
                "policy": str(registries.dependency_update_policy(tmp_path / "policy.yaml")),
                "pre": pre,
                "check": CHECK,
                "model_script": "agent.yaml",
                "repos": [{"path": str(r)} for r in repos],
            }
        )
    )
    res = sandbox("sweep", str(manifest), "--json", timeout=1500)
    assert res.code == 0, res.stderr + res.stdout
    rows = {Path(r["repo"]).name: r for r in res.json()["rows"]}
    assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(("py-lib", "web-app", "full-stack"), "succeeded")
    six, semver = registries.latest_pypi("six"), registries.latest_npm("semver")
    for repo in repos:
        branch = rows[repo.name]["branch"]
        files = git(repo, "ls-tree", "-r", "--name-only", branch).splitlines()
        if "requirements.txt" in files:
            pins = [
                line
                for line in git(repo, "show", f"{branch}:requirements.txt").splitlines()
                if not line.startswith("#") and "==" in line
            ]
            assert pins == [f"six=={six}"], pins
        if "package.json" in files:
            assert json.loads(git(repo, "show", f"{branch}:package.json"))["dependencies"] == {"semver": semver}
        assert generated_paths(repo, branch) == []
        assert labelled(rows[repo.name]["run_id"]) == []


def test_a_policy_extends_the_agent_image_once(make_repo, sandbox, write_script, tmp_path, state_dir) -> None:
    # A Debian package, and a tool from PyPI installed at build time through this network (its CA trusted).
    # The token makes this test's image its own: built here, then removed.
    token = secrets.token_hex(4)
    policy = registries.dependency_update_policy(
        tmp_path / "policy.yaml",
        image={
            "packages": ["tree"],
            "setup": ["pip install --break-system-packages -q pip-tools==7.4.1", f"echo built-{token} > /opt/marker"],
        },
    )
    script = write_script(
        "turns:\n  - bash: tree --version | head -c 9; echo; pip-compile --version;"
        " cat /opt/marker; id -un\n  - text: done\n"
    )
    repo = make_repo()
    first = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--policy",
        str(policy),
        "--model-script",
        str(script),
        "--json",
        timeout=900,
    )
    tag = None
    try:
        assert first.code == 0, first.stderr
        assert "policy's image (1 package(s), 2 setup command(s))" in first.stderr
        out = tool_results(first.json()["run_dir"])[0].split("\n")
        assert out[0] == "tree v2.1" and "pip-compile, version 7.4.1" in out[1], out
        assert out[2:4] == [f"built-{token}", "agent"], out
        started = next(e for e in audit_events(first.json()["run_dir"]) if e["type"] == "run_started")["payload"]
        tag = started["images"]["agent"]["ref"]
        assert tag.startswith("agent-sandbox/agent-custom:"), tag
        # The second run finds it built: no build, the same image.
        second = sandbox(
            "run", "--repo", str(repo), "--task", "t", "--policy", str(policy), "--model-script", str(script), "--json"
        )
        assert second.code == 0 and "policy's image" not in second.stderr, second.stderr
        started = next(e for e in audit_events(second.json()["run_dir"]) if e["type"] == "run_started")["payload"]
        assert started["images"]["agent"]["ref"] == tag
    finally:
        if tag:
            subprocess.run(["docker", "rmi", tag], capture_output=True, check=False)


def test_a_policy_image_that_cannot_build_stops_before_anything_is_created(
    make_repo, sandbox, write_script, tmp_path, state_dir
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(json.dumps({"image": {"setup": ["echo about to fail; exit 3"]}}))
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--policy",
        str(policy),
        "--model-script",
        str(write_script("turns: []\n")),
    )
    assert res.code == 3, res.stderr
    assert "building agent-sandbox/agent-custom:" in res.stderr and "returned a non-zero code: 3" in res.stderr
    assert "image:` section" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (state_dir / "runs").exists() and git(repo, "branch", "--list", "sandbox/*") == ""


def test_a_dirty_host_repository_is_named_and_left_alone(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    (repo / "a.py").write_text("x = 'work in progress'\n")
    script = write_script("turns:\n  - bash: cat a.py\n  - text: done\n")
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    assert "uncommitted changes (1 path(s))" in res.stderr
    assert len(s["warnings"]) == 1 and "will not see them" in s["warnings"][0]
    assert tool_results(s["run_dir"])[0].strip() == "x = 1"  # the agent saw the committed file
    assert (repo / "a.py").read_text() == "x = 'work in progress'\n"  # and the host's edit is untouched
    assert "## Warnings" in Path(s["run_dir"], "report.md").read_text()


def test_an_interrupt_during_the_check_still_brings_the_work_home(make_repo, state_dir, write_script) -> None:
    import signal
    import time

    from .conftest import start_run

    repo = make_repo()
    script = write_script("turns:\n  - bash: echo 'x = 2' > a.py && git commit -qam bump\n  - text: done\n")
    proc = start_run(
        state_dir,
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(script),
        "--check",
        "sleep 120",
        "--json",
    )
    try:
        deadline = time.monotonic() + 90
        while not any(
            e["type"] == "container_created" and e["payload"]["role"] == "check"
            for a in (state_dir / "runs").glob("*/audit.jsonl")
            for e in audit_events(a.parent)
        ):
            assert time.monotonic() < deadline and proc.poll() is None, "the check never started"
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)  # a second signal must not cut the import or the teardown short
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    s = json.loads(stdout)
    assert s["reason"] == "interrupted" and "during the check" in s["message"]
    assert s["branch"] and git(repo, "show", f"{s['branch']}:a.py").strip() == "x = 2"
    assert labelled(s["id"]) == [] and s["run_dir"] not in Path("/proc/mounts").read_text()
