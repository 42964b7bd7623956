"""A hard size limit on a run's writable directories (the workspace, or the layer of its overlay: see
workspace.py; the check's checkout).

Bind mounts have no quota on most storage drivers, and sampling the tree's size lets a fast writer far past
the limit before anyone looks (a 3 GiB fallocate takes milliseconds). When the supervisor runs as root and
the machine has loop devices, each such directory is instead a small ext4 filesystem of exactly the
limit's size, in a sparse file in the run directory and loop-mounted over the directory: the kernel says
"No space left on device" at the limit, whatever the writer does. Without root or loop devices the
supervisor falls back to sampling (and says so in the audit trail).

The image file never grows past the limit, and the limit is capped to what the state filesystem can spare,
so filling the workspace cannot fill the host's disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent_sandbox.errors import EnvironmentNotReady
from agent_sandbox.paths import mountinfo_path

log = logging.getLogger(__name__)

HOST_RESERVE = 512 * 1024**2  # what the state filesystem keeps free for everything else
MIN_SIZE = 64 * 1024**2
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime"
MOST_STACKED = 8  # mounts `unmount` takes off one directory: its own, an overlay over it, what a crash left
MODE_ENV = "SANDBOX_DISK_QUOTA"  # `sampled`: measure instead of mounting, even where a filesystem quota works


@dataclass(frozen=True)
class Quota:
    """How a directory's size is limited."""

    mode: str  # "filesystem" (a loop-mounted ext4 of `size_bytes`) or "sampled" (measured every few seconds)
    size_bytes: int
    detail: str = ""  # why sampled, or that the limit was capped to the free space


def tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def unavailable() -> str | None:
    """Why a filesystem quota cannot be had here, or None when it can."""
    if os.geteuid() != 0:
        return "not running as root (mounting a filesystem needs it)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    for name in ("mkfs.ext4", "mount", "umount"):
        if tool(name) is None:
            return f"{name} is not installed"
    return None


def plan(state_dir: Path, limit_bytes: int) -> Quota:
    """The quota a run's directories get: the policy's limit, capped to what the state filesystem can spare."""
    if os.environ.get(MODE_ENV) == "sampled":
        return Quota("sampled", limit_bytes, f"{MODE_ENV}=sampled")
    why = unavailable()
    if why:
        return Quota("sampled", limit_bytes, why)
    free = shutil.disk_usage(state_dir).free - HOST_RESERVE
    if free < MIN_SIZE:
        raise EnvironmentNotReady(
            f"the state directory's filesystem ({state_dir}) has {max(free + HOST_RESERVE, 0) // 1024**2} MiB free; "
            f"a run needs at least {(MIN_SIZE + HOST_RESERVE) // 1024**2} MiB",
            hint="free some space, or set SANDBOX_STATE_DIR to a larger filesystem",
        )
    if free < limit_bytes:
        return Quota(
            "filesystem",
            free,
            f"capped from {limit_bytes // 1024**2} MiB to the {free // 1024**2} MiB the state filesystem can spare",
        )
    return Quota("filesystem", limit_bytes)


def image_path(directory: Path) -> Path:
    return directory.with_name(directory.name + ".img")


def mount(directory: Path, quota: Quota) -> None:
    """Make `directory` (new, empty) a filesystem of quota.size_bytes. No-op for a sampled quota."""
    directory.mkdir(parents=True, exist_ok=False)
    if quota.mode != "filesystem":
        return
    image = image_path(directory)
    with image.open("xb") as f:
        f.truncate(quota.size_bytes)
    # No journal (the filesystem lives as long as the run) and no reserved blocks (the agent gets the limit).
    _run(
        tool("mkfs.ext4") or "mkfs.ext4",
        "-q",
        "-F",
        "-m",
        "0",
        "-O",
        "^has_journal",
        "-E",
        "lazy_itable_init=1,nodiscard",
        str(image),
    )
    _run(tool("mount") or "mount", "-o", MOUNT_OPTIONS, str(image), str(directory))
    # An empty workspace: lost+found would show up as an unreadable untracked directory in git.
    (directory / "lost+found").rmdir()
    log.info("quota_mounted dir=%s bytes=%d", directory, quota.size_bytes)


def is_mounted(directory: Path) -> bool:
    return os.path.ismount(directory)


def release(directory: Path, keep: bool = False) -> None:
    """Unmount and delete the directory's filesystem. With keep, its files are first copied out to a plain
    directory of the same name (for debugging); otherwise the directory is removed with it."""
    image = image_path(directory)
    if is_mounted(directory):
        if keep:
            kept = directory.with_name(directory.name + ".kept")
            _run("cp", "-a", "--no-dereference", f"{directory}/.", str(kept))
        unmount(directory)
        directory.rmdir()
        if keep:
            kept.rename(directory)
        log.info("quota_released dir=%s kept=%s", directory, keep)
    image.unlink(missing_ok=True)


def unmount(directory: Path) -> None:
    """Unmount whatever is mounted at `directory`, every mount stacked there (a pooled run's workspace is a mount
    of its own under the overlay: held_mounts.py), lazily: a process still holding a file, a container being
    removed, must not keep the mount alive."""
    for _ in range(MOST_STACKED):
        _run(tool("umount") or "umount", "-l", str(directory))
        if not mounts_at(directory):
            return


def mounts_at(directory: Path) -> int:
    """How many mounts are stacked on `directory`. (os.path.ismount misses a bind of a directory of the same
    filesystem, such as one onto itself.)"""
    where = os.path.realpath(directory)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return int(is_mounted(directory))
    escaped = mountinfo_path(where)  # field 5, the mount point
    return sum(1 for line in lines if line.split(" ", 5)[4:5] == [escaped])


def mount_in(cwd: str | Path, *args: str) -> None:
    """`mount ARGS` run in `cwd` (relative paths in the arguments and options are taken from there)."""
    _run(tool("mount") or "mount", *args, cwd=cwd)


def park(directory: Path) -> None:
    """Unmount the directory's filesystem but keep its image: the agent's work waits there, on no mount, for
    `sandbox gc` to import it (remount)."""
    if is_mounted(directory):
        unmount(directory)
        log.info("quota_parked dir=%s image=%s", directory, image_path(directory))


def remount(directory: Path) -> None:
    """Mount a parked (or, after a reboot, dropped) image over its directory again; no-op without an image."""
    image = image_path(directory)
    if image.exists() and not is_mounted(directory):
        directory.mkdir(exist_ok=True)
        _run(tool("mount") or "mount", "-o", MOUNT_OPTIONS, str(image), str(directory))
        log.info("quota_remounted dir=%s", directory)


QUOTA_DIRS = ("workspace", "layer", "check")
"""The directories of a run directory that get a quota filesystem, or a mount: `workspace` (a filesystem, or
the overlay over a cached tree: run/workspace.py), `layer` (the overlay's writable layer, under it) and
`check`. In this order, so that the overlay goes before the filesystem that holds its layer."""


def release_run(run_dir: Path, keep: bool = False) -> list[str]:
    """Release the quota filesystems of a run directory (a finished run's, or one a dead supervisor left);
    returns them as `filesystem:<dir>`. A failure is logged, not raised: teardown goes on, and `sandbox gc`
    tries again."""
    released = []
    for name in QUOTA_DIRS:
        directory = run_dir / name
        if not (is_mounted(directory) or image_path(directory).exists()):
            continue
        try:
            # The layer is the overlay's internals: the workspace, copied out with keep, is what is kept.
            release(directory, keep=keep and name != "layer")
            released.append(f"filesystem:{directory}")
        except (EnvironmentNotReady, OSError) as exc:
            log.warning("quota_release_failed dir=%s error=%s", directory, getattr(exc, "message", exc))
            if name == "workspace":
                break  # an overlay still mounted holds its layer: both stay for `sandbox gc`
    return released


def _run(*cmd: str, cwd: str | Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise EnvironmentNotReady(f"{' '.join(cmd[:2])} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
