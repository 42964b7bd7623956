"""How a `sandbox` process takes SIGINT, SIGTERM and SIGHUP: as a request to stop, never as an exception
thrown into whatever happens to be running.

Python's default turns Ctrl-C into a KeyboardInterrupt raised at an arbitrary bytecode, which can land in
the middle of packing the agent's work, a git import or teardown, and a second signal can abort the cleanup
of the first. Here a signal is only recorded and passed to whoever registered for it (a supervisor, which
stops its agent and then collects, checks and tears down as it would at a limit; a sweep, which also starts
no further runs). Before anything registered, a signal makes the next `checkpoint()` raise `Interrupted`: the
run has created nothing yet, so it just ends; no new run starts after a signal. Later signals are noted and
never interrupt anything.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from agent_sandbox.errors import ExitCode, SandboxError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(SandboxError):
    """A signal arrived before the run created anything; nothing is left to clean up."""

    exit_code = ExitCode.INTERRUPTED


class _Interrupts:
    def __init__(self) -> None:
        self.received: list[str] = []
        self._targets: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self.installed = False

    def install(self) -> None:
        """Take over SIGINT, SIGTERM and SIGHUP (main thread only; elsewhere a no-op)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            signal.signal(sig, self._handler)
        self.installed = True

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            first = not self.received
            self.received.append(name)
            targets = list(self._targets)
        log.info("signal_received signal=%s first=%s targets=%d", name, first, len(targets))
        if not first and targets:
            # Raw write: the main thread may be inside a buffered write to stderr right now.
            os.write(
                2,
                f"sandbox: {name} received again; still finishing the run (the agent's work is being "
                "kept and everything torn down), it ends on its own\n".encode(),
            )
        for target in targets:
            target(name)

    def checkpoint(self) -> None:
        """Raise Interrupted if a signal came: called before a run creates anything, so none starts after one."""
        if self.received:
            raise Interrupted(f"interrupted ({self.received[0]}) before the run started; nothing was created")

    @contextmanager
    def delivered_to(self, target: Callable[[str], None]) -> Iterator[None]:
        """Signals go to target while the block runs (a signal that came before is delivered at once)."""
        with self._lock:
            self._targets.append(target)
            earlier = self.received[0] if self.received else None
        try:
            if earlier:
                target(earlier)
            yield
        finally:
            with self._lock:
                self._targets.remove(target)

    def reset(self) -> None:
        """Forget received signals (tests, and a long-lived service between runs)."""
        with self._lock:
            self.received.clear()


interrupts = _Interrupts()
"""The process's one signal policy."""
