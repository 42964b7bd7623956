"""The workspace over a cached tree, end to end: real Docker, real git, the real Claude Code CLI, the scripted
model. The agent sees an ordinary, clean git working tree; what it edits, deletes, renames and creates is
exactly what lands on its branch; the next run on the same commit starts from the pristine tree, cached; and
nothing of either run (mounts, loop devices, containers) is left."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from agent_sandbox.run import quota, workspace

from .conftest import audit_events, git, labelled, tool_results

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

OVERLAY = workspace.overlay_unavailable() is None

FILES = {
    "a.py": "x = 1\n",
    "README.md": "# test repo\n",
    "pkg/b.py": "b = 1\n",
    "pkg/c.py": "c = 1\n",
    "docs/old.md": "old\n",
}

WORK = """
turns:
  - bash: "git status --porcelain; echo status-done; git log --format=%s"
  - bash: "echo 'x = 2' > a.py && rm README.md && git mv pkg lib && echo new > new.txt && rm -r docs
      && git add -A && git commit -q -m 'The agent changes things' && git status --porcelain && echo committed"
  - text: done
"""

LOOK = """
turns:
  - bash: "git status --porcelain; echo status-done; cat a.py; ls -A | tr '\\\\n' ' '; echo; git branch --show-current"
  - text: looked
"""


def mounts_under(top: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(f"{top}/")
    ]


def loops_under(top: Path) -> list[str]:
    res = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    return [line for line in res.stdout.splitlines() if str(top) in line]


def checkout_event(run_dir: str) -> dict[str, object]:
    (e,) = [e["payload"] for e in audit_events(run_dir) if e["type"] == "checkout_prepared"]
    return e


def test_the_agent_works_in_a_clean_tree_and_the_next_run_starts_pristine(
    make_repo, sandbox, write_script, state_dir
) -> None:
    repo = make_repo(files=FILES)
    base = git(repo, "rev-parse", "HEAD")
    res = sandbox(
        "run", "--repo", str(repo), "--task", "change things", "--model-script", str(write_script(WORK)), "--json"
    )
    assert res.code == 0, res.stderr
    s1 = res.json()
    status, committed = tool_results(s1["run_dir"])[:2]
    # Clean from the start: git status says nothing, and the history is the host's.
    assert status == "status-done\ninitial\n" or status.strip() == "status-done\ninitial", status
    assert committed.strip() == "committed", committed
    first = checkout_event(s1["run_dir"])
    if OVERLAY:
        assert (first["mode"], first["cached"]) == ("overlay", False), first
    else:
        assert first["mode"] == "copy" and first["cached"] is None
    # The branch holds exactly what the agent did.
    assert git(repo, "log", "--format=%s", f"{base}..{s1['branch']}") == "The agent changes things"
    changes = git(repo, "diff", "--name-status", "-M", base, s1["branch"]).splitlines()
    assert sorted(changes) == sorted(
        [
            "M\ta.py",
            "D\tREADME.md",
            "D\tdocs/old.md",
            "A\tnew.txt",
            "R100\tpkg/b.py\tlib/b.py",
            "R100\tpkg/c.py\tlib/c.py",
        ]
    ), changes
    assert git(repo, "show", f"{s1['branch']}:a.py") == "x = 2"

    # A second run on the same base commit: the tree as committed, from the cache, clean.
    res = sandbox(
        "run", "--repo", str(repo), "--task", "look", "--model-script", str(write_script(LOOK, "l.yaml")), "--json"
    )
    assert res.code == 0, res.stderr
    s2 = res.json()
    (seen,) = tool_results(s2["run_dir"])[:1]
    lines = seen.splitlines()
    assert lines[0] == "status-done", seen
    assert lines[1] == "x = 1"
    assert lines[2].split() == [".git", "README.md", "a.py", "docs", "pkg"], seen
    assert lines[3] == f"sandbox/{s2['id']}"
    second = checkout_event(s2["run_dir"])
    if OVERLAY:
        assert (second["mode"], second["cached"]) == ("overlay", True), second
        # One tree for the commit, its files as committed.
        (tree,) = [p for p in (state_dir / "trees").iterdir() if p.is_dir()]
        assert (tree / "tree" / "a.py").read_text() == "x = 1\n" and not (tree / "tree" / "lib").exists()
    assert s2["branch"] is None  # the agent changed nothing

    # Nothing left of either run: no mount, no loop device, no container, no workspace or layer.
    assert mounts_under(state_dir) == [] and loops_under(state_dir) == []
    for s in (s1, s2):
        assert labelled(s["id"]) == []
        left = sorted(p.name for p in Path(s["run_dir"]).iterdir())
        assert not {"workspace", "layer", "layer.img", "workspace.img", workspace.RECORD} & set(left), left


@pytest.mark.skipif(not OVERLAY or quota.unavailable() is not None, reason="needs the overlay workspace")
def test_keep_leaves_the_merged_workspace_as_a_plain_directory(make_repo, sandbox, write_script, state_dir) -> None:
    repo = make_repo(files=FILES)
    script = write_script('turns:\n  - bash: "echo kept > kept.txt && rm a.py"\n  - text: done\n')
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--keep", "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    ws = Path(s["run_dir"]) / "workspace"
    assert mounts_under(state_dir) == [] and loops_under(state_dir) == []
    assert (ws / "kept.txt").read_text() == "kept\n" and not (ws / "a.py").exists() and (ws / "pkg" / "b.py").is_file()
    assert (ws / ".git" / "HEAD").is_file() and not (Path(s["run_dir"]) / "layer").exists()
    assert json.loads(Path(s["run_dir"], "summary.json").read_text())["branch"] == s["branch"]
