"""The cache of checkout trees (git/trees.py): one tree per base commit, built once and atomically, never
changed, and evicted only when no run stands on it. Real git, no Docker, no mounts."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent_sandbox.errors import SandboxError
from agent_sandbox.git import trees

from .conftest import git


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD")


def objects(repo: Path) -> Path:
    return repo / ".git" / "objects"


def test_a_tree_is_the_commit_with_an_index_that_matches_it(make_repo, tmp_path) -> None:
    repo = make_repo(files={"a.py": "x = 1\n", "pkg/b.txt": "b\n", "run.sh": "#!/bin/sh\n"})
    (repo / "run.sh").chmod(0o755)
    os.symlink("a.py", repo / "link")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "more")
    (repo / "a.py").write_text("dirty, not committed\n")  # the host's working tree plays no part
    where = tmp_path / "trees"
    with trees.acquire(where, objects(repo), head(repo), None) as (tree, cached):
        assert not cached and tree.complete()
    files = tree.files
    assert (files / "a.py").read_text() == "x = 1\n" and (files / "pkg" / "b.txt").read_text() == "b\n"
    assert os.access(files / "run.sh", os.X_OK) and os.readlink(files / "link") == "a.py"
    assert not (files / ".git").exists(), "the tree is files only: no git directory in it"
    assert sorted(p.name for p in tree.path.iterdir()) == ["index", "meta.json", "tree", "used"]
    meta = tree.meta()
    assert meta["commit"] == head(repo) and meta["objects"] == str(objects(repo)) and meta["files"] == 4
    # The index lists exactly the commit's files, none of them racily clean (size 0 would force a re-read).
    env = {**os.environ, "GIT_INDEX_FILE": str(tree.index)}
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "--debug"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert listed.count("  size: 0\t") == 0 and "pkg/b.txt" in listed
    assert (where.stat().st_mode & 0o777) == 0o700, "only the supervisor's user reaches the cache"


def test_a_second_acquire_uses_the_cache_and_keys_differ_by_commit_repo_and_owner(make_repo, tmp_path) -> None:
    repo = make_repo()
    where = tmp_path / "trees"
    c1 = head(repo)
    with trees.acquire(where, objects(repo), c1, None) as (t1, cached):
        assert not cached
    inode = t1.files.stat().st_ino
    with trees.acquire(where, objects(repo), c1, None) as (again, cached):
        assert cached and again == t1 and again.files.stat().st_ino == inode
    (repo / "a.py").write_text("x = 2\n")
    git(repo, "commit", "-q", "-am", "two")
    with trees.acquire(where, objects(repo), head(repo), None) as (t2, cached):
        assert not cached and t2 != t1 and (t2.files / "a.py").read_text() == "x = 2\n"
    other = make_repo("other")
    assert trees.key(objects(other), c1, None) != trees.key(objects(repo), c1, None)
    assert trees.key(objects(repo), c1, (1000, 1000)) != trees.key(objects(repo), c1, None)


def test_concurrent_runs_on_one_commit_build_it_once(make_repo, tmp_path, monkeypatch) -> None:
    repo = make_repo()
    where = tmp_path / "trees"
    builds = []
    real = trees._build

    def counting(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # long enough for every other thread to be waiting on the lock
        real(*args, **kwargs)

    monkeypatch.setattr(trees, "_build", counting)
    got: list[tuple[str, bool]] = []

    def take() -> None:
        with trees.acquire(where, objects(repo), head(repo), None) as (tree, cached):
            got.append((tree.name, cached))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert len({name for name, _ in got}) == 1 and sorted(c for _, c in got) == [False] + [True] * 5


def test_a_failed_build_leaves_nothing_and_a_half_built_tree_is_never_used(make_repo, tmp_path) -> None:
    repo = make_repo()
    where = tmp_path / "trees"
    with pytest.raises(SandboxError), trees.acquire(where, objects(repo), "f" * 40, None):
        pass
    assert [p for p in where.iterdir() if not p.name.endswith(".lock")] == []
    # A build that died mid-way (its temporary directory), and a directory without its index under the final
    # name (no build ever renames one into place, but should it exist): neither is taken for a tree.
    name = trees.key(objects(repo), head(repo), None)
    (where / f".build-{name}" / "tree").mkdir(parents=True)
    (where / name / "tree").mkdir(parents=True)
    (where / name / "tree" / "junk").write_text("half")
    with trees.acquire(where, objects(repo), head(repo), None) as (tree, cached):
        assert not cached and sorted(p.name for p in tree.files.iterdir()) == ["README.md", "a.py"]
    assert not (where / f".build-{name}").exists()


def test_not_a_full_commit_id_is_refused(make_repo, tmp_path) -> None:
    repo = make_repo()
    for bad in ("HEAD", "../../etc", head(repo)[:12], head(repo).upper()):
        with pytest.raises(SandboxError), trees.acquire(tmp_path / "trees", objects(repo), bad, None):
            pass


def test_the_build_runs_nothing_of_the_host_configuration(make_repo, tmp_path, monkeypatch) -> None:
    # A smudge filter in the host's global config and the repository's own config, a .gitattributes that asks
    # for it, hooks: the cached tree must hold the committed bytes, and nothing may have run.
    marker = tmp_path / "ran"
    repo = make_repo(files={"a.txt": "committed\n", ".gitattributes": "*.txt filter=evil\n"})
    evil = f"sh -c 'touch {marker}; echo smudged'"
    git(repo, "config", "filter.evil.smudge", evil)
    git(repo, "config", "core.hooksPath", str(tmp_path))
    (tmp_path / "post-checkout").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (tmp_path / "post-checkout").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(f'[filter "evil"]\n\tsmudge = {evil}\n\trequired = true\n')
    monkeypatch.setenv("HOME", str(home))
    with trees.acquire(tmp_path / "trees", objects(repo), head(repo), None) as (tree, _):
        assert (tree.files / "a.txt").read_text() == "committed\n"
    assert not marker.exists()


def _age(tree: trees.Tree, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(tree.path / "used", (t, t))


def test_eviction_keeps_what_runs_use_and_what_was_used_recently(make_repo, tmp_path) -> None:
    repo = make_repo()
    where = tmp_path / "trees"
    made = []
    for i in range(6):
        (repo / "a.py").write_text(f"x = {i}\n")
        git(repo, "commit", "-q", "-am", f"c{i}")
        with trees.acquire(where, objects(repo), head(repo), None) as (tree, _):
            made.append(tree)
    # Oldest first: made[0] is the least recently used.
    for age, tree in zip((5000, 4000, 3000, 2000, 1000, 10), made, strict=True):
        _age(tree, age)
    in_use = {made[0].name}
    removed = trees.evict(where, lambda: in_use, keep_per_repo=2, grace=600)
    # Kept: the two most recently used (made[5], made[4]) and made[0], which a run stands on.
    assert sorted(removed) == sorted(t.name for t in made[1:4])
    assert [t.complete() for t in made] == [True, False, False, False, True, True]
    assert not list(where.glob(".evict-*"))
    assert not (where / f"{made[1].name}.lock").exists()
    # Idle past max_idle: gone even among the most recent, unless in use.
    _age(made[4], 10 * 24 * 3600)
    _age(made[0], 10 * 24 * 3600)
    assert trees.evict(where, lambda: in_use, keep_per_repo=5, max_idle=7 * 24 * 3600) == [made[4].name]
    # Used within the grace period: kept whatever its rank.
    assert trees.evict(where, lambda: set(), keep_per_repo=0, grace=600) == [made[0].name]
    assert made[5].complete()
    # A tree whose lock is held (a run taking it right now) is left alone.
    with trees._locked(where, made[5].name):
        assert trees.evict(where, lambda: set(), keep_per_repo=0, grace=0) == []
    assert made[5].complete()
    assert trees.evict(where, lambda: set(), keep_per_repo=0, grace=0) == [made[5].name]
    assert sorted(p.name for p in where.iterdir()) == []


def test_eviction_asks_who_uses_a_tree_under_its_lock(make_repo, tmp_path) -> None:
    repo = make_repo()
    where = tmp_path / "trees"
    with trees.acquire(where, objects(repo), head(repo), None) as (tree, _):
        pass
    _age(tree, 10 * 24 * 3600)
    asked = []

    def in_use() -> set[str]:
        asked.append(True)
        return {tree.name}  # a run wrote its record after the candidates were chosen

    assert trees.evict(where, in_use) == [] and asked and tree.complete()


def test_eviction_bounds_each_repository_separately(make_repo, tmp_path) -> None:
    where = tmp_path / "trees"
    names = {}
    for r in ("one", "two"):
        repo = make_repo(r)
        names[r] = []
        for i in range(3):
            (repo / "a.py").write_text(f"x = {i}\n")
            git(repo, "commit", "-q", "-am", f"c{i}")
            with trees.acquire(where, objects(repo), head(repo), None) as (tree, _):
                _age(tree, 3600 * (3 - i))
                names[r].append(tree.name)
    removed = trees.evict(where, lambda: set(), keep_per_repo=2)
    assert sorted(removed) == sorted([names["one"][0], names["two"][0]])
    meta = json.loads((where / names["one"][2] / "meta.json").read_text())
    assert meta["objects"].endswith("one/.git/objects")


def test_gc_evicts_the_trees_no_run_directory_stands_on(make_repo, state_dir) -> None:
    from agent_sandbox.run import orphans, workspace

    repo = make_repo()
    where = state_dir / "trees"
    made = []
    for i in range(2):
        (repo / "a.py").write_text(f"x = {i}\n")
        git(repo, "commit", "-q", "-am", f"c{i}")
        with trees.acquire(where, objects(repo), head(repo), None) as (tree, _):
            made.append(tree)
        _age(tree, 30 * 24 * 3600)
    run_dir = state_dir / "runs" / "20260101-000000-abcdef"
    run_dir.mkdir(parents=True)
    (run_dir / workspace.RECORD).write_text(json.dumps({"mode": "overlay", "tree": made[0].name}))
    assert workspace.in_use(state_dir / "runs") == {made[0].name}
    assert orphans.evict_trees() == [made[1].name]
    assert made[0].complete() and not made[1].path.exists()
