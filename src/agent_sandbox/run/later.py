"""Work a run may leave for after its answer, in a process that outlives the answer: a warm daemon's run
(cli/daemon.py) answers its client, then removes the run's containers and networks. Elsewhere nothing is
deferred: a one-shot `sandbox run` removes everything before it exits."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_pending: list[Callable[[], None]] | None = None


def enable() -> None:
    """This process goes on after its answer, and runs `run_all` then."""
    global _pending
    _pending = []


def active() -> bool:
    return _pending is not None


def defer(work: Callable[[], None]) -> None:
    if _pending is None:
        raise RuntimeError("nothing can be deferred in this process: do it now")
    _pending.append(work)


def run_all() -> None:
    """What was deferred, in order; a failure is logged and the rest still runs."""
    while _pending:
        work = _pending.pop(0)
        try:
            work()
        except Exception:
            log.exception("deferred_work_failed")
