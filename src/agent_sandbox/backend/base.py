"""The backend interface: what the supervisor needs from a platform to run one task, and nothing more.

It works at the level of a run (backend/plan.py): the supervisor opens a run from its plan, starts its
workloads by role, follows, stops and waits for them, and tears the run down. How a platform confines a
workload (networks, routes, firewall rules, network policies), names and labels its objects and finds them
again is the backend's own business.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from agent_sandbox.backend.plan import ExitInfo, ImageSet, Mount, Progress, Role, RunPlan, Started, Workload
from agent_sandbox.config.policy import Policy
from agent_sandbox.sidecar.relay import connect_unix

# Label keys every object of a run carries (a backend without labels keeps the same facts its own way).
RUN_LABEL = "sandbox.run-id"
ROLE_LABEL = "sandbox.role"
SUPERVISOR_LABEL = "sandbox.supervisor"  # <pid>_<start time> of the supervisor that created the object
STATE_LABEL = "sandbox.state"  # the identity of the state directory whose run created it (run/liveness.py)
ASK_LIMIT = 4096  # bytes of an answer RunHandle.ask returns at most


class SidecarStart:
    """The sidecar's start as the workloads that reach it see it: theirs may begin alongside it, from another
    thread (run/watch.py), and wait here for whatever they need of it. Over once it is, either way."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._failed: BaseException | None = None

    def run(self, start: Callable[[], Started]) -> Started:
        """The sidecar's own start, through this."""
        try:
            return start()
        except BaseException as exc:
            self._failed = exc
            raise
        finally:
            self._done.set()

    def wait(self, timeout: float) -> None:
        """Until the sidecar's start is over; RuntimeError when it failed, or is not over in timeout seconds."""
        if not self._done.wait(timeout):
            raise RuntimeError(f"the sidecar did not start within {timeout:g}s")
        if self._failed is not None:
            raise RuntimeError(f"the sidecar did not start: {self._failed}")


class NotHeld(RuntimeError):
    """A workload started with `hold` is no longer waiting for its go-ahead: it ended meanwhile."""


class RunHandle(ABC):
    """One run's objects on a platform. Workloads are named by role."""

    run_id: str

    def adopt(self, sidecar: Workload, held: Sequence[Workload] = ()) -> Started:
        """Take over what a pool made ahead for this run (fleet/pool.py): what `prepare` makes, the sidecar
        started from `sidecar`, held for its configuration, and the workloads `held` (the agent's and the
        finaliser's, if the pool made them), started held for their go-ahead, the agent's confined.
        The run goes on as if this handle had made them; what the sidecar's start would have put on record is
        returned. NotImplementedError where the backend has no pool."""
        raise NotImplementedError(f"{type(self).__name__} takes over no pooled sidecar")

    @abstractmethod
    def prepare(self) -> list[dict[str, Any]]:
        """Make what the run's workloads share before any starts (Docker: its two networks and the host
        firewall closed to the internal one). Returns one audit payload per object made (`network_created`)."""

    @abstractmethod
    def start(self, workload: Workload, hold: bool = False) -> Started:
        """Start a workload, confined as its `reach` says; for `Reach.SIDECAR` the confinement is in place and
        checked before this returns, and so is the go-ahead unless `hold` (then `release` gives it: the agent's
        container starts while the sidecar gets ready, and its code runs once the sidecar is). The agent's start
        may be called, from another thread, before or while the sidecar's is under way: it waits for whatever it
        needs of the sidecar (its address, its pod) and fails if the sidecar's start does."""

    @abstractmethod
    def release(self, role: Role, note: str = "") -> None:
        """Give a workload started with `hold` its go-ahead: its own code runs from here. `note` (a word: letters,
        digits, `_`, `-`; at most 32) is the go-ahead's content, which the workload reads (the finaliser: why the
        run ended). NotHeld when the workload ended while it waited (killed, the engine restarted): a start of
        the role again replaces it."""

    @abstractmethod
    def discard(self, *roles: Role, network: bool = False) -> None:
        """Remove workloads that have done their part, without waiting (the run goes on meanwhile); with
        `network`, then also what the run's workloads shared to reach the sidecar (no workload that needs it
        follows: the finaliser has no network). `teardown` waits for it and removes whatever is left, so a
        discard that fails loses nothing."""

    @abstractmethod
    def output(self, role: Role, stderr: bool = False) -> Iterator[bytes]:
        """Follow a workload's stdout (or stderr) from its start until it ends. A platform that does not keep
        the two apart gives everything on stdout and nothing on stderr."""

    @abstractmethod
    def stats(self, role: Role) -> Iterator[dict[str, int]]:
        """Samples of the workload's resource use until it stops: memory and peak_memory (bytes), cpu_ns
        (cumulative CPU time) and pids."""

    @abstractmethod
    def wait(self, role: Role, timeout: float) -> ExitInfo:
        """Wait up to timeout seconds for the workload to end."""

    @abstractmethod
    def status(self, role: Role) -> ExitInfo:
        """How the workload is now (exit_code None and not running: it never started or is gone)."""

    @abstractmethod
    def stop(self, role: Role, grace: float) -> None:
        """SIGTERM, then SIGKILL after grace seconds. A workload that is not there is no error."""

    @abstractmethod
    def ask(self, role: Role, socket: str, line: bytes, timeout: float) -> bytes | None:
        """Send `line` to the Unix socket a running workload listens on at `socket` (its path inside the
        workload, in one of its mounts; the sidecar's settle socket) and return the answer: what came back
        before the socket closed, `timeout` seconds passed or ASK_LIMIT bytes had come. None when it could not
        be reached (no such workload, nothing listening). Docker: the socket is in the mount's directory on
        this machine (`ask_unix`); Kubernetes: in the pod, through `exec`."""

    @abstractmethod
    def remove_workloads(self) -> list[str]:
        """Recovery, before it packs the work of a run another process started: remove the run's workloads
        (stopped and read already) but keep what holds the agent's work and what a workload started on this
        handle next needs, then take the run over so that `start` can run a workload that reaches nothing (the
        finaliser) on that work. Docker keeps nothing (the work is in the host's directory): this is `teardown`.
        Kubernetes keeps the anchor, the run's volume and the isolation policies. `teardown` removes the rest.
        Returns what was removed."""

    @abstractmethod
    def keep_work(self, dest: Path) -> None:
        """Before `teardown`, when the supervisor keeps the agent's working tree (`--keep`, or work not imported
        for `sandbox gc`): bring it into dest, the run directory's workspace it was made from, where the platform
        holds it elsewhere. Docker: nothing to do, the workspace is that directory. Kubernetes: the working tree
        is fetched from the run's volume and replaces the checkout there. Raises when it could not: the work
        is then still where the platform holds it (on Kubernetes the volume), which `teardown` would remove."""

    @abstractmethod
    def teardown(self) -> list[str]:
        """Remove every object of the run; returns what was removed. Safe to repeat and to race with
        `sandbox gc`."""


def mounted_path(mounts: Iterable[Mount], path: str) -> str | None:
    """Where a path inside a workload is on this machine: below the mount that holds it (the deepest), or None
    (not in a mount, or climbing out of one)."""
    best: Mount | None = None
    for m in mounts:
        target = m.target.rstrip("/")
        if (path == target or path.startswith(target + "/")) and (
            best is None or len(target) > len(best.target.rstrip("/"))
        ):
            best = m
    if best is None:
        return None
    rest = path[len(best.target.rstrip("/")) :].strip("/")
    if ".." in rest.split("/"):
        return None
    return os.path.join(best.source, rest) if rest else best.source


def ask_unix(path: str, line: bytes, timeout: float) -> bytes | None:
    """RunHandle.ask for a socket on this machine (a path of any length): the answer, or None when nothing
    could be reached at path."""
    try:
        sock = connect_unix(path, timeout)
    except OSError:
        return None
    end = time.monotonic() + timeout
    got = b""
    with sock:
        try:
            sock.sendall(line)
        except OSError:
            return None
        # Until the other side closes, the limit, or the timeout: the answer so far is the answer.
        with contextlib.suppress(OSError):
            while len(got) < ASK_LIMIT and (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                if not (chunk := sock.recv(ASK_LIMIT - len(got))):
                    break
                got += chunk
    return got


class Backend(ABC):
    """A platform that runs sandboxed tasks: Docker today (backend/docker.py)."""

    name: str = "abstract"
    engine_lost: bool = False
    """Set once the platform stopped answering during the run (it may have come back since)."""

    def engine_id(self) -> str:
        """Which engine (or cluster) this is, the same from every process that reaches it: a pooled run made on
        one must not be taken over through another (fleet/pool.py)."""
        return ""

    @abstractmethod
    def open_run(self, plan: RunPlan) -> RunHandle:
        """A handle for a new run; nothing is made until its `prepare`."""

    @abstractmethod
    def attach_run(self, run_id: str) -> RunHandle:
        """A handle on a run another process started (recovery): to stop, read and tear down what is left. A
        recovery that packs the work opens the run with its own plan instead, and takes it over with
        `RunHandle.remove_workloads`."""

    def remove_run(self, run_id: str) -> list[str]:
        """Remove every object labelled with this run id; returns what was removed."""
        return self.attach_run(run_id).teardown()

    def remove_host_objects(self, run_id: str) -> list[str]:
        """Remove what the run left on the supervisor's host itself (Docker: its firewall rules), never a
        workload or a network; returns what was removed. Nothing by default."""
        return []

    @abstractmethod
    def list_runs(self) -> dict[str, dict[str, Any]]:
        """Run ids that still have objects: {run_id: {"objects": [...], "supervisor": owner or None,
        "state": state id or None}}."""

    @abstractmethod
    def images(self, policy: Policy | None = None, progress: Progress | None = None) -> ImageSet:
        """The images a run uses, for this policy (its extension of the agent image built or found), or a
        clear error naming what is missing and how to make it."""

    @abstractmethod
    def image_info(self, image: str) -> dict[str, Any]:
        """Id, digest and labels of an image."""
