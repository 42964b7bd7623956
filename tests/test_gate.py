"""The diff policy gate on real repositories (plain git, no containers)."""

from __future__ import annotations

import os
from pathlib import Path

from agent_sandbox.checkout import open_repo
from agent_sandbox.gate import check
from agent_sandbox.policy import GitSettings

from .conftest import git


def change(repo: Path, build) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    base = git(repo, "rev-parse", "HEAD")
    build(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "change")
    return base, git(repo, "rev-parse", "HEAD")


def rules(r: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    return sorted(r, key=lambda x: (x[0], x[1] or ""))


def test_clean_change_passes(make_repo) -> None:
    repo = make_repo()
    base, head = change(repo, lambda r: (r / "a.py").write_text("x = 2\n"))
    res = check(open_repo(repo), base, head, GitSettings())
    assert res.ok and res.files == 1 and res.lines == 2


def test_each_rule(make_repo) -> None:
    repo = make_repo(files={"a.py": "x = 1\n", ".gitmodules": '[submodule "lib"]\n\tpath = lib\n\turl = https://example.invalid/lib.git\n'})

    def build(r: Path) -> None:
        (r / ".github" / "workflows").mkdir(parents=True)
        (r / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
        (r / "blob.bin").write_bytes(bytes(range(256)) * 4)
        os.symlink("../../etc/passwd", r / "escape")
        os.symlink("a.py", r / "inside")
        (r / ".gitmodules").write_text('[submodule "lib"]\n\tpath = lib\n\turl = https://example.invalid/evil.git\n')
        (r / "big.txt").write_text("line\n" * 40)

    base, head = change(repo, build)
    res = check(open_repo(repo), base, head, GitSettings(max_changed_files=5, max_changed_lines=30))
    got = rules([(v.rule, v.path) for v in res.violations])
    assert got == rules([
        ("forbidden_paths", ".github/workflows/ci.yml"), ("allow_binary", "blob.bin"), ("symlink", "escape"),
        ("submodule_url", ".gitmodules"), ("max_changed_files", None), ("max_changed_lines", None)])
    sub = next(v for v in res.violations if v.rule == "submodule_url")
    assert "evil.git" in sub.detail
    loose = GitSettings(forbidden_paths=[], allow_binary=True, max_changed_files=100, max_changed_lines=1000)
    assert rules([(v.rule, v.path) for v in check(open_repo(repo), base, head, loose).violations]) == rules(
        [("symlink", "escape"), ("submodule_url", ".gitmodules")])


def test_deleting_a_forbidden_path_counts(make_repo) -> None:
    repo = make_repo(files={"a.py": "x\n", ".github/workflows/ci.yml": "on: push\n"})
    base, head = change(repo, lambda r: (r / ".github" / "workflows" / "ci.yml").unlink())
    (v,) = check(open_repo(repo), base, head, GitSettings()).violations
    assert (v.rule, v.path) == ("forbidden_paths", ".github/workflows/ci.yml")
