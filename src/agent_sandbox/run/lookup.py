"""Finding a run's directory by its id, or a unique prefix of one: `sandbox show`, `logs`, `push` and follow-ups."""

from __future__ import annotations

import re
from pathlib import Path

from agent_sandbox.errors import UsageError
from agent_sandbox.paths import runs_dir

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def find_run_dir(run_id: str, marker: str = "spec.json", label: str = "") -> Path:
    """The directory of the run `run_id` names (one holding `marker`); UsageError, with `label` in front, when it
    names none or several. A prefix is globbed, so it may hold no pattern of its own."""
    prefix = f"{label}: " if label else ""
    root = runs_dir()
    if not _RUN_ID.fullmatch(run_id):
        raise UsageError(f"{prefix}not a run id: {run_id!r}")
    exact = root / run_id
    if (exact / marker).is_file():
        return exact
    matches = sorted(p for p in root.glob(f"{run_id}*") if (p / marker).is_file()) if root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"{prefix}no run {run_id!r} in {root}", hint="`sandbox ls` lists the runs")
    raise UsageError(f"{prefix}{run_id!r} names {len(matches)} runs: " + ", ".join(p.name for p in matches[:5]))
