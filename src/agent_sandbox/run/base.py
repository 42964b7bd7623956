"""What every part of the supervisor shares: the run's declared state, made in one place, and the primitives
that put events on record and stop the run's set-up when it is cancelled."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_sandbox.audit import events as ev
from agent_sandbox.audit.log import AuditLog, Source
from agent_sandbox.audit.redact import Redactor
from agent_sandbox.backend import Backend, RunHandle
from agent_sandbox.backend.plan import ImageSet, Owner, Role, RunPlan, Started, Workload
from agent_sandbox.config.policy import ca_bundle
from agent_sandbox.errors import disk_full
from agent_sandbox.git.checkout import HostRepo
from agent_sandbox.run import quota
from agent_sandbox.run.budget import BrokerEndpoint, SharedBudget
from agent_sandbox.run.liveness import (
    Heartbeat,
    RunLock,
    state_id,
    supervisor_identity,
)
from agent_sandbox.run.output import (
    BACKLOG_BYTES,
    MAX_OUTPUT_BYTES,
    Backlog,
)
from agent_sandbox.run.pool import Claimed
from agent_sandbox.run.progress import Guarded, Reporter, Silent
from agent_sandbox.run.spec import RunSpec
from agent_sandbox.run.state import RunState
from agent_sandbox.run.workloads import DEADLINE_MARGIN, Recipes, Users
from agent_sandbox.store import RunStore

log = logging.getLogger(__name__)

SIDECAR_READY_TIMEOUT = 30.0
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this long
RESULT_GRACE = 10.0  # Claude Code sometimes lingers after printing its result
CHECK_TIMEOUT = 900  # seconds the operator's check may take
DISK_CHECK_INTERVAL = 5.0
RESULT_SLACK = 0.5  # seconds: a model call that started this long after the agent's result is a later call
END_STOP_REASONS = ("end_turn", "stop_sequence")


class _Cancelled(Exception):
    """The run was cancelled while it was being set up."""


class RunBase:
    """The state of one run and the primitives the steps of its flow use (see supervisor.py)."""

    def __init__(
        self,
        spec: RunSpec,
        repo: HostRepo,
        backend: Backend,
        images: ImageSet,
        reporter: Reporter | None = None,
        api_key: str | None = None,
        store: RunStore | None = None,
        daily_budget_usd: float | None = None,
        budget_guard: SharedBudget | None = None,
        slot: Claimed | None = None,
    ) -> None:
        self.spec = spec
        # A run begun ahead by the warm pool (run/pool.py): its directory, lock, networks and held sidecar.
        self.slot = slot
        self._adopted: Started | None = None  # what the pool made, as the sidecar's start would record it
        self._held_config = ""  # the held sidecar's configuration, given at its start
        self.repo = repo
        self.backend = backend
        self.images = images
        self.ui: Reporter = Guarded(reporter) if reporter is not None else Silent()
        self.api_key = api_key
        self.run_dir = Path(spec.run_dir)
        self.github_token = os.environ.get("GITHUB_TOKEN") if spec.open_pr else None
        self.redact = Redactor([v for v in (api_key, self.github_token) if v])
        self.store = store
        self.daily_budget_usd = daily_budget_usd
        self.budget_guard = budget_guard
        self._cancel: tuple[str, str] | None = None
        # The run's objects on the platform, made from a plan that names no platform.
        self.handle: RunHandle = backend.open_run(
            RunPlan(
                run_id=spec.run_id,
                owner=Owner(state=state_id(self.run_dir.parent.parent), supervisor=supervisor_identity()),
            )
        )
        self.lock = RunLock(self.run_dir, slot.lock_fd if slot else None)
        self.heartbeat: Heartbeat | None = None
        self.agent_started = False  # from here on the workspace may hold the agent's work
        self.work_settled = False  # the work is imported, or there was none: the workspace may go
        self.kept: str | None = None  # where the work waits when it could not be imported
        self.environment_failure: str | None = None  # the engine gone, the state disk full: exit code 3
        self.limits = spec.policy.limits
        self.users = Users.here()
        self.chown = self.users.chown
        self.recipes = Recipes(spec, images, self.run_dir, repo.objects, self.users)
        self._q: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._files: list[ev.FileStat] = []  # the diffstat of the imported work
        self.check_result: ev.CheckRan | None = None
        self.broker: BrokerEndpoint | None = None
        self.quota = quota.Quota("sampled", self.limits.disk_bytes, "not planned yet")
        self.ca_pem = ca_bundle(spec.policy)  # the policy's extra certificate authorities, read once
        # The agent's output read but not yet recorded: a flood waits in its container, not in memory here.
        self._agent_backlog = Backlog(BACKLOG_BYTES)
        self._gateway_backlog = Backlog(BACKLOG_BYTES)
        self.state = RunState()  # what the supervisor learns while the agent runs (and the check after it)
        self.audit: AuditLog | None = None
        self.audit_failed: str | None = None
        self._replaying = False  # recovery rebuilds what the run learnt from its trail without recording it
        self._usage = {"samples": 0, "peak_memory_bytes": 0, "cpu_ns": 0, "peak_pids": 0}  # the agent's
        self._disk_done = threading.Event()  # ends the sampled disk measurement
        self._sampler: threading.Thread | None = None  # follows the agent's resource use until it ends
        # The finaliser started ahead, held, once the agent is under way (watch.py): its workload, and the thread
        # starting it, which leaves `started` or `error`.
        self._finaliser_ahead: dict[str, Any] | None = None

    def cancel(self, reason: str = "interrupted", message: str = "cancelled") -> None:
        """Ask a running supervisor (a signal, another thread) to stop its agent; the run still collects, imports
        and tears down. The first request stands."""
        if self._cancel is None:
            self._cancel = (reason, message)

    def _on_signal(self, name: str) -> None:
        self.cancel("interrupted", f"the supervisor received {name}")

    def _checkpoint(self) -> None:
        """Between the steps that set the run up: a cancelled run goes no further (and still tears down)."""
        if self._cancel is not None:
            raise _Cancelled

    def _record(self, event: ev.Event, source: Source = "supervisor") -> None:
        """Put one of the supervisor's own events on record."""
        self._append(lambda audit: audit.write(event, source))
        if isinstance(event, ev.LimitHit | ev.AgentLingered):
            # The agent is about to be stopped: its output must not hold up the stop (after a flood, nothing
            # more of it is kept).
            self._agent_backlog.close(0 if self.state.flooded else MAX_OUTPUT_BYTES)

    def _record_untrusted(self, source: Source, type_: str, payload: dict[str, Any]) -> None:
        """Put on record an event parsed from a workload's output (checked against its model on the way)."""
        self._append(lambda audit: audit.write_untrusted(source, type_, payload))

    def _append(self, write: Callable[[AuditLog], None]) -> None:
        if self.audit is None or self._replaying:
            return
        try:
            write(self.audit)
        except OSError as exc:
            # A full state disk must not take the run down with it: the work comes first.
            if not self.audit_failed:
                self.audit_failed = f"the audit trail could not be written: {exc}"
                log.warning("audit_write_failed run_id=%s error=%r", self.spec.run_id, exc)
                if disk_full(exc):
                    self.environment_failure = f"the state directory's filesystem is full ({exc.strerror})"

    def _tail(self, role: Role) -> str:
        try:
            out = b"".join(self.handle.output(role, stderr=True))
            return self.redact(out.decode(errors="replace")[-1500:]) or "(no output)"
        except Exception as exc:
            return f"(no logs: {exc})"

    def _deadline(self) -> float:
        """Seconds after which the run's own containers end it whatever happens to the supervisor: past the
        wall clock, with room for the check and the supervisor's own stop."""
        return float(self.limits.wall_seconds + DEADLINE_MARGIN)

    def _start(self, workload: Workload, **record: Any) -> None:
        """Start a workload of the plan and put its security settings (and its confinement) on record."""
        self._record_started(workload, self.handle.start(workload), **record)

    def _record_started(self, workload: Workload, started: Started, **record: Any) -> None:
        self._record(ev.ContainerCreated(role=workload.role, security=started.security, **record))
        if started.confinement is not None:
            self._record(
                ev.NetworkIsolated(
                    container=started.security.get("name", workload.role),
                    default_route=f"removed; routes left: {'; '.join(started.confinement)}",
                )
            )
