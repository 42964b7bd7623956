"""A run's workspace as an overlay over the base commit's cached tree (run/workspace.py): mounted, a clean git
working tree from the start, every write in the run's own layer (inside its disk quota), the cached tree never
touched, and park, remount and release leave nothing behind. Real mounts and real git, no Docker: these need
root, loop devices and overlayfs, and are skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_sandbox.git import trees
from agent_sandbox.git.checkout import CONTAINER_OBJECTS, open_repo, remove_tree
from agent_sandbox.run import held_mounts, quota, workspace

from .conftest import git

AGENT = (1000, 1000)
WHY = workspace.overlay_unavailable() or quota.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no overlay workspace here: {WHY}")
SMALL = quota.Quota("filesystem", 64 * 1024**2)


def mounts_under(top: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == str(top) or point.startswith(f"{top}/"):
            out.append(point)
    return out


def loops_under(top: Path) -> list[str]:
    res = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    return [line for line in res.stdout.splitlines() if str(top) in line]


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory the agent's uid can walk down to (pytest's tmp_path is private to root); afterwards
    nothing may be mounted under it and no loop device may hold a file of it."""
    monkeypatch.delenv(workspace.MODE_ENV, raising=False)
    top = Path(tempfile.mkdtemp(prefix="sandbox-ws-"))
    top.chmod(0o755)
    d = top / "state"
    (d / "runs").mkdir(parents=True)
    yield d
    left = mounts_under(top)
    for point in sorted(left, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    loops = loops_under(top)
    remove_tree(top)
    assert left == [] and loops == [], f"left behind: {left} {loops}"


@pytest.fixture
def repo(state: Path) -> Path:
    """The host repository, where the agent's uid can read its objects (as the container can, mounted)."""
    r = state.parent / "repo"
    r.mkdir()
    git(r, "init", "-q", "--initial-branch", "main")
    files = {"a.py": "x = 1\n", "README.md": "# r\n", "pkg/b.txt": "b\n", "big.bin": "0" * 300_000}
    for rel, content in files.items():
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_text(content)
    git(r, "add", "-A")
    git(r, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "initial")
    return r


def prepare(state: Path, repo: Path, name: str = "r1", q: quota.Quota = SMALL) -> tuple[Path, workspace.Prepared]:
    run_dir = state / "runs" / name
    run_dir.mkdir()
    made = workspace.prepare(run_dir, open_repo(repo), git(repo, "rev-parse", "HEAD"), f"sandbox/{name}", q, AGENT)
    return run_dir, made


def as_agent(ws: Path, repo: Path, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command in the workspace as the agent's uid, with the host's objects where the container has them."""
    e = {
        "PATH": os.environ["PATH"],
        "HOME": "/tmp",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(repo / ".git" / "objects"),
        **(env or {}),
    }
    return subprocess.run(cmd, cwd=ws, env=e, capture_output=True, text=True, user=AGENT[0], group=AGENT[1])


def sh(ws: Path, repo: Path, script: str) -> str:
    res = as_agent(ws, repo, "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    return res.stdout


def the_tree(run_dir: Path) -> trees.Tree:
    record = json.loads((run_dir / workspace.RECORD).read_text())
    return trees.Tree(Path(record["trees"]) / record["tree"])


def snapshot(top: Path) -> dict[str, tuple[int, int, int, str]]:
    out = {}
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            p = Path(root, n)
            st = p.lstat()
            body = os.readlink(p) if p.is_symlink() else (p.read_text() if p.is_file() else "")
            out[str(p.relative_to(top))] = (st.st_mode, st.st_uid, st.st_mtime_ns, body)
    return out


def test_the_workspace_is_an_overlay_with_a_clean_git_working_tree(state, repo) -> None:
    run_dir, made = prepare(state, repo)
    assert (made.mode, made.cached) == ("overlay", False) and made.seconds > 0
    ws = run_dir / "workspace"
    kinds = {
        line.split()[4]: line.split(" - ")[1].split()[0]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    }
    assert kinds[str(ws)] == "overlay" and kinds[str(run_dir / "layer")] == "ext4"
    # The host's paths are not in the overlay's options (the agent reads them in /proc/self/mountinfo).
    (options,) = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {ws} " in line]
    assert "lowerdir=../../trees/" in options and str(state) not in options.split(" - ")[1]
    assert "nosuid" in options and "nodev" in options
    g = ws / ".git"
    assert (g / "objects" / "info" / "alternates").read_text() == f"{CONTAINER_OBJECTS}\n"
    assert (g / "HEAD").read_text() == "ref: refs/heads/sandbox/r1\n"
    assert (g / "refs" / "heads" / "sandbox" / "r1").read_text().strip() == git(repo, "rev-parse", "HEAD")
    assert ws.stat().st_uid == AGENT[0] and (g / "index").stat().st_uid == AGENT[0]
    assert all(p.lstat().st_uid == AGENT[0] for p in g.rglob("*"))
    # `git status` as the agent: clean, and not a single file read to find out (trace2: sum_scan 0), with the
    # workspace's config and with the finaliser's (default checkStat, ctime trusted) alike.
    before = (g / "index").stat().st_mtime_ns
    for extra in ([], ["-c", "core.checkStat=default", "-c", "core.trustctime=true"]):
        res = as_agent(ws, repo, "git", *extra, "status", "--porcelain", env={"GIT_TRACE2_PERF": "1"})
        assert res.returncode == 0 and res.stdout == "", res.stderr[-2000:]
        assert "refresh/sum_scan:0" in res.stderr, res.stderr[-2000:]
    assert (g / "index").stat().st_mtime_ns == before
    assert sh(ws, repo, "git log --format=%s") == "initial\n"
    # The run's writes so far (its .git) are in its layer; the cached tree has no .git.
    assert (run_dir / "layer" / "upper" / ".git" / "HEAD").is_file()
    assert not (the_tree(run_dir).files / ".git").exists()
    workspace.release_run(run_dir)


def test_writes_land_in_the_layer_and_the_cached_tree_stays_pristine(state, repo) -> None:
    run_dir, _ = prepare(state, repo)
    ws = run_dir / "workspace"
    tree = the_tree(run_dir)
    pristine = snapshot(tree.files)
    index = tree.index.read_bytes()
    out = sh(
        ws,
        repo,
        "echo changed >> a.py && rm README.md && mv pkg pkg2 && ln pkg2/b.txt hard && echo via-link >> hard"
        " && chmod 600 big.bin && echo new > new.txt && git add -A && git -c user.name=a -c user.email=a@b"
        " commit -q -m work && git status --porcelain && echo ok",
    )
    assert out == "ok\n"
    assert snapshot(tree.files) == pristine and tree.index.read_bytes() == index
    upper = run_dir / "layer" / "upper"
    assert (upper / "a.py").read_text() == "x = 1\nchanged\n" and (upper / "new.txt").is_file()
    assert (ws / "pkg2" / "b.txt").read_text() == "b\nvia-link\n"
    # A second run on the same commit: the cached tree, as committed.
    run2, made2 = prepare(state, repo, "r2")
    assert made2.cached is True and the_tree(run2) == tree
    ws2 = run2 / "workspace"
    assert (
        (ws2 / "a.py").read_text() == "x = 1\n" and (ws2 / "README.md").is_file() and (ws2 / "pkg" / "b.txt").is_file()
    )
    assert as_agent(ws2, repo, "git", "status", "--porcelain").stdout == ""
    workspace.release_run(run_dir)
    workspace.release_run(run2)
    assert snapshot(tree.files) == pristine


def test_the_disk_limit_holds_for_writes_and_for_copies_of_the_trees_files(state, repo) -> None:
    run_dir, _ = prepare(state, repo)
    ws = run_dir / "workspace"
    res = as_agent(ws, repo, "sh", "-c", "dd if=/dev/zero of=fill bs=1M count=100 2>&1; echo rc=$?")
    assert "No space left on device" in res.stdout and "rc=1" in res.stdout
    # Full: the copies of the tree's files that changes make are in the layer too, so the layer's filesystem,
    # and so the image on the host's disk, never grows past the limit, whatever the agent changes.
    as_agent(
        ws,
        repo,
        "sh",
        "-c",
        "for f in big.bin a.py pkg/b.txt; do cat big.bin >> $f; done; dd if=/dev/zero of=more bs=1M count=10",
    )
    assert (run_dir / "layer.img").stat().st_blocks * 512 <= SMALL.size_bytes
    assert (run_dir / "layer.img").stat().st_size == SMALL.size_bytes
    assert (the_tree(run_dir).files / "big.bin").stat().st_size == 300_000
    assert workspace.disk_root(run_dir) == run_dir / "layer" / "upper"
    workspace.release_run(run_dir)


def test_park_remount_release_round_trip(state, repo) -> None:
    run_dir, _ = prepare(state, repo)
    ws = run_dir / "workspace"
    sh(ws, repo, "echo work > work.txt && git add work.txt && git -c user.name=a -c user.email=a@b commit -qm w")
    kept = workspace.park(run_dir)
    assert kept == str(run_dir / "layer.img") and mounts_under(run_dir) == [] and loops_under(run_dir) == []
    assert (run_dir / workspace.RECORD).is_file(), "a parked run still stands on its tree"
    # gc evicts nothing a parked run stands on, however old.
    tree = the_tree(run_dir)
    os.utime(tree.path / "used", (0, 0))
    assert trees.evict(workspace.trees_dir(run_dir), lambda: workspace.in_use(state / "runs"), grace=0) == []
    workspace.remount(run_dir)
    assert (ws / "work.txt").read_text() == "work\n" and sh(ws, repo, "git log -1 --format=%s") == "w\n"
    assert workspace.release_run(run_dir) == [f"filesystem:{ws}", f"filesystem:{run_dir / 'layer'}"]
    assert sorted(p.name for p in run_dir.iterdir()) == []
    # Released: nothing references the tree any more, and gc may take it (past the few most recent kept).
    in_use = lambda: workspace.in_use(state / "runs")  # noqa: E731
    assert trees.evict(workspace.trees_dir(run_dir), in_use, grace=0, keep_per_repo=0) == [tree.name]


def test_remount_after_a_reboot_rebuilds_an_evicted_tree(state, repo) -> None:
    run_dir, _ = prepare(state, repo)
    ws = run_dir / "workspace"
    sh(ws, repo, "echo work >> a.py && rm README.md")
    workspace.park(run_dir)
    tree = the_tree(run_dir)
    remove_tree(tree.path)  # gone, whatever took it
    workspace.remount(run_dir)
    assert (ws / "a.py").read_text() == "x = 1\nwork\n" and not (ws / "README.md").exists()
    assert (ws / "pkg" / "b.txt").read_text() == "b\n"
    assert sh(ws, repo, "git status --porcelain") == " D README.md\n M a.py\n"
    workspace.release_run(run_dir)


def test_keep_leaves_a_plain_copy_of_the_workspace(state, repo) -> None:
    run_dir, _ = prepare(state, repo)
    ws = run_dir / "workspace"
    sh(ws, repo, "echo kept > kept.txt && rm a.py")
    workspace.release_run(run_dir, keep=True)
    assert mounts_under(run_dir) == [] and not (run_dir / "layer").exists() and not (run_dir / "layer.img").exists()
    assert (ws / "kept.txt").read_text() == "kept\n" and not (ws / "a.py").exists() and (ws / ".git" / "HEAD").is_file()
    assert not (run_dir / workspace.RECORD).exists()
    remove_tree(ws)


def test_release_removes_what_a_hostile_agent_left_unreadable(state, repo) -> None:
    run_dir, _ = prepare(state, repo)
    ws = run_dir / "workspace"
    sh(
        ws,
        repo,
        "mkdir -p locked/inner && echo x > locked/inner/f && ln -s / root-link && ln -s /etc locked/etc"
        " && chmod 000 locked/inner && chmod 500 locked && chmod 000 pkg && chmod 500 .",
    )
    workspace.release_run(run_dir)
    remove_tree(ws)
    assert sorted(p.name for p in run_dir.iterdir()) == []
    assert Path("/etc/hostname").exists() or Path("/etc/passwd").exists()


def test_a_sampled_quota_puts_the_layer_in_a_plain_directory(state, repo) -> None:
    run_dir, made = prepare(state, repo, q=quota.Quota("sampled", 64 * 1024**2, "test"))
    assert made.mode == "overlay" and mounts_under(run_dir) == [str(run_dir / "workspace")]
    ws = run_dir / "workspace"
    sh(ws, repo, "head -c 1000000 /dev/zero > grown.bin")
    from agent_sandbox.run.output import tree_size

    assert 1_000_000 <= tree_size(workspace.disk_root(run_dir)) < 2_000_000  # the layer alone, not the tree
    assert workspace.park(run_dir) == str(run_dir / "layer" / "upper") and mounts_under(run_dir) == []
    workspace.remount(run_dir)
    assert (ws / "grown.bin").stat().st_size == 1_000_000
    workspace.release_run(run_dir)
    remove_tree(ws)
    assert sorted(p.name for p in run_dir.iterdir()) == []


def test_without_an_overlay_the_workspace_is_a_full_checkout(state, repo, monkeypatch) -> None:
    monkeypatch.setenv(workspace.MODE_ENV, "copy")
    run_dir, made = prepare(state, repo)
    assert (made.mode, made.cached, made.detail) == ("copy", None, f"{workspace.MODE_ENV}=copy")
    ws = run_dir / "workspace"
    assert mounts_under(run_dir) == [str(ws)] and not (state / "trees").exists()
    assert sh(ws, repo, "git status --porcelain") == "" and workspace.disk_root(run_dir) == ws
    assert workspace.park(run_dir) == str(run_dir / "workspace.img")
    workspace.remount(run_dir)
    assert (ws / "a.py").is_file()
    workspace.release_run(run_dir)
    remove_tree(ws)
    assert sorted(p.name for p in run_dir.iterdir()) == []


def test_an_overlay_the_kernel_refuses_falls_back_to_a_copy(state, repo, monkeypatch) -> None:
    real: Callable[..., None] = quota.mount_in

    def refuse(cwd, *args: str) -> None:
        if "overlay" in args:
            real(cwd, "-t", "overlay", "-o", "lowerdir=/nonexistent-lower", "x", "workspace")
        real(cwd, *args)

    monkeypatch.setattr(quota, "mount_in", refuse)
    run_dir, made = prepare(state, repo)
    assert made.mode == "copy" and "overlay could not be mounted" in made.detail
    ws = run_dir / "workspace"
    assert mounts_under(run_dir) == [str(ws)] and not (run_dir / "layer").exists()
    assert sh(ws, repo, "git status --porcelain") == ""
    workspace.release_run(run_dir)
    remove_tree(ws)


# --- a pooled agent's mount points (held_mounts.py) -------------------------------------------------------------


def pooled(state: Path, name: str = "p1") -> tuple[Path, Path]:
    """A slot's run directory with its two points, and a second namespace's view of it: a bind of the workspace
    point made `rslave` elsewhere, as the held container's mount is."""
    run_dir = state / "runs" / name
    run_dir.mkdir()
    held_mounts.make(run_dir)
    seen = state.parent / f"{name}-seen"
    seen.mkdir()
    subprocess.run(["mount", "--bind", str(run_dir / "workspace"), str(seen)], check=True)
    subprocess.run(["mount", "--make-rslave", str(seen)], check=True)
    return run_dir, seen


def test_a_pooled_workspace_reaches_a_view_made_before_it_and_goes_with_the_run(state, repo) -> None:
    run_dir, seen = pooled(state)
    assert quota.mounts_at(run_dir / "workspace") == 1 and not os.path.ismount(run_dir / "workspace")
    made = workspace.prepare(run_dir, open_repo(repo), git(repo, "rev-parse", "HEAD"), "sandbox/p1", SMALL, AGENT)
    assert made.mode == "overlay"
    # The overlay mounted on the point after the view was made shows in the view (as in the held container).
    assert (seen / "a.py").read_text() == "x = 1\n" and (seen / ".git" / "HEAD").is_file()
    sh(seen, repo, "echo seen > from-view.txt")
    assert (run_dir / "workspace" / "from-view.txt").read_text() == "seen\n"
    released = workspace.release_run(run_dir)
    assert f"filesystem:{run_dir / 'workspace'}" in released and f"mount:{run_dir / 'host-objects'}" in released
    assert mounts_under(run_dir) == [] and sorted(p.name for p in run_dir.iterdir()) == []
    # The release travelled to the view too: nothing of the run's stays visible there.
    assert list(seen.iterdir()) == []
    subprocess.run(["umount", str(seen)], check=True)


def test_the_objects_bound_on_a_pooled_point_are_read_only_everywhere(state, repo) -> None:
    run_dir, _seen = pooled(state)
    view = state.parent / "objects-seen"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(run_dir / "host-objects"), str(view)], check=True)
    subprocess.run(["mount", "--make-rslave", str(view)], check=True)
    objects = repo / ".git" / "objects"
    held_mounts.bind_objects(run_dir, objects)
    for where in (run_dir / "host-objects", view):
        assert sorted(p.name for p in where.iterdir()) == sorted(p.name for p in objects.iterdir())
        # Even root, who ignores file modes, meets a read-only filesystem: the flag came with the bind.
        with pytest.raises(OSError) as err:
            (where / "planted").write_text("x")
        assert err.value.errno == 30  # EROFS
        point = [
            ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines() if ln.split()[4] == str(where)
        ]
        assert point[-1][5].split(",")[:4] == ["ro", "nosuid", "nodev", "noexec"], point
    assert not (objects / "planted").exists()
    # Parked (a run whose work waits for gc): the points go, the host's objects with them.
    workspace.park(run_dir)
    assert mounts_under(run_dir) == [] and list(view.iterdir()) == []
    assert not (run_dir / "host-objects").exists()
    for v in (view, _seen):
        subprocess.run(["umount", str(v)], check=True)


def test_mounts_at_counts_stacked_mounts_on_an_awkward_path(state) -> None:
    odd = state / "a dir\twith\\odd name"
    odd.mkdir()
    assert quota.mounts_at(odd) == 0
    subprocess.run(["mount", "--bind", str(odd), str(odd)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "t", str(odd)], check=True)
    assert quota.mounts_at(odd) == 2
    quota.unmount(odd)
    assert quota.mounts_at(odd) == 0
