"""The diff policy gate on real repositories (plain git, no containers)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent_sandbox.config.policy import GitSettings
from agent_sandbox.git.checkout import open_repo
from agent_sandbox.git.gate import check, resolve_link

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
    repo = make_repo(
        files={
            "a.py": "x = 1\n",
            ".gitmodules": '[submodule "lib"]\n\tpath = lib\n\turl = https://example.invalid/lib.git\n',
        }
    )

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
    assert got == rules(
        [
            ("forbidden_paths", ".github/workflows/ci.yml"),
            ("allow_binary", "blob.bin"),
            ("symlink", "escape"),
            ("submodule_url", ".gitmodules"),
            ("max_changed_files", None),
            ("max_changed_lines", None),
        ]
    )
    sub = next(v for v in res.violations if v.rule == "submodule_url")
    assert "evil.git" in sub.detail
    loose = GitSettings(forbidden_paths=[], allow_binary=True, max_changed_files=100, max_changed_lines=1000)
    assert rules([(v.rule, v.path) for v in check(open_repo(repo), base, head, loose).violations]) == rules(
        [("symlink", "escape"), ("submodule_url", ".gitmodules")]
    )


def test_deleting_a_forbidden_path_counts(make_repo) -> None:
    repo = make_repo(files={"a.py": "x\n", ".github/workflows/ci.yml": "on: push\n"})
    base, head = change(repo, lambda r: (r / ".github" / "workflows" / "ci.yml").unlink())
    (v,) = check(open_repo(repo), base, head, GitSettings()).violations
    assert (v.rule, v.path) == ("forbidden_paths", ".github/workflows/ci.yml")


# --- symbolic links, resolved through the tree -------------------------------------------------------------


def commit_tree(repo: Path, entries: dict[str, tuple[str, str]], parent: str | None = None) -> str:
    """A commit built with plumbing alone (no working tree): path -> (mode, content); 120000 is a link."""
    index = repo / ".git" / "plumbing-index"
    index.unlink(missing_ok=True)
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    lines = []
    for path, (mode, content) in entries.items():
        sha = (
            subprocess.run(
                ["git", "-C", str(repo), "hash-object", "-w", "--stdin"],
                input=content.encode(),
                capture_output=True,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        lines.append(f"{mode} {sha}\t{path}\n")
    subprocess.run(
        ["git", "-C", str(repo), "update-index", "--index-info"], input="".join(lines).encode(), env=env, check=True
    )
    tree = subprocess.run(
        ["git", "-C", str(repo), "write-tree"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    return git(repo, "commit-tree", tree, "-m", "plumbing", *(["-p", parent] if parent else []))


def link(target: str) -> tuple[str, str]:
    return ("120000", target)


FILE = ("100644", "x\n")

# (name, links and files of the head tree, links expected to be flagged)
LINK_CASES = [
    ("dot then dotdot", {"a": link("."), "b": link("a/..")}, ["b"]),
    ("dot chain stays inside", {"a": link("."), "b": link("a/a/a/f"), "f": FILE}, []),
    ("absolute", {"etc": link("/etc/passwd")}, ["etc"]),
    ("up to the top is inside", {"sub/up": link(".."), "sub/f": FILE}, []),
    ("above the top", {"sub/up2": link("../.."), "sub/f": FILE}, ["sub/up2"]),
    ("link to a link that climbs", {"x/y": link(".."), "x/f": FILE, "z": link("x/y/..")}, ["z"]),
    ("link to a link to a link", {"l1": link("l2"), "l2": link("l3"), "l3": link("sub/.."), "sub/f": FILE}, []),
    ("last link of a chain escapes", {"l1": link("l2"), "l2": link("sub/../.."), "sub/f": FILE}, ["l1", "l2"]),
    ("loop", {"p": link("q"), "q": link("p")}, ["p", "q"]),
    ("absolute in the middle", {"abs": link("/tmp"), "c": link("abs/x")}, ["abs", "c"]),
    ("missing directory judged by its text", {"m": link("nothere/../.."), "f": FILE}, ["m"]),
    ("deep and inside", {"deep/a/b": link("../../f"), "f": FILE}, []),
    ("through a link to a subdirectory", {"d/e/f": FILE, "s": link("d/e"), "t": link("s/../../..")}, ["t"]),
    ("link named like its directory's parent", {"d/e": link("../d"), "d/f": FILE, "g": link("d/e/e/e/..")}, []),
    ("climbs through a link to the top", {"d/top": link(".."), "d/f": FILE, "w": link("d/top/d/top/../..")}, ["w"]),
    ("too many hops", {**{f"h{i}": link(f"h{i + 1}") for i in range(45)}, "h45": FILE}, [f"h{i}" for i in range(5)]),
]


@pytest.mark.parametrize(("name", "tree", "flagged"), LINK_CASES, ids=[c[0] for c in LINK_CASES])
def test_links_are_resolved_through_the_tree(make_repo, name, tree, flagged) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    head = commit_tree(repo, {"a.py": ("100644", "x = 1\n"), **tree}, base)
    loose = GitSettings(forbidden_paths=[], allow_binary=True, max_changed_files=1000, max_changed_lines=100000)
    got = sorted(v.path for v in check(open_repo(repo), base, head, loose).violations if v.rule == "symlink")
    assert got == sorted(flagged)


def test_resolve_link_explains_why() -> None:
    assert resolve_link({"a": ".", "b": "a/.."}, "b") == "it climbs above the top of the repository"
    assert "absolute" in (resolve_link({"a": "/etc"}, "a") or "")
    assert "absolute" in (resolve_link({"a": "/etc", "b": "a/x"}, "b") or "")
    assert "more than 40 links" in (resolve_link({"p": "q", "q": "p"}, "p") or "")
    assert resolve_link({"a": ".", "b": "a/a/x"}, "b") is None


def test_a_chain_completed_by_the_change_is_flagged(make_repo) -> None:
    """`b -> a/..` was harmless while `a` was a directory; turning `a` into `a -> .` makes b escape, though b
    itself is unchanged."""
    repo = make_repo()
    base = commit_tree(repo, {"a/f": FILE, "b": link("a/..")}, git(repo, "rev-parse", "HEAD"))
    head = commit_tree(repo, {"a": link("."), "b": link("a/..")}, base)
    (v,) = check(open_repo(repo), base, head, GitSettings()).violations
    assert (v.rule, v.path) == ("symlink", "b") and "climbs above the top" in v.detail


def test_a_link_the_host_already_had_is_not_the_change(make_repo) -> None:
    repo = make_repo()
    base = commit_tree(repo, {"old": link("../outside"), "f": FILE}, git(repo, "rev-parse", "HEAD"))
    head = commit_tree(repo, {"old": link("../outside"), "f": ("100644", "y\n")}, base)
    assert check(open_repo(repo), base, head, GitSettings()).ok
    moved = commit_tree(repo, {"old": link("../../elsewhere"), "f": FILE}, base)
    assert [(v.rule, v.path) for v in check(open_repo(repo), base, moved, GitSettings()).violations] == [
        ("symlink", "old")
    ]


def test_forbidden_paths_through_a_linked_directory_or_another_case(make_repo) -> None:
    """Red-team finding: a link at .github/workflows to a directory of the agent's, and the same path in
    another case (a case-insensitive checkout merges them), passed the gate."""
    repo = make_repo()

    def build(r: Path) -> None:
        (r / "ci").mkdir()
        (r / "ci" / "evil.yml").write_text("on: push\n")
        (r / ".github").mkdir()
        os.symlink("../ci", r / ".github" / "workflows")
        (r / ".GitHub" / "Workflows").mkdir(parents=True)
        (r / ".GitHub" / "Workflows" / "x.yml").write_text("on: push\n")
        os.symlink("ci2", r / ".gitlab")  # an unforbidden link is fine

    base, head = change(repo, build)
    res = check(open_repo(repo), base, head, GitSettings())
    got = {(v.rule, v.path) for v in res.violations}
    assert got == {("forbidden_paths", ".github/workflows"), ("forbidden_paths", ".GitHub/Workflows/x.yml")}
    link = next(v for v in res.violations if v.path == ".github/workflows")
    assert "a link where forbidden_paths covers" in link.detail
    # A link at the forbidden directory's parent covers it as well.
    repo2 = make_repo("repo2")
    base, head = change(repo2, lambda r: (os.mkdir(r / "ci2"), os.symlink("ci2", r / ".github")))
    assert [(v.rule, v.path) for v in check(open_repo(repo2), base, head, GitSettings()).violations] == [
        ("forbidden_paths", ".github")
    ]


def test_binary_after_8000_bytes_of_text_is_binary(make_repo) -> None:
    """Red-team finding: git's binary sniff reads 8,000 bytes; text followed by binary passed as text."""
    repo = make_repo()
    payload = b"A" * 9000 + bytes(range(256)) * 40
    base, head = change(repo, lambda r: ((r / "payload.bin").write_bytes(payload), (r / "ok.txt").write_text("x\n")))
    res = check(open_repo(repo), base, head, GitSettings())
    assert [(v.rule, v.path) for v in res.violations] == [("allow_binary", "payload.bin")]
    assert check(open_repo(repo), base, head, GitSettings(allow_binary=True)).ok
