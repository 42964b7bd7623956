"""`sandbox gc`: remove what runs whose supervisor died left behind, found by label, and nothing else."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict, Field

from . import quota
from .backend import Backend
from .store import RunStore

log = logging.getLogger(__name__)


class Collected(BaseModel):
    """One run's leftovers and what gc did with them."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    """The run the objects are labelled with."""
    action: str
    """`removed`, or `skipped` while its supervisor is alive."""
    objects: list[str] = Field(default_factory=list)
    """Containers and networks, as kind:name."""
    marked_failed: bool = False
    """The run store had it as running and now has it failed with reason error."""


def supervisor_alive(identity: str | None) -> bool:
    """Whether the process named by a `pid:start-time` label still runs (the start time rules out pid reuse)."""
    if not identity:
        return False
    try:
        pid_s, started_s = identity.split(":", 1)
        proc = psutil.Process(int(pid_s))
        return abs(proc.create_time() - float(started_s)) < 1.0
    except (ValueError, psutil.Error):
        return False


def _release_quota(store: RunStore, run_id: str) -> list[str]:
    """Unmount the run's quota filesystems (quota.py) that its supervisor did not live to release."""
    row = store.get(run_id)
    if not row or not row.get("run_dir"):
        return []
    return quota.release_run(Path(row["run_dir"]))


def collect(backend: Backend, store: RunStore, force: bool = False) -> list[Collected]:
    out = []
    for run_id, found in sorted(backend.list_runs().items()):
        if not force and supervisor_alive(found.get("supervisor")):
            out.append(Collected(run_id=run_id, action="skipped", objects=found["objects"]))
            continue
        removed = backend.remove_run(run_id)
        removed += _release_quota(store, run_id)
        marked = store.mark_failed(run_id, "the supervisor died before the run ended; cleaned up by sandbox gc")
        log.info("gc run_id=%s removed=%d marked_failed=%s", run_id, len(removed), marked)
        out.append(Collected(run_id=run_id, action="removed", objects=removed, marked_failed=marked))
    return out
