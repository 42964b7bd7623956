"""Recovery of runs nobody supervises any more: `sandbox gc`, and every `sandbox run` before it starts.

A run needs recovering when the store still calls it running but nobody holds its lock (its supervisor was
killed, the machine rebooted), or when its work waits to be imported (the engine or the disk failed). Either
way the work is packed and imported onto its branch, everything of the run is removed, and the run gets a
summary: `interrupted` for a dead supervisor. `sandbox gc` also evicts the cached checkout trees that no run
stands on any more (`evict_trees`). Objects on the engine are only ever touched when they carry
this state directory's identity (liveness.py): another state directory's runs, on the same engine, are left
alone. Objects from before that label existed are removed when the process that made them is gone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field

from agent_sandbox.backend import Backend
from agent_sandbox.backend.images import ImageSet
from agent_sandbox.errors import EnvironmentNotReady
from agent_sandbox.git import trees
from agent_sandbox.paths import runs_dir, state_dir
from agent_sandbox.run import held_mounts, workspace
from agent_sandbox.run.liveness import RunLock, state_id, supervised
from agent_sandbox.store import RunStore

log = logging.getLogger(__name__)

HOST_OBJECT = "firewall:"  # what list_runs calls an object on the host itself, which carries no state label
RULES_RECHECK = 1.0  # seconds between the two looks at a run that shows nothing but host objects

Action = Literal["recovered", "removed", "skipped", "failed"]


class Collected(BaseModel):
    """One run that `sandbox gc` looked at, and what it did (or, with --dry-run, would do)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    """The run."""
    action: Action
    """recovered (work packed and imported, summary written), removed (objects only), skipped or failed."""
    detail: str = ""
    """Why: the supervisor is alive, another state directory's run, the outcome of the recovery."""
    objects: list[str] = Field(default_factory=list)
    """Containers, networks and firewall rules on record for it, as kind:name."""
    branch: str | None = None
    """Where the recovered work is."""
    status: str | None = None
    """The run's status after recovery."""
    dry_run: bool = False
    """Nothing was done: this is what would be."""


def supervisor_alive(identity: str | None) -> bool:
    """Whether the process named by a `pid:start-time` label still runs (the start time rules out pid reuse).
    Only for objects made before the state label; everything newer is judged by its run's lock."""
    if not identity:
        return False
    try:
        # `pid_start`; older versions wrote `pid:start`.
        pid_s, started_s = identity.replace(":", "_").split("_", 1)
        proc = psutil.Process(int(pid_s))
        return abs(proc.create_time() - float(started_s)) < 1.0
    except (ValueError, psutil.Error):
        return False


def _why(row: dict[str, Any] | None) -> str:
    if row is not None and row.get("status") != "running" and row.get("recover"):
        return f"its work waited to be imported ({row['recover']})"
    pid = row.get("supervisor_pid") if row else None
    return f"its supervisor{f' (pid {pid})' if pid else ''} died before the run ended"


def collect(
    backend: Backend,
    store: RunStore,
    images: ImageSet | None,
    dry_run: bool = False,
    objects: bool = True,
    progress: Any = None,
) -> list[Collected]:
    """Recover every run of this state directory that nobody supervises. objects=False looks at the store
    alone (the cheap check before a run); images None leaves work unimported (it stays for a later gc)."""
    mine = state_id()
    rows = {r["id"]: r for r in store.unfinished()}
    found = backend.list_runs() if objects else {}
    # A pool's slots have no row in the store until a run claims one: a slot whose keeper died, and whose objects
    # on the engine went meanwhile (a reset engine), is found by the mount points it still holds.
    held = {p.parent.name for p in runs_dir().glob(f"*/{held_mounts.OBJECTS}")} if objects else set()
    out: list[Collected] = []
    for run_id in sorted(set(rows) | set(found) | held):
        row, entry = rows.get(run_id) or store.get(run_id), found.get(run_id, {})
        objs = list(entry.get("objects", []))
        state = entry.get("state")
        if entry and state is None and row is None and run_id not in held:
            # Made before the state label, or what a run leaves on the host itself (a firewall rule) without a
            # labelled object beside it. (A slot's mount points say whose it is: it is recovered as any run.)
            if supervisor_alive(entry.get("supervisor")):
                out.append(Collected(run_id=run_id, action="skipped", objects=objs, detail="its supervisor is alive"))
                continue
            if objs and all(o.startswith(HOST_OBJECT) for o in objs):
                # A live run looks like this for a moment, between its network and its rules (made, or removed
                # while its finaliser runs): seen so twice, a second apart, only those rules go, never a workload.
                if not dry_run:
                    time.sleep(RULES_RECHECK)
                again = list((backend.list_runs().get(run_id) or {}).get("objects", [])) if not dry_run else objs
                if not again or not all(o.startswith(HOST_OBJECT) for o in again):
                    out.append(
                        Collected(
                            run_id=run_id, action="skipped", objects=objs, detail="a run being made or taken down"
                        )
                    )
                    continue
                removed = objs if dry_run else backend.remove_host_objects(run_id)
                out.append(
                    Collected(
                        run_id=run_id,
                        action="removed",
                        objects=removed,
                        dry_run=dry_run,
                        detail="host firewall rules whose run is gone",
                    )
                )
                continue
            removed = objs if dry_run else backend.remove_run(run_id)
            out.append(
                Collected(
                    run_id=run_id,
                    action="removed",
                    objects=removed,
                    dry_run=dry_run,
                    detail="left by a dead supervisor of an earlier version",
                )
            )
            continue
        if state is not None and state != mine:
            out.append(
                Collected(
                    run_id=run_id, action="skipped", objects=objs, detail=f"another state directory's run ({state})"
                )
            )
            continue
        run_dir = Path(row["run_dir"]) if row else runs_dir() / run_id
        if run_dir.exists() and supervised(run_dir):
            out.append(Collected(run_id=run_id, action="skipped", objects=objs, detail="its supervisor is alive"))
            continue
        if dry_run:
            what = "recover: pack and import its work, remove" if (run_dir / "spec.json").exists() else "remove"
            out.append(
                Collected(
                    run_id=run_id,
                    action="recovered" if "recover" in what else "removed",
                    objects=objs,
                    dry_run=True,
                    detail=f"would {what}; {_why(row)}",
                )
            )
            continue
        if progress is not None:
            progress(f"recovering run {run_id}: {_why(row)}")
        out.append(_recover(backend, store, images, run_id, run_dir, row, objs))
    if objects and not dry_run:
        evict_trees()
    return out


def evict_trees() -> list[str]:
    """Evict the cached checkout trees (git/trees.py) that no run directory stands on and nobody used lately;
    never fatal."""
    try:
        return trees.evict(state_dir() / "trees", lambda: workspace.in_use(runs_dir()))
    except Exception as exc:
        log.warning("tree_eviction_failed error=%r", exc)
        return []


def _recover(
    backend: Backend,
    store: RunStore,
    images: ImageSet | None,
    run_id: str,
    run_dir: Path,
    row: dict[str, Any] | None,
    objs: list[str],
) -> Collected:
    lock = RunLock(run_dir)
    if run_dir.exists() and not lock.try_acquire():
        return Collected(run_id=run_id, action="skipped", objects=objs, detail="another process took it first")
    try:
        if not (run_dir / "spec.json").exists():
            # Nothing to pack: it died before it began.
            removed = backend.remove_run(run_id)
            removed += workspace.release_run(run_dir)
            marked = store.mark_failed(run_id, f"{_why(row)}; it had not started; cleaned up by sandbox gc")
            return Collected(
                run_id=run_id, action="removed", objects=removed, status="failed" if marked else None, detail=_why(row)
            )
        if images is None:
            # No images to pack with: the run's workloads go (nothing runs unsupervised), but what holds the
            # agent's work stays for a later gc, which imports it: the workspace here, and on a platform that
            # keeps the working tree in a volume of its own (Kubernetes), that volume.
            removed = backend.attach_run(run_id).remove_workloads()
            return Collected(
                run_id=run_id,
                action="skipped",
                objects=removed,
                detail="its workloads removed, what holds its work kept: the work waits for the images "
                "(`sandbox images build`), then `sandbox gc` imports it",
            )
        from agent_sandbox.run.supervisor import Supervisor

        sup = Supervisor.for_recovery(run_dir, backend, images, store)
        summary = sup.recover(_why(row), f"sandbox gc (pid {os.getpid()})")
        return Collected(
            run_id=run_id,
            action="recovered" if not summary.kept else "failed",
            objects=objs,
            branch=summary.branch,
            status=summary.status,
            detail=summary.message,
        )
    except Exception as exc:  # one run that cannot be recovered must not stop the others
        log.exception("recovery_failed run_id=%s", run_id)
        detail = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, EnvironmentNotReady):
            # Not for want of an engine or room: trying again will not help. The run ends, failed, and its
            # directory stays as it is for a person to look at.
            store.mark_unrecoverable(run_id, f"{_why(row)}; recovery failed: {detail}; see {run_dir}")
        return Collected(run_id=run_id, action="failed", objects=objs, detail=detail)
    finally:
        lock.release()
