"""Follow-up runs end to end: real Docker, real git, the real Claude Code CLI, the scripted model. A follow-up
continues the earlier run's branch (a fast-forward, pushed without force) with its task and result as context."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import git, labelled, tool_results

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

FIRST = """
turns:
  - edit: {path: a.py, old: "x = 1", new: "x = 2"}
  - bash: "git add -A && git commit -q -m 'Set x to 2'"
  - text: "First run done: x is 2 now, committed."
"""

FOLLOW = """
turns:
  - bash: "cat /sandbox/in/task.md"
  - bash: "git log --format=%s -3"
  - write: {path: notes.md, content: "x was set to 2\\n"}
  - text: "Follow-up done: notes written."
"""


def test_a_follow_up_continues_the_branch_with_the_earlier_run_as_context(
    make_repo, sandbox, write_script, tmp_path, state_dir
) -> None:
    repo = make_repo()
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "main")
    first_task = "Set x to 2 in a.py"
    res = sandbox(
        "run", "--repo", str(repo), "--task", first_task, "--model-script", str(write_script(FIRST)), "--push", "--json"
    )
    assert res.code == 0, res.stderr
    s1 = res.json()
    assert s1["branch"] and s1["pushed"] and len(s1["commits"]) == 1

    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "Now write notes.md explaining the change",
        "--follow-up",
        s1["id"],
        "--model-script",
        str(write_script(FOLLOW, "follow.yaml")),
        "--push",
        "--json",
    )
    assert res.code == 0, res.stderr
    s2 = res.json()
    assert s2["id"] != s1["id"] and s2["follow_up"] == s1["id"]
    # The same branch, moved forward: the follow-up started at the earlier tip and its commits sit on top.
    assert s2["branch"] == s1["branch"] and s2["base_commit"] == s1["head"]
    assert s2["commits"] and s1["commits"][0] not in s2["commits"]
    assert git(repo, "rev-parse", s2["branch"]) == s2["head"]
    history = git(repo, "rev-list", "--reverse", f"main..{s2['branch']}").split()
    assert history == s1["commits"] + s2["commits"], "both runs' commits, in order"
    assert git(repo, "show", f"{s2['branch']}:a.py") == "x = 2"
    assert git(repo, "show", f"{s2['branch']}:notes.md") == "x was set to 2"
    assert s2["files_changed"] == ["notes.md"]
    # Pushed without force: the remote's branch was fast-forwarded to the follow-up's tip.
    assert s2["pushed"] is True and git(origin, "rev-parse", s2["branch"]) == s2["head"]

    # The agent's task: the new instruction first, then the earlier run's task, result and commits.
    task_seen, log_seen = tool_results(s2["run_dir"])[:2]
    assert task_seen.startswith("Now write notes.md explaining the change")
    assert "Context: earlier sandbox runs on this branch" in task_seen
    assert f"## Run {s1['id']}" in task_seen
    assert f"> {first_task}" in task_seen
    assert "> First run done: x is 2 now, committed." in task_seen
    assert "Set x to 2" in task_seen and "a.py" in task_seen
    assert log_seen.splitlines()[0] == "Set x to 2", "the workspace starts at the earlier run's tip"

    spec = json.loads(Path(s2["run_dir"], "spec.json").read_text())
    assert spec["follow_up"] == s1["id"] and spec["instruction"] == "Now write notes.md explaining the change"
    assert spec["policy_source"] == "preset:default"
    report = Path(s2["run_dir"], "report.md").read_text()
    assert f"A follow-up of run {s1['id']}" in report
    shown = sandbox("show", s2["id"])
    assert shown.code == 0 and f"follow-up of {s1['id']}" in shown.stdout
    assert labelled(s2["id"]) == []


def test_a_follow_up_of_a_run_that_changed_nothing_is_refused(make_repo, sandbox, write_script, state_dir) -> None:
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "look only",
        "--model-script",
        str(write_script("turns:\n  - bash: ls\n  - text: nothing to change\n")),
        "--json",
    )
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["branch"] is None
    runs_before = sorted(p.name for p in (state_dir / "runs").iterdir())
    branches_before = git(repo, "branch", "--list")
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "continue",
        "--follow-up",
        s["id"],
        "--model-script",
        str(write_script("turns: []\n", "empty.yaml")),
    )
    assert res.code == 2, res.stderr
    assert "changed nothing" in res.stderr
    assert sorted(p.name for p in (state_dir / "runs").iterdir()) == runs_before, "nothing created"
    assert git(repo, "branch", "--list") == branches_before
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--follow-up", "nosuchrun", "--model-script", "x.yaml")
    assert res.code == 2 and "no run 'nosuchrun'" in res.stderr
