"""`sandbox run` end to end: real Docker, real git, the real Claude Code CLI, the scripted model."""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from pathlib import Path

import pytest

from .conftest import git, labelled, tool_results, transcript

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

EDIT_WRITE_BASH = """
turns:
  - edit: {path: a.py, old: "x = 1", new: "x = 2"}
  - write: {path: notes.md, content: "text\\n"}
  - bash: "echo hi > hello.txt"
  - text: "Done."
    usage: {input_tokens: 1000, output_tokens: 200}
usage: {input_tokens: 100, output_tokens: 50}
"""


def test_scripted_run_lands_exactly_the_scripted_change(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "edit, write and run",
        "--model-script",
        str(write_script(EDIT_WRITE_BASH)),
        "--json",
    )
    assert res.code == 0, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("succeeded", "completed")
    assert s["branch"] == f"sandbox/{s['id']}"
    assert s["base_commit"] == base
    subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", base, s["branch"]], check=True)
    changes = git(repo, "diff", "--name-status", f"{base}..{s['branch']}").splitlines()
    assert sorted(changes) == ["A\thello.txt", "A\tnotes.md", "M\ta.py"]
    assert git(repo, "show", f"{s['branch']}:a.py") == "x = 2"
    assert git(repo, "show", f"{s['branch']}:notes.md") == "text"
    assert git(repo, "show", f"{s['branch']}:hello.txt") == "hi"
    # The agent left everything uncommitted: the finaliser committed it, naming the run.
    assert len(s["commits"]) == 1
    assert s["id"] in git(repo, "log", "-1", "--format=%s", s["branch"])
    assert git(repo, "log", "-1", "--format=%an <%ae>", s["branch"]) == "sandbox agent <agent@sandbox.invalid>"
    # The host's own branch and working tree are untouched.
    assert git(repo, "rev-parse", "HEAD") == base and git(repo, "status", "--porcelain") == ""
    assert s["cost_usd"] > 0 and s["model_calls"] >= 5 and s["duration_s"] > 0
    assert Path(s["run_dir"], "audit.jsonl").is_file()
    assert not Path(s["run_dir"], "workspace").exists(), "without --keep the checkout is removed"
    assert labelled(s["id"]) == []


def test_agent_container_never_holds_the_real_key(make_repo, sandbox, write_script) -> None:
    fake = "sk-ant-api03-FAKE" + secrets.token_hex(12)
    script = write_script("""
turns:
  - bash: "env | sort"
  - bash: "cat /proc/self/environ | tr '\\\\0' '\\\\n'"
  - bash: "cat /proc/$(pgrep -o -x claude)/environ | tr '\\\\0' '\\\\n'; ls -la /sandbox; cat /sandbox/in/task.md"
  - text: "looked"
""")
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "look around",
        "--model-script",
        str(script),
        "--json",
        env={"ANTHROPIC_API_KEY": fake},
    )
    assert res.code == 0, res.stderr
    s = res.json()
    outputs = tool_results(s["run_dir"])
    assert len(outputs) == 3
    env_dump = outputs[0]
    # What the agent sees is the placeholder; the gateway address is the sidecar.
    assert "ANTHROPIC_API_KEY=sk-sandbox-placeholder-not-a-key" in env_dump
    assert "ANTHROPIC_BASE_URL=http://sidecar:8080" in env_dump
    assert "ANTHROPIC_API_KEY=" in outputs[1]
    assert "ANTHROPIC_API_KEY=sk-sandbox-placeholder-not-a-key" in outputs[2]  # Claude Code's own environment
    for out in outputs:
        assert fake not in out and fake[8:] not in out
    # The gateway did hold it: every model call reached the model with the real key, not the placeholder.
    calls = [t for t in transcript(s["run_dir"]) if t.get("path") == "/v1/messages"]
    assert calls and {t["api_key_sha256"] for t in calls} == {hashlib.sha256(fake.encode()).hexdigest()}
    for p in Path(s["run_dir"]).rglob("*"):
        if p.is_file():
            assert fake.encode() not in p.read_bytes(), p


def test_demo_fixes_the_failing_test(sandbox) -> None:
    res = sandbox("demo", "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["status"] == "succeeded" and s["branch"]
    repo = Path(s["repo"])
    diff = git(repo, "diff", f"{s['base_commit']}..{s['branch']}", "--", "calc.py")
    assert "-    return a - b" in diff and "+    return a + b" in diff
    outputs = tool_results(s["run_dir"])
    assert "FAILED (failures=1)" in outputs[0]
    assert any(o.rstrip().endswith("OK") for o in outputs[2:4])
    subjects = git(repo, "log", "--format=%s", f"{s['base_commit']}..{s['branch']}").splitlines()
    assert "Fix add(): it subtracted instead of adding" in subjects
    assert labelled(s["id"]) == []


def test_demo_prints_branch_and_diff_for_people(sandbox) -> None:
    res = sandbox("demo")
    assert res.code == 0, res.stderr
    assert "succeeded (completed)" in res.stdout
    assert "branch   sandbox/" in res.stdout
    assert "+    return a + b" in res.stdout
    # Progress goes to stderr as plain lines when there is no terminal.
    assert "prepare" in res.stderr and "tool Edit: /workspace/calc.py" in res.stderr
