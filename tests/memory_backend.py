"""An in-memory backend: the run-level interface (backend/base.py) with scripted workloads instead of a
platform, so that the supervisor's decisions (limits, results, teardown, recovery) are tested in seconds.

A workload's behaviour is a function run in a thread once it starts: it writes lines to the workload's output
(`w.say(...)`), waits (`w.sleep(...)`, which returns False once the workload is stopped) and ends with an exit
code. The finaliser's default behaviour packs nothing (`unchanged`), as the real one does for an untouched
workspace.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent_sandbox.backend.base import Backend, NotHeld, RunHandle, SidecarStart, ask_unix, mounted_path
from agent_sandbox.backend.plan import (
    ExitInfo,
    ImageSet,
    Progress,
    Reach,
    Role,
    RunPlan,
    Started,
    Workload,
    check_note,
)
from agent_sandbox.config.policy import Policy


class Running:
    """One started workload."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.streams: dict[bool, queue.Queue[bytes | None]] = {False: queue.Queue(), True: queue.Queue()}
        self.stopped = threading.Event()
        self.ended = threading.Event()
        self.exit_code: int | None = None
        self.oom = False
        self.stop_calls: list[float] = []

    def say(self, line: str | dict[str, Any], stderr: bool = False) -> None:
        text = line if isinstance(line, str) else json.dumps(line)
        self.streams[stderr].put(text.encode() + b"\n")

    def sleep(self, seconds: float) -> bool:
        """Wait; False once the workload has been stopped."""
        return not self.stopped.wait(seconds)

    def end(self, code: int) -> None:
        if self.ended.is_set():
            return
        self.exit_code = code
        for q in self.streams.values():
            q.put(None)
        self.ended.set()

    def mount(self, target: str) -> Path:
        return Path(next(m.source for m in self.workload.mounts if m.target == target))


Behaviour = Callable[[Running], int | None]


def idle(w: Running) -> int:
    """Runs until stopped."""
    w.stopped.wait()
    return 143


READY = {
    "event": "ready",
    "n": 1,
    "gateway_port": 8080,
    "proxy_port": 3128,
    "egress_mode": "enforce",
    "allow": [],
    "deny": [],
    "allow_private": False,
    "upstream": "http://memory",
    "key_present": True,
}


def sidecar_ready(w: Running) -> int:
    w.say(READY)
    return idle(w)


def finaliser_unchanged(w: Running) -> int:
    out = w.mount("/sandbox/out")
    (out / "result.json").write_text(json.dumps({"status": "unchanged", "head": None}))
    return 0


class MemoryRun(RunHandle):
    def __init__(self, backend: MemoryBackend, run_id: str) -> None:
        self.backend = backend
        self.run_id = run_id
        self.workloads: dict[str, Running] = {}
        self.released: dict[str, threading.Event] = {}
        self.discarded: list[str] = []
        self.torn_down = False
        self.kept_work: list[Path] = []
        self.asked: list[tuple[str, str, bytes]] = []  # every `ask`: role, socket, line
        # As on Docker: the agent's start may come first, from another thread, and waits for the sidecar's.
        self.prepared = False
        self.sidecar = SidecarStart()

    def prepare(self) -> list[dict[str, Any]]:
        self.prepared = True
        return [{"name": f"mem-{self.run_id}", "internal": True}]

    def start(self, workload: Workload, hold: bool = False) -> Started:
        if workload.role == "sidecar":
            return self.sidecar.run(lambda: self._start(workload, hold))
        if workload.reach is Reach.SIDECAR and self.prepared:
            self.sidecar.wait(30)
        return self._start(workload, hold)

    def _start(self, workload: Workload, hold: bool) -> Started:
        if workload.role in self.workloads and not self.workloads[workload.role].ended.is_set():
            raise RuntimeError(f"{workload.role} is already running")
        w = self.workloads[workload.role] = Running(workload)
        self.backend.started.append(workload)
        behaviour = self.backend.behaviours.get(workload.role) or {
            "sidecar": sidecar_ready,
            "finaliser": finaliser_unchanged,
        }.get(workload.role, idle)

        released = self.released.setdefault(workload.role, threading.Event())
        released.clear()

        def run() -> None:
            # Like the agent's entry point, nothing runs before the go-ahead (or ever, if it is stopped first).
            while workload.go_ahead and not released.wait(0.05):
                if w.ended.is_set():
                    return
            try:
                code = behaviour(w)
            except Exception as exc:  # a behaviour that breaks is a workload that crashed
                w.say(f"behaviour failed: {exc!r}", stderr=True)
                code = 1
            w.end(143 if w.stopped.is_set() and code is None else (code or 0))

        threading.Thread(target=run, daemon=True).start()
        if workload.go_ahead and not hold:
            self.release(workload.role)
        return Started(
            security={"name": f"mem-{self.run_id}-{workload.role}", "user": workload.user},
            confinement=["sidecar only"] if workload.go_ahead else None,
        )

    def release(self, role: Role, note: str = "") -> None:
        w = self.workloads[role]
        assert w.workload.go_ahead, f"{role} waits for no go-ahead"
        check_note(note)
        if w.ended.is_set():
            raise NotHeld(f"the {role} ended before its go-ahead")
        Path(w.workload.go_ahead).write_text(note)
        self.released[role].set()

    def discard(self, *roles: Role, network: bool = False) -> None:
        for role in roles:
            if role != "sidecar" and (w := self.workloads.get(role)) is not None and not w.ended.is_set():
                raise AssertionError(f"{role} was discarded while it still ran")
        self.discarded.extend([*roles, *(["network"] if network else [])])

    def _get(self, role: Role) -> Running | None:
        return self.workloads.get(role)

    def output(self, role: Role, stderr: bool = False) -> Iterator[bytes]:
        w = self._get(role)
        if w is None:
            raise RuntimeError(f"no {role}")
        while (chunk := w.streams[stderr].get()) is not None:
            yield chunk

    def stats(self, role: Role) -> Iterator[dict[str, int]]:
        w = self._get(role)
        while w is not None and not w.ended.wait(0.2):
            yield {"memory": 1 << 20, "peak_memory": 2 << 20, "cpu_ns": 10**6, "pids": 3}

    def wait(self, role: Role, timeout: float) -> ExitInfo:
        w = self._get(role)
        if w is not None:
            w.ended.wait(timeout)
        return self.status(role)

    def status(self, role: Role) -> ExitInfo:
        w = self._get(role)
        if w is None:
            return ExitInfo(exit_code=None)
        running = not w.ended.is_set()
        return ExitInfo(exit_code=None if running else w.exit_code, oom_killed=w.oom, running=running)

    def stop(self, role: Role, grace: float) -> None:
        w = self._get(role)
        if w is None:
            return
        w.stop_calls.append(time.monotonic())
        w.stopped.set()
        # A workload that does not end within its grace is killed.
        threading.Timer(min(grace, 0.5), lambda: w.end(137)).start()

    def ask(self, role: Role, socket: str, line: bytes, timeout: float) -> bytes | None:
        # As Docker: the workload's mounts are directories of this machine, where a socket it listens on is.
        w = self._get(role)
        if w is None or w.ended.is_set():
            return None
        self.asked.append((role, socket, line))
        path = mounted_path(w.workload.mounts, socket)
        return ask_unix(path, line, timeout) if path is not None else None

    def remove_workloads(self) -> list[str]:
        return self.teardown()  # as Docker: the work is in the run directory, not in anything of the backend's

    def keep_work(self, dest: Path) -> None:
        self.kept_work.append(dest)  # as Docker: the workspace is the run directory's already

    def teardown(self) -> list[str]:
        for role in list(self.workloads):
            self.stop(role, 0)  # type: ignore[arg-type]
        self.torn_down = True
        self.backend.runs.pop(self.run_id, None)
        return [f"memory:{role}" for role in self.workloads]


class MemoryBackend(Backend):
    """Workloads that run the given behaviours, by role."""

    name = "memory"

    def __init__(
        self, behaviours: dict[str, Behaviour] | None = None, runs: dict[str, dict[str, Any]] | None = None
    ) -> None:
        self.behaviours = behaviours or {}
        self.runs: dict[str, dict[str, Any]] = runs or {}  # what list_runs reports (gc's view)
        self.removed: list[str] = []
        self.handles: dict[str, MemoryRun] = {}
        self.started: list[Workload] = []

    def open_run(self, plan: RunPlan) -> MemoryRun:
        handle = self.handles[plan.run_id] = MemoryRun(self, plan.run_id)
        self.runs[plan.run_id] = {"objects": ["memory"], "supervisor": plan.owner.supervisor, "state": plan.owner.state}
        return handle

    def attach_run(self, run_id: str) -> MemoryRun:
        return self.handles.get(run_id) or MemoryRun(self, run_id)

    def remove_run(self, run_id: str) -> list[str]:
        self.removed.append(run_id)
        objects = self.runs.pop(run_id, {}).get("objects", [])
        if run_id in self.handles:
            self.handles[run_id].teardown()
        return list(objects)

    def list_runs(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.runs.items()}

    def images(self, policy: Policy | None = None, progress: Progress | None = None) -> ImageSet:
        return ImageSet(agent="memory/agent", sidecar="memory/sidecar")

    def image_info(self, image: str) -> dict[str, Any]:
        return {"ref": image, "id": "memory"}
