"""Whether a run's supervisor is alive, told without trusting process ids, and the heartbeat its sidecar
watches.

- Each state directory has an identity (a random id in `<state>/state-id`), carried as the label
  `sandbox.state` by every object its runs create: `sandbox gc` only ever acts on its own state directory's
  runs, whatever else shares the engine.
- A supervisor holds an exclusive lock (flock) on `<run dir>/supervisor.lock` from the moment the run
  directory exists until the run has ended. The kernel drops it when the process dies, however it dies, so
  "the lock can be taken" means "nobody supervises this run", in any PID namespace that shares the
  filesystem (a supervisor in a container is not mistaken for a dead one). Recovery takes the same lock, so
  two recoverers never work on one run.
- While the agent runs, the supervisor touches `<run dir>/heartbeat/beat` every HEARTBEAT_INTERVAL seconds;
  the sidecar (mounted read-only) refuses model calls and egress once it goes stale (sidecar/watchdog.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
import time
from pathlib import Path

import psutil

from agent_sandbox.backend.base import STATE_LABEL
from agent_sandbox.paths import state_dir

__all__ = ["STATE_LABEL", "Heartbeat", "RunLock", "state_id", "supervised"]
LOCK_NAME = "supervisor.lock"
HEARTBEAT_DIR = "heartbeat"
HEARTBEAT_FILE = "beat"
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TIMEOUT = 30.0  # the sidecar's patience: a supervisor paused this long is taken for dead


def supervisor_identity() -> str:
    """`<pid>_<start time>` of this process (valid as a label value on any platform): `sandbox gc` tells a
    live supervisor from a dead one by it where an object has no state label."""
    me = psutil.Process()
    return f"{me.pid}_{me.create_time():.2f}"


def state_id(root: Path | None = None) -> str:
    """This state directory's identity, created on first use (atomically: concurrent first runs agree)."""
    root = root or state_dir()
    path = root / "state-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".state-id.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.write_text(secrets.token_hex(8) + "\n")
    try:
        os.link(tmp, path)  # fails if another process got there first; theirs stands
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


class RunLock:
    """The exclusive lock on a run directory that says "this run is supervised"."""

    def __init__(self, run_dir: Path, held: int | None = None) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = held  # a descriptor holding the lock already (handed over by the warm pool)

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; False if a live process does."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return True

    def acquire(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())
            return
        if not self.try_acquire():
            raise RuntimeError(f"{self.path} is held by another process")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def supervised(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock. A run directory without a lock file has no supervisor."""
    if not (run_dir / LOCK_NAME).exists():
        return False
    probe = RunLock(run_dir)
    if probe.try_acquire():
        probe.release()
        return False
    return True


class Heartbeat:
    """Touches the heartbeat file every HEARTBEAT_INTERVAL seconds from a thread, until stopped. While the
    supervisor watches its agent, the watch loop sets `progress` on each round: a loop stuck for
    STUCK_AFTER seconds (its output blocked on a terminal nobody reads, say) stops the beat, so a living but
    stuck supervisor counts as gone. Outside the loop (collection, the check) its waits are bounded."""

    STUCK_AFTER = 15.0

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / HEARTBEAT_DIR
        self.dir.mkdir(exist_ok=True)
        self.file = self.dir / HEARTBEAT_FILE
        self.file.touch()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.progress: float | None = None  # monotonic time of the watch loop's last round; None outside it

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            if self.progress is not None and time.monotonic() - self.progress > self.STUCK_AFTER:
                continue
            with contextlib.suppress(OSError):  # a vanished run directory: the sidecar stops the run, rightly
                os.utime(self.file)

    def stop(self) -> None:
        self._stop.set()
