"""The two mount points through which an agent's container made before its run (fleet/pool.py) receives the
run's workspace and the repository's objects, once the run that claims it has them.

A container's bind mounts are fixed when it is created, and the pool creates the agent's container before
there is a workspace. So its /workspace and its /sandbox/host-objects are binds of two mount points in the
run directory, each a bind of the directory onto itself in a peer group of its own (shared), bound into the
container as `rslave`: a mount the run makes on one of them later appears in the container too, and nothing
travels the other way (the agent has no capability to mount anything anyway).

The objects are the host repository's own: they must reach the container read-only from their first
instant. `mount --bind -o ro` (util-linux 2.38) binds read-write and remounts read-only after, and the copy
the kernel propagated in between would stay read-write in the container. The bind is made with the kernel's
mount API instead: cloned detached, made read-only, nosuid, nodev and noexec, then attached; every copy the
kernel propagates keeps those flags.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path

from agent_sandbox.run import quota

log = logging.getLogger(__name__)

WORKSPACE = "workspace"
OBJECTS = "host-objects"
POINTS = (WORKSPACE, OBJECTS)

MS_BIND = 4096
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
# The mount API's system calls (Linux 5.2, mount_setattr 5.12): their numbers are the same on every
# architecture from 424 on.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str, path: object) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", str(path))
    return result


def _mount(source: str | None, target: Path, flags: int) -> None:
    src = source.encode() if source is not None else None
    _check(_libc.mount(src, str(target).encode(), None, ctypes.c_ulong(flags), None), "mount", target)


def make(run_dir: Path) -> None:
    """Make the run directory's two points (empty directories, each its own shared mount)."""
    for name in POINTS:
        point = run_dir / name
        point.mkdir(exist_ok=True)
        _mount(str(point), point, MS_BIND)
        # A peer group of its own: a mount on it must reach the container, and no other mount namespace.
        _mount(None, point, MS_PRIVATE)
        _mount(None, point, MS_SHARED)


def bind_objects(run_dir: Path, objects: Path) -> None:
    """The repository's objects on the run's objects point: read-only (and nosuid, nodev, noexec) before any
    copy of the bind exists."""
    fd = _check(
        # Recursive, as Docker's own binds are: a mount inside the objects (a pack directory elsewhere) comes too.
        _libc.syscall(
            SYS_OPEN_TREE, AT_FDCWD, str(objects).encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
        ),
        "open_tree",
        objects,
    )
    try:
        attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, 0, 0, 0)
        _check(
            _libc.syscall(
                SYS_MOUNT_SETATTR,
                fd,
                b"",
                AT_EMPTY_PATH | AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            "mount_setattr",
            objects,
        )
        target = run_dir / OBJECTS
        _check(
            _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, str(target).encode(), MOVE_MOUNT_F_EMPTY_PATH),
            "move_mount",
            target,
        )
    finally:
        os.close(fd)
    log.info("objects_bound run_dir=%s objects=%s", run_dir, objects)


def release(run_dir: Path) -> list[str]:
    """Unmount the run's points, wherever it stands (the workspace's own filesystems are workspace.py's to
    release first); the objects' point goes with them. Returns what was released."""
    if not (run_dir / OBJECTS).exists():
        return []  # no pool made this run's directory: its workspace's mounts are workspace.py's alone
    released = []
    for name in POINTS:
        point = run_dir / name
        if quota.mounts_at(point):
            quota.unmount(point)
            released.append(f"mount:{point}")
    with contextlib.suppress(OSError):
        (run_dir / OBJECTS).rmdir()
    return released
