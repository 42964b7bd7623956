"""Class 6 of issue 11: the diff gate sees through chains of links. `a -> .` and `b -> a/..` are each
harmless to a check that reads one link at a time, and together `b` is the directory above the repository.
The agent commits such a chain; the run must end with reason `policy` (exit 15) and nothing is pushed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ..conftest import git

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]


def test_a_chain_of_links_out_of_the_repository_is_refused(make_repo, sandbox, write_script, tmp_path) -> None:
    repo = make_repo()
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "main")
    chain = (
        "ln -s . a && ln -s a/.. b && mkdir -p d/e && ln -s ../.. d/e/top && ln -s d/e/top/a/.. c "
        "&& git add a b c d && git commit -q -m 'links that each look harmless' && ls b/ >/dev/null && echo ok"
    )
    script = write_script(
        "turns:\n"
        + "".join(
            f"  - bash: {json.dumps(c)}\n"
            for c in (
                chain,
                "sed -i 's/x = 1/x = 2/' a.py",
            )
        )
        + "  - text: done\n"
    )
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--push", "--json")
    assert res.code == 15, res.stderr + res.stdout
    s = res.json()
    assert (s["status"], s["reason"]) == ("failed", "policy")
    flagged = sorted((v["rule"], v["path"]) for v in s["violations"])
    assert flagged == [("symlink", "b"), ("symlink", "c")], s["violations"]
    assert all("climbs above the top" in v["detail"] for v in s["violations"])
    assert s["pushed"] is False and "refused" in s["push_error"]
    assert git(origin, "branch", "--list", "sandbox/*") == "", "nothing was pushed"
    assert git(repo, "branch", "--list", s["branch"]) != "", "the branch is kept for inspection"
    assert "symlink" in Path(s["run_dir"], "report.md").read_text()
