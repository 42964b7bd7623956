"""A run's workspace: its disk quota, its files, its `.git`, and what becomes of them at the end.

Where the supervisor can mount (root, and the kernel has overlayfs), the workspace is an overlay: the base
commit's tree, written once into the state directory's cache (git/trees.py) and shared read-only by every run
on that commit, with a copy-on-write layer of the run's own on top. Preparing it costs a mount and a small
`.git`, not one file per file of the repository. The layer (`upper/`, `work/`) lives in the run's quota
filesystem (`runs/<id>/layer`, quota.py), so everything the agent writes, copies of changed files included,
counts against the disk limit. The agent sees an ordinary git working tree at /workspace: the overlay is
bind-mounted into its container like the plain directory was, and it has no capability to mount, unmount or
reach the cache's directory. `runs/<id>/workspace.json` records which tree a run's overlay stands on, for
recovery (remount after a dead supervisor or a reboot) and for `sandbox gc`, which never evicts a tree that a
run directory still references.

Elsewhere (not root, no overlayfs, or `SANDBOX_WORKSPACE=copy`) the workspace is a full checkout in the quota
filesystem, as it always was (git/checkout.py, `prepare_checkout`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from agent_sandbox.errors import EnvironmentNotReady, SandboxError
from agent_sandbox.git import trees
from agent_sandbox.git.checkout import HostRepo, prepare_checkout, remove_tree
from agent_sandbox.run import held_mounts, quota

log = logging.getLogger(__name__)

MODE_ENV = "SANDBOX_WORKSPACE"  # `copy`: a full checkout per run, even where an overlay could be mounted
RECORD = "workspace.json"
LAYER = "layer"
OVERLAY_OPTIONS = "nosuid,nodev,noatime,redirect_dir=on"
# redirect_dir=on: a directory of the lower tree can be renamed (`git mv dir`, os.rename) as on any
# filesystem; without it the kernel answers EXDEV. Redirects are extended attributes in the trusted.*
# namespace, which nobody without CAP_SYS_ADMIN can write, and the agent has no capability at all.


@dataclass(frozen=True)
class Prepared:
    """How the workspace was made."""

    mode: str  # "overlay" (a layer over a cached tree) or "copy" (a full checkout)
    cached: bool | None  # overlay: the tree was in the cache already; None for a copy
    seconds: float
    detail: str = ""  # why a copy, where an overlay was not possible


def overlay_unavailable() -> str | None:
    """Why the workspace cannot be an overlay here, or None when it can."""
    if os.environ.get(MODE_ENV) == "copy":
        return f"{MODE_ENV}=copy"
    if os.geteuid() != 0:
        return "not running as root (mounting an overlay needs it)"
    try:
        known = Path("/proc/filesystems").read_text()
    except OSError:
        known = ""
    if not any(line.split()[-1:] == ["overlay"] for line in known.splitlines()):
        return "the kernel has no overlay filesystem"
    if quota.tool("mount") is None or quota.tool("umount") is None:
        return "mount is not installed"
    return None


def trees_dir(run_dir: Path) -> Path:
    """The cache of trees: `trees/` in the state directory that holds `runs/<id>`."""
    return run_dir.parent.parent / "trees"


def _record(run_dir: Path) -> dict[str, object]:
    try:
        data = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_overlay(run_dir: Path) -> bool:
    return _record(run_dir).get("mode") == "overlay"


def prepare(
    run_dir: Path, repo: HostRepo, commit: str, branch: str, q: quota.Quota, owner: tuple[int, int] | None
) -> Prepared:
    """Make `run_dir/workspace`: branch `branch` at `commit`, files checked out, objects borrowed, size limited
    by `q`."""
    started = time.monotonic()
    why = overlay_unavailable()
    if why is None:
        try:
            cached = _prepare_overlay(run_dir, repo, commit, branch, q, owner)
            return Prepared("overlay", cached, round(time.monotonic() - started, 3))
        except EnvironmentNotReady as exc:
            # The kernel refused the overlay (an upper layer on a filesystem it cannot use, say): undo it and
            # check out a copy instead, saying why.
            why = f"the overlay could not be mounted: {exc.message}"
            log.warning("overlay_failed run_dir=%s error=%s", run_dir, exc.message)
            release_run(run_dir)
            remove_tree(run_dir / "workspace")
    workspace = run_dir / "workspace"
    quota.mount(workspace, q)
    (run_dir / RECORD).write_text(json.dumps({"mode": "copy"}))
    prepare_checkout(repo, commit, workspace, branch, owner)
    return Prepared("copy", None, round(time.monotonic() - started, 3), why)


def _prepare_overlay(
    run_dir: Path, repo: HostRepo, commit: str, branch: str, q: quota.Quota, owner: tuple[int, int] | None
) -> bool:
    layer = run_dir / LAYER
    quota.mount(layer, q)
    for sub in ("upper", "work"):
        (layer / sub).mkdir()
    # The overlay's root takes its mode from the upper directory (and its owner, given at the end by init_git).
    os.chmod(layer / "upper", 0o755)
    where = trees_dir(run_dir)
    with trees.acquire(where, repo.objects, commit, owner) as (tree, cached):
        # Written under the tree's lock: from here on gc sees the tree in use.
        record = {
            "mode": "overlay",
            "trees": str(where),
            "tree": tree.name,
            "objects": str(repo.objects),
            "commit": commit,
            "owner": list(owner) if owner else None,
        }
        (run_dir / RECORD).write_text(json.dumps(record))
        _mount_overlay(run_dir, tree)
    trees.init_git(run_dir / "workspace", repo.objects, commit, branch, tree.index, owner)
    log.info("workspace_overlay run_dir=%s tree=%s cached=%s", run_dir, tree.name, cached)
    return cached


def _mount_overlay(run_dir: Path, tree: trees.Tree) -> None:
    """Mount the overlay of `tree` and the run's layer at run_dir/workspace. The paths are given relative to
    the run directory (the mount runs there): no separator of the option string can sneak in through the
    state directory's path, and the host's paths do not show in the agent's /proc/self/mountinfo."""
    workspace = run_dir / "workspace"
    workspace.mkdir(exist_ok=True)
    here = os.path.realpath(run_dir)
    lower = os.path.relpath(os.path.realpath(tree.files), here)
    options = f"lowerdir={lower},upperdir={LAYER}/upper,workdir={LAYER}/work,{OVERLAY_OPTIONS}"
    if any(c in options for c in "\\\n") or any(c in lower for c in ",:"):
        raise SandboxError(f"the tree's path cannot be given to the overlay: {lower!r}")
    quota.mount_in(here, "-t", "overlay", "-o", options, "sandbox-workspace", "workspace")


def disk_root(run_dir: Path) -> Path:
    """What the disk sampler measures: the overlay's upper layer (only what the run wrote), else the workspace."""
    if is_overlay(run_dir):
        return run_dir / LAYER / "upper"
    return run_dir / "workspace"


def park(run_dir: Path) -> str:
    """Unmount the workspace but keep its work (the quota image, or the plain layer or directory) for
    `sandbox gc` to import after `remount`; returns where it is kept."""
    workspace = run_dir / "workspace"
    if is_overlay(run_dir):
        layer = run_dir / LAYER
        if quota.is_mounted(workspace):
            quota.unmount(workspace)
        parked = quota.is_mounted(layer)
        quota.park(layer)
        _release_points(run_dir)
        # The agent's work: its changes over the tree, in the layer's filesystem image, or in the plain layer.
        return str(quota.image_path(layer) if parked else layer / "upper")
    parked = quota.is_mounted(workspace)
    quota.park(workspace)
    _release_points(run_dir)
    return str(quota.image_path(workspace) if parked else workspace)


def remount(run_dir: Path) -> None:
    """Mount a parked workspace again (after a dead supervisor, or a reboot that dropped every mount); no-op
    when there is nothing to mount. An overlay whose tree has left the cache gets it built again: the tree
    is a function of the commit, and the run's own work is all in its layer."""
    record = _record(run_dir)
    workspace = run_dir / "workspace"
    if record.get("mode") != "overlay":
        quota.remount(workspace)
        return
    layer = run_dir / LAYER
    quota.remount(layer)
    if quota.is_mounted(workspace) or not (layer / "upper").is_dir():
        return
    owner_l = record.get("owner")
    owner = (int(owner_l[0]), int(owner_l[1])) if isinstance(owner_l, list) and len(owner_l) == 2 else None
    where = Path(str(record.get("trees") or trees_dir(run_dir)))
    with trees.acquire(where, Path(str(record["objects"])), str(record["commit"]), owner) as (tree, _cached):
        if tree.name != record.get("tree"):
            raise SandboxError(f"the workspace's tree {record.get('tree')} is not {tree.name}")
        _mount_overlay(run_dir, tree)
    log.info("workspace_remounted run_dir=%s tree=%s", run_dir, tree.name)


def release_run(run_dir: Path, keep: bool = False) -> list[str]:
    """Unmount the run's filesystems (quota.release_run: the overlay before the layer under it) and drop the
    layer; with keep, the workspace is first copied to a plain directory of the same name. Returns what was
    released. Once the layer is gone the run no longer references its tree."""
    released = quota.release_run(run_dir, keep=keep)
    released += _release_points(run_dir)
    layer = run_dir / LAYER
    workspace = run_dir / "workspace"
    if quota.is_mounted(workspace) or quota.is_mounted(layer) or quota.image_path(layer).exists():
        return released  # a release failed (logged): everything stays for `sandbox gc`
    try:
        if layer.exists():
            remove_tree(layer)
        with contextlib.suppress(FileNotFoundError):
            (run_dir / RECORD).unlink()
    except (SandboxError, OSError) as exc:
        log.warning("layer_release_failed dir=%s error=%s", layer, getattr(exc, "message", exc))
    return released


def _release_points(run_dir: Path) -> list[str]:
    """A pooled agent's mount points (held_mounts.py), the host's objects bound on one of them: never left
    behind, whatever else stays for `sandbox gc`."""
    try:
        return held_mounts.release(run_dir)
    except (EnvironmentNotReady, OSError) as exc:
        log.warning("held_mounts_release_failed run_dir=%s error=%s", run_dir, getattr(exc, "message", exc))
        return []


def in_use(runs: Path) -> set[str]:
    """The trees that run directories under `runs` stand on (their overlay may be mounted again)."""
    used = set()
    with contextlib.suppress(OSError):
        for record in runs.glob(f"*/{RECORD}"):
            data = _record(record.parent)
            if data.get("mode") == "overlay" and isinstance(data.get("tree"), str):
                used.add(str(data["tree"]))
    return used
