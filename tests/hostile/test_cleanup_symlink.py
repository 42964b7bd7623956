"""Class 9 (cleanup part) of issue 11: removing the agent's workspace never changes a host path through a
link the agent planted. The old clean-up chmodded whatever a failed removal named, following links, so a
link to a host directory inside a read-only directory of the workspace got that host directory's mode
changed. No Docker: the workspace is built here, as the agent would leave it."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_sandbox.git.checkout import remove_tree

NOBODY = 65534


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="sandbox-cleanup-"))
    d.chmod(0o755)
    yield d
    for root, dirs, _files in os.walk(d):
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    shutil.rmtree(d)


def as_unprivileged(fn: Callable[[], None]) -> None:
    """Run fn as the user who owns the workspace: root would not meet the permission errors at all."""
    if os.geteuid() != 0:
        fn()
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fn()
            code = 0
        except BaseException as exc:
            os.write(2, f"remove_tree failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "remove_tree failed in the unprivileged child"


def chown_tree(top: Path, uid: int) -> None:
    if os.geteuid() != 0:
        return
    os.lchown(top, uid, uid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.mark.parametrize("unreadable", [False, True], ids=["read-only", "read-only-and-unreadable"])
def test_cleanup_never_chmods_through_a_link(shared_tmp: Path, unreadable: bool) -> None:
    host = shared_tmp / "host"
    (host / "dir").mkdir(parents=True)
    secret = host / "secret"
    secret.write_text("host secret\n")
    secret.chmod(0o600)
    (host / "dir" / "keep.txt").write_text("keep\n")
    (host / "dir").chmod(0o755)
    run_dir = shared_tmp / "run"
    ws = run_dir / "workspace"
    ro = ws / "ro"
    (ro / "hidden" / "deeper").mkdir(parents=True)
    (ro / "hidden" / "deeper" / "f.txt").write_text("agent\n")
    (ro / "file.txt").write_text("agent\n")
    # Each link alone in a read-only directory: its removal is the first to fail there, so the clean-up's
    # error handling meets the link itself.
    links = {"to-secret": secret, "to-dir": host / "dir", "to-etc": Path("/etc")}
    for name, target in links.items():
        (ws / f"ro-{name}").mkdir()
        os.symlink(target, ws / f"ro-{name}" / name)
    os.symlink(host / "dir", ws / "top-to-dir")
    # Whoever removes the tree owns it (the agent's uid in a real run), and so do the host paths it could
    # reach: the ones a chmod by that user would succeed on.
    chown_tree(run_dir, NOBODY)
    chown_tree(host, NOBODY)
    if unreadable:
        (ro / "hidden" / "deeper").chmod(0o000)
        (ro / "hidden").chmod(0o500)
    for name in links:
        (ws / f"ro-{name}").chmod(0o555)
    ro.chmod(0o555)
    ws.chmod(0o555)
    etc_mode = mode(Path("/etc"))

    as_unprivileged(lambda: remove_tree(ws))

    assert not os.path.lexists(ws), "the workspace is gone"
    assert mode(secret) == 0o600 and secret.read_text() == "host secret\n"
    assert mode(host / "dir") == 0o755 and (host / "dir" / "keep.txt").read_text() == "keep\n"
    assert mode(Path("/etc")) == etc_mode


def test_a_workspace_that_is_a_link_is_unlinked_not_followed(shared_tmp: Path) -> None:
    target = shared_tmp / "target"
    target.mkdir()
    (target / "f").write_text("x\n")
    ws = shared_tmp / "workspace"
    os.symlink(target, ws)
    remove_tree(ws)
    assert not os.path.lexists(ws) and (target / "f").read_text() == "x\n"
    remove_tree(ws)  # gone already: nothing to do


def test_a_tree_deeper_than_a_recursive_walk_is_removed(tmp_path) -> None:
    from agent_sandbox.git.checkout import remove_tree

    top = tmp_path / "workspace"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    remove_tree(top)
    assert not top.exists()
