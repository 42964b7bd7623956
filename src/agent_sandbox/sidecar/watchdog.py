"""The sidecar's watchdog: the run's backstop when its supervisor is gone.

The supervisor on the host touches a heartbeat file (mounted read-only into the sidecar) every few seconds.
When the file's mtime grows older than the timeout, the supervisor is taken to be gone (SIGKILLed, crashed,
paused); when the run's deadline passes, the run is over whatever the supervisor says. Either way the
watchdog trips: the gateway then refuses every model call with 403 (Claude Code does not retry a 403, so
the agent ends quickly) and the proxy refuses every new connection and cuts those open. A heartbeat that
turns fresh again (the supervisor was only paused) restores service; a passed deadline never does.

The heartbeat's age is the wall clock (time.time()) minus the file's mtime: the supervisor and the sidecar
share the kernel's clock. A file missing at start counts as fresh until the timeout has passed since the
sidecar started; a file that goes missing later counts from the last mtime seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from agent_sandbox.sidecar.events import Watchdog as WatchdogEvent
from agent_sandbox.sidecar.events import to_line

Emit = Callable[[dict[str, Any]], None]

SUPERVISOR_LOST = "supervisor_lost"
DEADLINE = "deadline"
REASONS = {
    SUPERVISOR_LOST: "the run's supervisor is gone (its heartbeat stopped)",
    DEADLINE: "the run's deadline has passed",
}
"""What each trip means, in words: the gateway's refusals and the proxy's decision lines say it."""


class Watchdog:
    """Watches the supervisor's heartbeat file and the run's deadline; `tripped` says why the run is over.

    Without a heartbeat path and a deadline it never trips."""

    def __init__(
        self,
        emit: Emit,
        heartbeat_path: str | None = None,
        heartbeat_timeout_s: float = 30.0,
        deadline_s: float | None = None,
        *,
        interval_s: float = 1.0,
    ) -> None:
        self.emit = emit
        self.heartbeat_path = heartbeat_path
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.deadline_s = deadline_s
        self.interval_s = interval_s
        self.started = time.monotonic()  # the deadline counts from here
        self._last_beat = time.time()  # the last mtime seen; the start until the file is seen
        self._tripped: str | None = None
        self._listeners: list[Callable[[str], None]] = []

    @property
    def tripped(self) -> str | None:
        """`supervisor_lost` or `deadline` once the watchdog has tripped (as of its last check), else None."""
        return self._tripped

    def on_trip(self, listener: Callable[[str], None]) -> None:
        """Call listener(reason) whenever the watchdog trips (the proxy cuts its open connections)."""
        self._listeners.append(listener)

    def heartbeat_age(self) -> float | None:
        """Seconds since the supervisor's last heartbeat; None without a heartbeat file to watch."""
        if self.heartbeat_path is None:
            return None
        with contextlib.suppress(OSError):  # missing: the last mtime seen (or the start) stands
            self._last_beat = os.stat(self.heartbeat_path).st_mtime
        return max(0.0, time.time() - self._last_beat)

    def check(self) -> str | None:
        """Look at the heartbeat and the deadline once; emit a `watchdog` event when the state changes."""
        age = self.heartbeat_age()
        if self._tripped == DEADLINE:
            return DEADLINE  # the deadline never restores
        if self.deadline_s is not None and time.monotonic() - self.started > self.deadline_s:
            state: str | None = DEADLINE
            detail = f"{self.deadline_s:g}s have passed since the sidecar started"
        elif age is not None and age > self.heartbeat_timeout_s:
            state = SUPERVISOR_LOST
            detail = f"no heartbeat in {self.heartbeat_path} for {age:.1f}s (timeout {self.heartbeat_timeout_s:g}s)"
        else:
            state, detail = None, "the supervisor's heartbeat is fresh again"
        if state == self._tripped:
            return state
        self._tripped = state
        self.emit(
            to_line(
                WatchdogEvent(
                    state=state or "restored", detail=detail, heartbeat_age_s=None if age is None else round(age, 1)
                )
            )
        )
        if state is not None:
            for listener in self._listeners:
                listener(state)
        return state

    async def run(self) -> None:
        """Check about once a second, until cancelled."""
        while True:
            try:
                self.check()
            except Exception:  # a bug here must not end the watching
                traceback.print_exc()
            await asyncio.sleep(self.interval_s)
