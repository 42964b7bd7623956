"""Git handoff: git works inside, only the agent's work comes back, nothing reaches back into the host."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from .conftest import git, labelled, tool_results
from .fake_github import fake_github_fixture  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]


def with_origin(make_repo, tmp_path: Path) -> tuple[Path, Path]:
    repo = make_repo()
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "main")
    return repo, origin


def snapshot(repo: Path) -> dict[str, str]:
    """Hashes of the host repository's config and every hook file."""
    out = {"config": hashlib.sha256((repo / ".git" / "config").read_bytes()).hexdigest()}
    for p in sorted((repo / ".git" / "hooks").rglob("*")):
        if p.is_file():
            out[str(p.relative_to(repo))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refs(repo: Path) -> dict[str, str]:
    lines = git(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()
    return dict(line.split(" ") for line in lines)


def test_agent_commits_are_kept_and_a_dirty_host_is_untouched(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    (repo / "a.py").write_text("x = 'host edit, not committed'\n")
    (repo / "untracked.txt").write_text("mine\n")
    status_before = git(repo, "status", "--porcelain")
    base = git(repo, "rev-parse", "HEAD")
    script = write_script("""
turns:
  - bash: "git status --short; echo one > one.txt && git add one.txt && git commit -q -m 'First agent commit'
      && git log --oneline | head -3"
  - bash: "echo two > two.txt && git add two.txt && git commit -q -m 'Second agent commit' -m 'with a body'
      && git diff HEAD~1 --stat"
  - write: {path: three.txt, content: "left uncommitted\\n"}
  - text: done
""")
    res = sandbox("run", "--repo", str(repo), "--task", "commit twice", "--model-script", str(script), "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    status_and_log, diffstat = tool_results(s["run_dir"])[:2]
    # Git works inside: the agent's checkout is clean at start (the host's dirt is not in it) and commits.
    first, second = status_and_log.splitlines()[:2]
    assert first.endswith(" First agent commit") and second.endswith(" initial")
    assert "two.txt | 1 +" in diffstat
    subjects = git(repo, "log", "--format=%s|%an", f"{base}..{s['branch']}").splitlines()
    assert subjects[0] == f"sandbox: uncommitted work left by run {s['id']}|sandbox agent"
    assert subjects[1:] == ["Second agent commit|sandbox agent", "First agent commit|sandbox agent"]
    assert git(repo, "log", "-1", "--format=%b", f"{s['branch']}~1") == "with a body"
    assert git(repo, "show", f"{s['branch']}:three.txt") == "left uncommitted"
    # The host: same HEAD, same dirty working tree, same untracked file.
    assert git(repo, "rev-parse", "HEAD") == base and git(repo, "status", "--porcelain") == status_before
    assert (repo / "a.py").read_text() == "x = 'host edit, not committed'\n"


def test_hostile_agent_cannot_reach_back_into_the_host(make_repo, sandbox, write_script, tmp_path) -> None:
    repo, origin = with_origin(make_repo, tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    m = str(markers)
    before, refs_before = snapshot(repo), refs(repo)
    hooks = (
        "post-checkout",
        "pre-push",
        "pre-commit",
        "post-merge",
        "reference-transaction",
        "post-rewrite",
        "fsmonitor-watchman",
        "pre-auto-gc",
    )
    plant_hooks = (
        "; ".join(f"printf '#!/bin/sh\\ntouch {m}/{h} 2>/dev/null; exit 0\\n' > .git/hooks/{h}" for h in hooks)
        + "; chmod +x .git/hooks/*"
    )
    config = "; ".join(
        [
            f"git config {scope} core.fsmonitor 'touch {m}/fsmonitor-{name}; false'"
            for scope, name in (("", "repo"), ("--global", "global"))
        ]
        + [
            "git config core.hooksPath .git/hooks",
            "git config --global core.hooksPath /workspace/.git/hooks",
            f"git config filter.pwn.smudge 'touch {m}/smudge 2>/dev/null; cat'",
            f"git config filter.pwn.clean 'touch {m}/clean 2>/dev/null; cat'",
            f"git config diff.pwn.textconv 'touch {m}/textconv 2>/dev/null; cat'",
            f"git config uploadpack.packObjectsHook 'touch {m}/uploadpack'",
            f"git config core.sshCommand 'touch {m}/ssh'",
            f"git config --system core.fsmonitor 'touch {m}/system' 2>&1; echo system-rc=$?",
        ]
    )
    reach = (
        "touch /sandbox/host-objects/pwned 2>&1; echo rc=$?; "
        "echo /tmp > /sandbox/host-objects/info/alternates 2>&1; echo rc=$?; "
        "mkdir /sandbox/host-objects/../hooks 2>&1; echo rc=$?; "
        "ls /sandbox/host-objects/../config 2>&1; echo rc=$?"
    )
    moves = (
        "git update-ref refs/heads/main HEAD && git branch evil && git tag v666 && "
        "git update-ref refs/remotes/origin/main HEAD && git update-ref refs/heads/sandbox/other HEAD && "
        "git for-each-ref --format='%(refname)'"
    )
    script = write_script(
        "turns:\n"
        + "".join(
            f"  - bash: {json.dumps(c)}\n"
            for c in (
                config,
                plant_hooks,
                "printf '* filter=pwn diff=pwn\\n' > .gitattributes && echo payload > payload.txt && git add -A && "
                "git commit -q -m hostile && echo committed",
                reach,
                moves,
            )
        )
        + "  - text: done\n"
    )
    res = sandbox("run", "--repo", str(repo), "--task", "be hostile", "--model-script", str(script), "--push", "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    out = tool_results(s["run_dir"])
    assert "system-rc=" in out[0] and "system-rc=0" not in out[0], out[0]
    assert out[2].strip().endswith("committed")
    # Every attempt on the host's repository fails inside the container.
    assert out[3].count("Read-only file system") == 3 and "rc=0" not in out[3], out[3]
    assert "No such file or directory" in out[3]
    assert "refs/tags/v666" in out[4]

    # Now the host does ordinary things with the branch.
    branch = s["branch"]
    for args in (
        ["status"],
        ["log", "--all", "--oneline"],
        ["diff", "main", branch],
        ["show", branch],
        ["checkout", "-q", branch],
        ["checkout", "-q", "main"],
        ["fetch", "-q", "origin"],
        ["merge", "--no-edit", "-q", branch],
        ["gc", "-q"],
    ):
        git(repo, *args)
    assert sorted(p.name for p in markers.iterdir()) == [], "something the agent planted ran on the host"
    # Byte-identical config and hooks; refs: main moved only by our own merge, one new branch, nothing else.
    assert snapshot(repo) == before
    after = refs(repo)
    assert set(after) - set(refs_before) == {f"refs/heads/{branch}", f"refs/remotes/origin/{branch}"}
    assert after["refs/remotes/origin/main"] == refs_before["refs/remotes/origin/main"]
    assert not any("evil" in r or "v666" in r or "sandbox/other" in r for r in after)
    # The pushed branch arrived as a plain branch with the content, and nothing else was pushed.
    remote_refs = git(origin, "for-each-ref", "--format=%(refname)").splitlines()
    assert sorted(remote_refs) == sorted(["refs/heads/main", f"refs/heads/{branch}"])
    assert git(origin, "show", f"{branch}:payload.txt") == "payload"
    assert labelled(s["id"]) == []


def test_workflow_change_is_refused_by_the_gate(make_repo, sandbox, write_script, tmp_path) -> None:
    repo, origin = with_origin(make_repo, tmp_path)
    script = write_script("""
turns:
  - write: {path: .github/workflows/ci.yml, content: "on: push\\n"}
  - edit: {path: a.py, old: "x = 1", new: "x = 2"}
  - text: done
""")
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--push", "--json")
    assert res.code == 15, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("failed", "policy")
    assert [(v["rule"], v["path"]) for v in s["violations"]] == [("forbidden_paths", ".github/workflows/ci.yml")]
    assert s["pushed"] is False and "refused" in s["push_error"]
    assert git(repo, "branch", "--list", s["branch"]) != "", "the branch is kept locally"
    assert git(origin, "branch", "--list", "sandbox/*") == "", "nothing was pushed"
    res = sandbox("push", s["id"])
    assert res.code == 15 and "broke the policy's git rules" in res.stderr
    assert "forbidden_paths" in Path(s["run_dir"], "report.md").read_text()


REJECT_HOOK = "#!/bin/sh\necho 'remote says no' >&2\nexit 1\n"


def test_push_lands_and_a_failed_push_can_be_retried(make_repo, sandbox, write_script, tmp_path) -> None:
    repo, origin = with_origin(make_repo, tmp_path)
    script = write_script('turns:\n  - edit: {path: a.py, old: "x = 1", new: "x = 3"}\n  - text: done\n')
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--push", "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["pushed"] is True and s["remote"] == "origin"
    assert git(origin, "show", f"{s['branch']}:a.py") == "x = 3"

    hook = origin / "hooks" / "pre-receive"
    hook.write_text(REJECT_HOOK)
    hook.chmod(0o755)
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--push", "--json")
    assert res.code == 16, res.stderr
    s = res.json()
    assert s["status"] == "succeeded" and s["pushed"] is False
    assert "remote says no" in s["push_error"] and f"sandbox push {s['id']}" in s["push_error"]
    assert git(repo, "show", f"{s['branch']}:a.py") == "x = 3", "the branch is kept locally"
    assert git(origin, "branch", "--list", s["branch"]) == ""
    hook.unlink()
    res = sandbox("push", s["id"], "--json")
    assert res.code == 0, res.stderr
    assert res.json()["pushed"] is True
    assert git(origin, "show", f"{s['branch']}:a.py") == "x = 3"
    assert json.loads(Path(s["run_dir"], "summary.json").read_text())["pushed"] is True


def test_open_pr_sends_the_right_request(make_repo, sandbox, write_script, tmp_path, fake_github) -> None:
    repo, _origin = with_origin(make_repo, tmp_path)
    token = "ghp_" + "T" * 36
    pol = tmp_path / "pr.yaml"
    pol.write_text("name: pr\ngit:\n  pr_draft: true\n  pr_labels: [sandbox]\n  pr_reviewers: [bob]\n")
    script = write_script('turns:\n  - edit: {path: a.py, old: "x = 1", new: "x = 4"}\n  - text: done\n')
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Fix the answer\n\nlonger text",
        "--policy",
        str(pol),
        "--model-script",
        str(script),
        "--open-pr",
        "--json",
        env={
            "GITHUB_TOKEN": token,
            "SANDBOX_GITHUB_API": fake_github.url,
            "SANDBOX_GITHUB_REPO": "acme/widgets",
        },
    )
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["pushed"] is True and s["pr_url"] == "https://github.example/acme/widgets/pull/1"
    # First the look for an open pull request of the branch, then the new one, its labels and reviewers.
    (look,) = fake_github.requests_to("GET", "/repos/acme/widgets/pulls")
    assert look.query == {"state": "open", "head": f"acme:{s['branch']}"}
    (req,) = fake_github.requests_to("POST", "/repos/acme/widgets/pulls")
    assert req.headers["authorization"] == f"Bearer {token}" and req.headers["accept"] == "application/vnd.github+json"
    assert req.json["head"] == s["branch"] and req.json["base"] == "main" and req.json["draft"] is True
    assert req.json["title"] == "sandbox: Fix the answer"
    assert req.json["body"].startswith(f"# Sandbox run {s['id']}") and "## Files changed" in req.json["body"]
    assert fake_github.labels_of("acme/widgets", 1) == ["sandbox"]
    (pr,) = fake_github.pulls("acme/widgets")
    assert pr["requested_reviewers"] == [{"login": "bob"}]
    for p in Path(s["run_dir"]).rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes(), p


def test_failed_pr_is_retried_by_push_and_updates_an_open_one(
    make_repo, sandbox, write_script, tmp_path, fake_github
) -> None:
    repo, origin = with_origin(make_repo, tmp_path)
    env = {"GITHUB_TOKEN": "ghp_" + "U" * 36, "SANDBOX_GITHUB_API": fake_github.url, "SANDBOX_GITHUB_REPO": "acme/w"}
    # GitHub refuses the pull request for good (a 422 is not retried): the branch is pushed, the run exits 16.
    fake_github.fail_next(1, 422, message="Validation Failed", path="/repos/acme/w/pulls", method="POST")
    script = write_script('turns:\n  - edit: {path: a.py, old: "x = 1", new: "x = 5"}\n  - text: done\n')
    res = sandbox(
        "run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--open-pr", "--json", env=env
    )
    assert res.code == 16, res.stderr
    s = res.json()
    assert s["pushed"] is True and s["pr_url"] is None and f"sandbox push {s['id']}" in s["push_error"]
    assert git(origin, "show", f"{s['branch']}:a.py") == "x = 5"
    # Meanwhile someone opened one for the branch: `sandbox push` updates it rather than failing with 422.
    theirs = fake_github.add_pull("acme/w", s["branch"], body="by hand")
    res = sandbox("push", s["id"], "--json", env=env)
    assert res.code == 0, res.stderr
    after = res.json()
    assert after["pr_url"] == theirs["html_url"] and after["push_error"] is None and after["exit_code"] == 0
    (pr,) = fake_github.pulls("acme/w")
    assert pr["body"].startswith(f"# Sandbox run {s['id']}")
    (note,) = fake_github.comments_on("acme/w", theirs["number"])
    assert s["id"] in note["body"]
    assert not fake_github.requests_to("POST", "/repos/acme/w/pulls")[1:]
    saved = json.loads(Path(s["run_dir"], "summary.json").read_text())
    assert saved["pr_url"] == theirs["html_url"]
    # Nothing left to retry: a second push leaves the pull request alone.
    before = len(fake_github.requests)
    assert sandbox("push", s["id"], env=env).code == 0
    assert len(fake_github.requests) == before


def test_open_pr_without_token_is_refused_up_front(make_repo, sandbox, write_script, tmp_path, state_dir) -> None:
    repo, _ = with_origin(make_repo, tmp_path)
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script("turns: []\n")),
        "--open-pr",
        drop=("GITHUB_TOKEN",),
    )
    assert res.code == 2 and "GITHUB_TOKEN" in res.stderr
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script("turns: []\n")),
        "--push",
        "--remote",
        "upstream",
    )
    assert res.code == 2 and "no remote 'upstream'" in res.stderr
    assert not (state_dir / "runs").exists()


def test_base_ref_and_report(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    git(repo, "checkout", "-q", "-b", "release")
    (repo / "a.py").write_text("x = 10\n")
    git(repo, "commit", "-qam", "release change")
    release = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    script = write_script("""
turns:
  - bash: "cat a.py"
  - edit: {path: a.py, old: "x = 10", new: "x = 11"}
  - text: done
""")
    res = sandbox(
        "run", "--repo", str(repo), "--task", "bump", "--base", "release", "--model-script", str(script), "--json"
    )
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["base_commit"] == release and tool_results(s["run_dir"])[0] == "x = 10"
    assert git(repo, "rev-parse", f"{s['branch']}~1") == release
    rep = sandbox("report", s["id"])
    assert rep.code == 0
    for part in (
        "# Sandbox run",
        "> bump",
        "**succeeded** (completed)",
        "| `a.py` | 1 | 1 |",
        "cat a.py",
        "Hosts denied: none",
        "| policy | default",
    ):
        assert part in rep.stdout, part
    assert sandbox("report", "no-such-run").code == 2
