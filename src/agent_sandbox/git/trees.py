"""Read-only checkout trees, one per base commit, shared by every run that starts there.

Writing the working tree is what a checkout costs (30,000 files take seconds), and it is the same tree for
every run on the same commit. So the tree of a commit is written once, into the state directory's cache
(`trees/<key>/tree`, with the git index that matches it, `trees/<key>/index`), and each run gets a
copy-on-write layer over it instead of a copy (run/workspace.py mounts the overlay). A cached tree is never
modified after it is built: overlayfs forbids changing a lower directory while it is mounted, and every run
on the commit must see the same pristine tree.

The key is the host repository's object directory, the commit and the owner the files are given. A tree is
built in a temporary directory and renamed into place, under a lock per key, so two runs on one commit build
it once and a crash leaves no half-built tree. The build is as hardened as the per-run checkout: a fresh git
directory whose objects are borrowed from the host's through alternates, no system, global or repository
config (so no filter driver, hook or fsmonitor of the host's runs), content taken from the commit alone.

`sandbox gc` evicts what no run uses (`evict`): trees that no run directory references, not used within the
last minutes, and either idle for long or beyond the few most recently used of their repository.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent_sandbox.errors import SandboxError
from agent_sandbox.git.checkout import CONTAINER_OBJECTS, remove_tree

log = logging.getLogger(__name__)

KEEP_PER_REPO = 3  # the most recently used trees of a repository that gc keeps, used or not
MAX_IDLE = 7 * 24 * 3600.0  # seconds: an unused tree older than this goes, whatever its rank
GRACE = 600.0  # seconds: a tree used this recently is never evicted (a run may be about to mount it)

# Git as the cache uses it: nothing of the host's configuration, no hooks, no fsmonitor, no attribute file.
_CONFIG = [
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.attributesFile=/dev/null",
    "-c",
    "core.untrackedCache=false",
    "-c",
    "core.splitIndex=false",
    "-c",
    "index.sparse=false",
    "-c",
    "core.symlinks=true",
    "-c",
    "core.autocrlf=false",
    "-c",
    "gc.auto=0",
]


def git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null", GIT_TERMINAL_PROMPT="0")
    env["GIT_NO_REPLACE_OBJECTS"] = "1"
    return env


def git(*args: str, cwd: Path | None = None) -> str:
    """Run git with the cache's hardened settings; a failure is a SandboxError with git's message."""
    proc = subprocess.run(
        ["git", *_CONFIG, *args], cwd=cwd, env=git_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise SandboxError(f"git {args[0] if args else ''} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout


@dataclass(frozen=True)
class Tree:
    """One cached tree: `tree/` (the files), `index` (the git index that matches them), `meta.json`, `used`."""

    path: Path

    @property
    def files(self) -> Path:
        return self.path / "tree"

    @property
    def index(self) -> Path:
        return self.path / "index"

    @property
    def name(self) -> str:
        return self.path.name

    def complete(self) -> bool:
        return (self.path / "meta.json").is_file() and self.index.is_file() and self.files.is_dir()

    def meta(self) -> dict[str, object]:
        try:
            data = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def last_used(self) -> float:
        for name in ("used", "meta.json"):
            with contextlib.suppress(OSError):
                return (self.path / name).stat().st_mtime
        return 0.0

    def touch(self) -> None:
        """Mark it used now (gc keeps the recently used); outside `tree/`, which never changes."""
        (self.path / "used").touch()


def key(objects: Path, commit: str, owner: tuple[int, int] | None) -> str:
    """The cache key: which repository's objects (by path), which commit, and who owns the files."""
    who = f"{owner[0]}:{owner[1]}" if owner else "-"
    digest = hashlib.sha256(f"{os.path.realpath(objects)}\0{who}".encode()).hexdigest()[:16]
    return f"{digest}-{commit}"


def _valid_commit(commit: str) -> bool:
    return len(commit) in (40, 64) and all(c in "0123456789abcdef" for c in commit)


@contextlib.contextmanager
def _locked(trees_dir: Path, name: str, blocking: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock of one key (`<name>.lock`); yields False when not blocking and it is taken.
    The lock file may be removed by eviction while another process waits on it: the holder checks that the
    file it locked is still the one at the path, and tries again if not."""
    path = trees_dir / f"{name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        try:
            yield True
        finally:
            os.close(fd)
        return


def _cache_dir(trees_dir: Path) -> None:
    # Only the supervisor's user reaches the cache: the trees belong to the agent's uid, and another user of
    # the host with that uid must not be able to change what the next run starts from. The overlay mount
    # reaches its lower directory with the mounter's rights, so this costs the containers nothing.
    trees_dir.mkdir(parents=True, exist_ok=True)
    if trees_dir.stat().st_uid == os.geteuid():
        os.chmod(trees_dir, 0o700)


@contextlib.contextmanager
def acquire(trees_dir: Path, objects: Path, commit: str, owner: tuple[int, int] | None) -> Iterator[tuple[Tree, bool]]:
    """The tree of `commit`, built now unless cached; yields (tree, cached). The key's lock is held inside the
    block: write what references the tree (the run's record) there, and gc cannot evict it in between."""
    if not _valid_commit(commit):
        raise SandboxError(f"not a full commit id: {commit!r}")
    _cache_dir(trees_dir)
    name = key(objects, commit, owner)
    with _locked(trees_dir, name):
        tree = Tree(trees_dir / name)
        cached = tree.complete()
        if not cached:
            if tree.path.exists():  # never complete: a build renamed into place cannot be partial; clear it
                remove_tree(tree.path)
            _build(trees_dir, tree, objects, commit, owner)
        tree.touch()
        yield tree, cached


def _build(trees_dir: Path, tree: Tree, objects: Path, commit: str, owner: tuple[int, int] | None) -> None:
    started = time.monotonic()
    tmp = trees_dir / f".build-{tree.name}"
    remove_tree(tmp)  # a build that died (its lock is ours now)
    tmp.mkdir()
    try:
        gitdir, files = tmp / "git", tmp / "tree"
        files.mkdir()
        git("init", "-q", "--bare", "--template=", str(gitdir))
        (gitdir / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (gitdir / "objects" / "info" / "alternates").write_text(f"{objects}\n")
        wt = ["--git-dir", str(gitdir), "--work-tree", str(files), "-c", "core.bare=false"]
        # read-tree -u writes the files and the index, as a checkout does; no hook runs for it.
        git(*wt, "read-tree", "--reset", "-u", commit, cwd=files)
        count = 0
        if owner is not None:
            uid, gid = owner
            for root, dirs, names in os.walk(files):
                os.chown(root, uid, gid)
                for n in dirs + names:
                    os.lchown(os.path.join(root, n), uid, gid)
                count += len(names)
        else:
            count = sum(len(names) for _r, _d, names in os.walk(files))
        # The index must describe the files exactly as they now are (owner, ctime), so that git in the run, and
        # the finaliser, find every entry clean without reading a file. An entry written in the same second
        # as the index is "racily clean" and would be hashed again on every `git status`: wait for the clock
        # to pass that second, then refresh, which rewrites the index with a later time.
        time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))
        git(*wt, "update-index", "-q", "--refresh", cwd=files)
        os.replace(gitdir / "index", tmp / "index")
        remove_tree(gitdir)
        (tmp / "meta.json").write_text(
            json.dumps(
                {
                    "objects": str(objects),
                    "commit": commit,
                    "owner": list(owner) if owner else None,
                    "files": count,
                    "built_at": time.time(),
                    "build_seconds": round(time.monotonic() - started, 3),
                }
            )
        )
        os.rename(tmp, tree.path)
    except BaseException:
        with contextlib.suppress(Exception):
            remove_tree(tmp)
        raise
    log.info("tree_built key=%s files=%d seconds=%.2f", tree.name, count, time.monotonic() - started)


def find(trees_dir: Path, name: str) -> Tree | None:
    t = Tree(trees_dir / name)
    return t if t.complete() else None


def init_git(dest: Path, objects: Path, commit: str, branch: str, index: Path, owner: tuple[int, int] | None) -> None:
    """The run's repository in `dest`, a view of a cached tree: `.git` with the host's objects borrowed, the
    branch at `commit`, and the tree's index, so that the working tree is clean from the start.

    Its config tells git to compare only the size and modification time of a file with its index entry
    (`core.checkStat=minimal`, `core.trustctime=false`): the index was taken on the cache's tree, and a view
    of it may differ in device and change time, which would make git read every file again."""
    gitdir = dest / ".git"
    if gitdir.exists() or gitdir.is_symlink():
        raise SandboxError(f"the workspace {dest} already holds a .git")
    git("init", "-q", "--initial-branch", "sandbox-init", str(dest))
    alternates = gitdir / "objects" / "info" / "alternates"
    alternates.write_text(f"{objects}\n")
    git("update-ref", f"refs/heads/{branch}", commit, cwd=dest)
    git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=dest)
    with (gitdir / "config").open("a") as f:
        f.write("[core]\n\tcheckStat = minimal\n\ttrustctime = false\n")
    shutil.copyfile(index, gitdir / "index")
    # From here on the path that matters is the one inside the container.
    alternates.write_text(f"{CONTAINER_OBJECTS}\n")
    if owner is not None:
        uid, gid = owner
        os.chown(dest, uid, gid)
        for root, dirs, names in os.walk(gitdir):
            os.chown(root, uid, gid)
            for n in dirs + names:
                os.lchown(os.path.join(root, n), uid, gid)


def evict(
    trees_dir: Path,
    in_use: Callable[[], set[str]],
    now: float | None = None,
    keep_per_repo: int = KEEP_PER_REPO,
    max_idle: float = MAX_IDLE,
    grace: float = GRACE,
) -> list[str]:
    """Remove the cached trees nobody needs; returns their names. A tree stays while a run directory references
    it (`in_use()`, asked again under the tree's lock, so a run that takes it meanwhile keeps it), while it was
    used within `grace` seconds, and while it is among the `keep_per_repo` most recently used of its
    repository and used within `max_idle` seconds. Builds that died half-way go too."""
    if not trees_dir.is_dir():
        return []
    now = time.time() if now is None else now
    trees = [Tree(p) for p in trees_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    by_repo: dict[str, list[Tree]] = {}
    for t in trees:
        by_repo.setdefault(str(t.meta().get("objects", "")), []).append(t)
    candidates: list[Tree] = []
    for group in by_repo.values():
        group.sort(key=lambda t: t.last_used(), reverse=True)
        for rank, t in enumerate(group):
            idle = now - t.last_used()
            if idle < grace:
                continue
            if rank >= keep_per_repo or idle > max_idle or not t.complete():
                candidates.append(t)
    removed: list[str] = []
    for t in candidates:
        with _locked(trees_dir, t.name, blocking=False) as held:
            if not held or t.name in in_use():
                continue
            doomed = trees_dir / f".evict-{t.name}"
            remove_tree(doomed)
            os.rename(t.path, doomed)
            (trees_dir / f"{t.name}.lock").unlink(missing_ok=True)
        remove_tree(doomed)
        removed.append(t.name)
        log.info("tree_evicted key=%s", t.name)
    # Leftovers: a build or an eviction that died (nobody holds their key's lock).
    for p in trees_dir.iterdir():
        for prefix in (".build-", ".evict-"):
            if p.name.startswith(prefix):
                name = p.name[len(prefix) :]
                with _locked(trees_dir, name, blocking=False) as held:
                    if held:
                        remove_tree(p)
                        if not (trees_dir / name).exists():
                            (trees_dir / f"{name}.lock").unlink(missing_ok=True)
    return removed
