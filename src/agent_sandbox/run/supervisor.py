"""The supervisor: runs one task from prepared checkout to imported branch, and always tears down.

Everything that limits the agent lives here or in the sidecar, outside the agent's container: the wall
clock, idle time, turns and the budget. Whatever ends the run, the finaliser still packs the agent's work,
the host imports it, and every container and network labelled with the run id is removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import git
import psutil

from agent_sandbox.audit.log import AuditLog
from agent_sandbox.audit.redact import Redactor
from agent_sandbox.backend import Backend, ContainerSpec, Mount, NetworkSpec
from agent_sandbox.backend.base import ROLE_LABEL, RUN_LABEL, SUPERVISOR_LABEL
from agent_sandbox.backend.images import ImageSet
from agent_sandbox.config.policy import ca_bundle
from agent_sandbox.errors import ExitCode, SandboxError, disk_full
from agent_sandbox.git.checkout import (
    CONTAINER_OBJECTS,
    HostRepo,
    Imported,
    branch_exists,
    import_bundle,
    prepare_checkout,
    remove_tree,
)
from agent_sandbox.git.gate import Violation
from agent_sandbox.git.gate import check as gate_check
from agent_sandbox.git.handoff import HandoffError, open_pull_request, push_branch
from agent_sandbox.interrupts import interrupts
from agent_sandbox.run import agent_stream, quota, report
from agent_sandbox.run.budget import BrokerEndpoint, SharedBudget, remove_leftovers
from agent_sandbox.run.liveness import (
    HEARTBEAT_DIR,
    HEARTBEAT_FILE,
    HEARTBEAT_TIMEOUT,
    STATE_LABEL,
    Heartbeat,
    RunLock,
    state_id,
)
from agent_sandbox.run.spec import EXIT_BY_REASON, HANDOFF_FAILED, STATUS_BY_REASON, RunSpec, RunSummary, Tokens
from agent_sandbox.sidecar.config import CONFIG_ENV, GATEWAY_PORT, KEY_ENV, PROXY_PORT, SidecarConfig
from agent_sandbox.sidecar.egress import DecisionTally
from agent_sandbox.sidecar.egress import overview as egress_overview
from agent_sandbox.store import RunStore

log = logging.getLogger(__name__)

AGENT_UID = 1000
SIDECAR_UID = 1001
SIDECAR_ALIAS = "sidecar"
PLACEHOLDER_KEY = "sk-sandbox-placeholder-not-a-key"
SIDECAR_READY_TIMEOUT = 30.0
STOP_GRACE = 5.0  # SIGTERM, then SIGKILL after this long
RESULT_GRACE = 10.0  # Claude Code sometimes lingers after printing its result
FINALISER_TIMEOUT = 300.0
CHECK_TIMEOUT = 900  # seconds the operator's check may take
DISK_CHECK_INTERVAL = 5.0
SIDECAR_EVENTS = "events.jsonl"  # the sidecar's own numbered copy of its lines, in run_dir/model, for recovery
DEADLINE_MARGIN = 120  # seconds the containers' own deadline leaves the supervisor past the wall clock
API_KEY_ENV = "ANTHROPIC_API_KEY"
# The agent's output (stdout and stderr together) is bounded: a longer line is cut (and recorded as cut),
# more output in all ends the run with limit output_flood. Below these bounds no line is lost.
MAX_LINE_BYTES = 1024**2
MAX_OUTPUT_BYTES = 64 * 1024**2
MAX_OUTPUT_LINES = 1_000_000
BACKLOG_BYTES = 8 * 1024**2  # agent output read but not yet recorded; beyond it the container's writes wait
RESULT_SLACK = 0.5  # seconds: a model call that started this long after the agent's result is a later call
END_STOP_REASONS = ("end_turn", "stop_sequence")


# A sweep's budget: the ledger its runs' gateways reserve and settle against (run/budget.py).
BudgetGuard = SharedBudget


class Reporter(Protocol):
    """Where live progress goes (a terminal, plain lines in CI, or nowhere)."""

    def begin(self, run_id: str, limits: Any, model: str) -> None: ...
    def phase(self, name: str, detail: str = "") -> None: ...
    def event(self, kind: str, text: str) -> None: ...
    def status(self, **fields: Any) -> None: ...
    def end(self) -> None: ...


class _Silent:
    def begin(self, run_id: str, limits: Any, model: str) -> None:
        pass

    def phase(self, name: str, detail: str = "") -> None:
        pass

    def event(self, kind: str, text: str) -> None:
        pass

    def status(self, **fields: Any) -> None:
        pass

    def end(self) -> None:
        pass


class Guarded:
    """A reporter that can never hold up or end the run: a terminal gone (an ssh drop; rich turns the broken
    pipe into SystemExit) or any error silences it for good, and long texts are cut (a 16 kB host name is
    not a progress line)."""

    TEXT_LIMIT = 300

    def __init__(self, inner: Reporter) -> None:
        self.inner: Reporter | None = inner

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, name)(*args, **kwargs)
        except (Exception, SystemExit) as exc:
            log.warning("reporter_silenced error=%r", exc)
            self.inner = None

    def begin(self, run_id: str, limits: Any, model: str) -> None:
        self._call("begin", run_id, limits, model)

    def phase(self, name: str, detail: str = "") -> None:
        self._call("phase", name, detail[:self.TEXT_LIMIT])

    def event(self, kind: str, text: str) -> None:
        self._call("event", kind, text[:self.TEXT_LIMIT])

    def status(self, **fields: Any) -> None:
        self._call("status", **fields)

    def end(self) -> None:
        self._call("end")


@dataclass
class _Watch:
    """What the supervisor learns while the agent runs."""

    reason: str | None = None  # set when the supervisor ends the run itself
    message: str = ""
    result: dict[str, Any] | None = None
    result_at: float | None = None
    last_activity: float = field(default_factory=time.monotonic)
    turns: set[str] = field(default_factory=set)
    spent_usd: float = 0.0
    model_calls: int = 0
    budget_refused: bool = False
    sidecar_gone: bool = False
    egress_allowed: int = 0
    egress_denied: int = 0
    egress_would_deny: int = 0
    egress_lines: DecisionTally = field(default_factory=DecisionTally)  # the decision lines, for the summary
    tokens: Tokens = field(default_factory=Tokens)
    # The agent's output, bounded (output_flood), and what the gateway saw, which decides `completed`.
    sidecar_bytes: int = 0  # the sidecar's lines, bounded like the agent's output (egress_flood)
    egress_unrecorded: int = 0
    output_bytes: int = 0
    output_lines: int = 0
    flooded: bool = False
    open_tools: dict[str, str] = field(default_factory=dict)  # tool calls the agent reported without a result
    open_at_result: list[str] = field(default_factory=list)
    gateway_calls: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (read at, model_call)


def _owner() -> tuple[tuple[int, int] | None, str, str]:
    """Who owns the run's files and whom containers run as: (chown target, agent user, sidecar user)."""
    if os.getuid() == 0:
        # Claude Code refuses to skip permission prompts as root, and the agent must not be root anyway.
        return (AGENT_UID, AGENT_UID), f"{AGENT_UID}:{AGENT_UID}", f"{SIDECAR_UID}:{SIDECAR_UID}"
    me = f"{os.getuid()}:{os.getgid()}"
    return None, me, me


def host_addresses() -> list[str]:
    """Every address of this host's interfaces: the proxy refuses them like private ones."""
    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%")[0])
    return sorted(out)


def supervisor_identity() -> str:
    """pid:start-time of this process: `sandbox gc` tells a live supervisor from a dead one by it."""
    me = psutil.Process()
    return f"{me.pid}:{me.create_time():.2f}"


def tree_size(root: Path) -> int:
    """Bytes allocated under root, not following links, as `du` counts them: it walks by directory handles,
    so a tree nested deeper than a recursive walk survives, or longer than PATH_MAX, hides nothing."""
    proc = subprocess.run(["du", "-s", "-B1", "-P", "--", str(root)], capture_output=True, text=True)
    try:
        return int(proc.stdout.split()[0])
    except (IndexError, ValueError):
        raise SandboxError(f"cannot measure {root}: {proc.stderr.strip()[-300:]}") from None


RESULT_LIMIT = 1024**2


def read_result(path: Path) -> dict[str, Any]:
    """A result file a container wrote into a directory it could write (the check's is shared with the code it
    ran): read on the host only as a plain file, never through a link, a FIFO or a device, and at most
    RESULT_LIMIT bytes. OSError or ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > RESULT_LIMIT:
            raise ValueError(f"{path.name} is not a plain file of at most {RESULT_LIMIT} bytes")
        data = os.read(fd, RESULT_LIMIT + 1)
    finally:
        os.close(fd)
    result = json.loads(data)
    if not isinstance(result, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return result


def proxy_env() -> dict[str, str]:
    """Proxy settings for the agent, in every spelling its tools read."""
    url = f"http://{SIDECAR_ALIAS}:{PROXY_PORT}"
    no_proxy = f"{SIDECAR_ALIAS},localhost,127.0.0.1"
    env = {name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                                  "npm_config_proxy", "npm_config_https_proxy", "PIP_PROXY")}
    env.update(NO_PROXY=no_proxy, no_proxy=no_proxy)
    return env


class _Line(str):
    """A line of a container's output: `size` is its length in bytes as written, `cut` how many of those were
    dropped (beyond MAX_LINE_BYTES), `at` when the supervisor read it (monotonic)."""

    size: int = 0
    cut: int = 0
    at: float = 0.0


def _line(parts: list[bytes], size: int) -> _Line:
    raw = b"".join(parts)
    line = _Line(raw.decode("utf-8", errors="replace"))
    line.size, line.cut, line.at = size, size - len(raw), time.monotonic()
    return line


def _lines(chunks: Iterator[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[_Line]:
    """Lines out of a byte stream, in linear time: each chunk is scanned once, and at most `limit` bytes of a
    line are kept (the rest is counted, not buffered), so a line of any length costs bounded memory."""
    parts: list[bytes] = []
    kept = size = 0
    for chunk in chunks:
        start, n = 0, len(chunk)
        while start < n:
            end = chunk.find(b"\n", start)
            stop = n if end < 0 else end
            size += stop - start
            if kept < limit and stop > start:
                take = min(stop - start, limit - kept)
                parts.append(chunk[start:start + take])
                kept += take
            if end < 0:
                break
            yield _line(parts, size)
            parts, kept, size = [], 0, 0
            start = end + 1
    if size:
        yield _line(parts, size)


class _Backlog:
    """Bytes of the agent's output read but not yet recorded. The pump waits while there are too many, so a
    flood waits in the container (its writes block, as the backend attaches to its output) instead of piling
    up in the supervisor's memory or being dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self.open = True
        self.allowance = 0  # once closed: bytes still passed on; beyond them lines are read and dropped
        self._cond = threading.Condition()

    def add(self, n: int) -> bool:
        """Wait for room; False when the line is to be dropped (the run is ending and past its allowance)."""
        with self._cond:
            while self.open and self.pending > self.limit:
                self._cond.wait(1.0)
            if not self.open:
                self.allowance -= n
                return self.allowance >= 0
            self.pending += n
            return True

    def done(self, n: int) -> None:
        with self._cond:
            self.pending -= n
            self._cond.notify_all()

    def close(self, allowance: int) -> None:
        """Stop holding the writer back (the agent is being stopped, and a blocked writer would hold up its
        stop): up to `allowance` more bytes are passed on, the rest read and dropped."""
        with self._cond:
            self.allowance = allowance if self.open else min(self.allowance, allowance)
            self.open = False
            self._cond.notify_all()



class _Cancelled(Exception):
    """The run was cancelled while it was being set up."""


class Supervisor:
    def __init__(self, spec: RunSpec, repo: HostRepo, backend: Backend, images: ImageSet,
                 reporter: Reporter | None = None, api_key: str | None = None, store: RunStore | None = None,
                 daily_budget_usd: float | None = None, budget_guard: BudgetGuard | None = None) -> None:
        self.spec = spec
        self.repo = repo
        self.backend = backend
        self.images = images
        self.ui: Reporter = Guarded(reporter) if reporter is not None else _Silent()
        self.api_key = api_key
        self.run_dir = Path(spec.run_dir)
        self.github_token = os.environ.get("GITHUB_TOKEN") if spec.open_pr else None
        self.redact = Redactor([v for v in (api_key, self.github_token) if v])
        self.store = store
        self.daily_budget_usd = daily_budget_usd
        self.budget_guard = budget_guard
        self._cancel: tuple[str, str] | None = None
        self.labels = {RUN_LABEL: spec.run_id, SUPERVISOR_LABEL: supervisor_identity(),
                       STATE_LABEL: state_id(self.run_dir.parent.parent)}
        self.lock = RunLock(self.run_dir)
        self.heartbeat: Heartbeat | None = None
        self.agent_started = False  # from here on the workspace may hold the agent's work
        self.work_settled = False  # the work is imported, or there was none: the workspace may go
        self.kept: str | None = None  # where the work waits when it could not be imported
        self.environment_failure: str | None = None  # the engine gone, the state disk full: exit code 3
        self.prefix = f"sbx-{spec.run_id}"
        self.limits = spec.policy.limits
        self.chown, self.agent_user, self.sidecar_user = _owner()
        self._q: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._files: list[dict[str, Any]] = []  # the diffstat of the imported work
        self.check_result: dict[str, Any] | None = None
        self.broker: BrokerEndpoint | None = None
        self.quota = quota.Quota("sampled", self.limits.disk_bytes, "not planned yet")
        self.ca_pem = ca_bundle(spec.policy)  # the policy's extra certificate authorities, read once
        # The agent's output read but not yet recorded: a flood waits in its container, not in memory here.
        self._agent_backlog = _Backlog(BACKLOG_BYTES)
        self._gateway_backlog = _Backlog(BACKLOG_BYTES)
        self.state = _Watch()  # what the supervisor learns while the agent runs (and the check after it)
        self.audit: AuditLog | None = None
        self.audit_failed: str | None = None
        self._replaying = False  # recovery rebuilds what the run learnt from its trail without recording it

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

    # --- the run --------------------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """The run, from a new run directory to its summary. It holds the run's lock (liveness.py) throughout:
        whoever can take it knows the supervisor is gone. Signals stop the agent (interrupts.py); nothing
        interrupts the collection, import and teardown that follow."""
        self.run_dir.mkdir(parents=True, exist_ok=False)
        self.lock.acquire()
        try:
            with interrupts.delivered_to(self._on_signal):
                return self._run()
        finally:
            self.lock.release()

    def _run(self) -> RunSummary:
        started = time.monotonic()
        self.audit = AuditLog(self.run_dir / "audit.jsonl", self.spec.run_id, self.redact)
        (self.run_dir / "spec.json").write_text(self.redact(self.spec.model_dump_json(indent=2)))
        if self.store:
            self.store.run_started({
                "id": self.spec.run_id, "repo": self.spec.repo, "base_commit": self.spec.base_commit,
                "branch": self.spec.branch, "task": self.redact(self.spec.task.strip().splitlines()[0][:300]),
                "policy": self.spec.policy.name, "policy_sha256": self.spec.policy.digest(), "status": "running",
                "started_at": time.time(), "run_dir": str(self.run_dir), "supervisor_pid": os.getpid()})
        watch = self.state
        imported: Imported | None = None
        oom = False
        agent_exit: int | None = None
        error: str | None = None
        self.ui.begin(self.spec.run_id, self.limits, self.spec.model)
        try:
            self._record_start()
            self._checkpoint()
            self.ui.phase("prepare", f"checkout of {self.spec.base_commit[:12]} on {self.spec.branch}")
            self._prepare()
            self._checkpoint()
            self.ui.phase("start", "networks and sidecar")
            self._start_sidecar()
            self._checkpoint()
            self.ui.phase("agent", f"Claude Code {self.images.claude_code_version}, model {self.spec.model}")
            agent = self._start_agent()
            try:
                self._watch(agent, watch)
            except KeyboardInterrupt:  # signals not taken over (interrupts.py): the agent still stops cleanly
                self.cancel("interrupted", "the supervisor was interrupted")
                self._limit(agent, watch, "interrupted", "the supervisor was interrupted", grace=1.0)
            info = self.backend.wait(agent, STOP_GRACE + 5)
            oom, agent_exit = info.oom_killed, info.exit_code
            self._record_usage()
            reason, message = self._reason(watch, info.exit_code, oom)
            if watch.reason is None and reason in ("turns", "budget"):
                # Claude Code's own layer (--max-turns) or the gateway's refusal got there first.
                self._record("limit_hit", {"limit": reason, "reason": reason, "message": message})
            self.ui.phase("collect", "packing the agent's work")
            imported, fin_error = self._collect(reason)
            if fin_error and reason == "completed":
                reason, message = "error", fin_error
            check = self.check_result
            if (check is not None and check.get("exit_code") != 0 and not check.get("interrupted")
                    and reason == "completed"):
                reason = "check"
                message = f"the check `{self.spec.check}` failed (exit {check.get('exit_code')}) on the agent's work"
        except (_Cancelled, KeyboardInterrupt):
            self.cancel("interrupted", "the supervisor was interrupted")
            assert self._cancel is not None
            reason, message = self._cancel[0], f"{self._cancel[1]} before the agent started"
        except SandboxError as exc:
            reason, message, error = "error", exc.message, exc.message
            if exc.exit_code == ExitCode.ENVIRONMENT:
                self.environment_failure = exc.message
        except Exception as exc:  # a bug or a backend failure: the run is an error, and teardown still runs
            log.exception("run_failed run_id=%s", self.spec.run_id)
            reason, message, error = "error", f"{type(exc).__name__}: {exc}", repr(exc)
            if disk_full(exc):
                self.environment_failure = message = f"the state directory's filesystem is full: {exc}"
        finally:
            self._teardown()
        if self._cancel is not None and reason in ("completed", "check"):
            # Stopped after the agent had finished (during the collection or the check): the run is
            # interrupted, and its work, already packed, is on the branch all the same.
            check = self.check_result or {}
            when = "during the check" if check.get("interrupted") else "after the agent finished"
            unchecked = bool(self.spec.check) and (not check or check.get("interrupted"))
            landed = "; its work is on the branch" + (", unchecked" if unchecked else "")
            reason, message = self._cancel[0], f"{self._cancel[1]} {when}" + (
                landed if imported and imported.head else "")
        if self.backend.engine_lost and self.environment_failure is None:
            self.environment_failure = "the Docker engine went away during the run (stopped or restarted)"
            if reason in ("completed", "error"):
                reason, message = "error", f"{self.environment_failure}: {message}"
        return self._finish(reason, message, watch, imported, oom, agent_exit, error, started)

    def _finish(self, reason: str, message: str, watch: _Watch, imported: Imported | None, oom: bool,
                agent_exit: int | None, error: str | None, started: float) -> RunSummary:
        """The gate, the summary, the push and pull request, the last audit line and the store: what comes
        after teardown, for a run and for its recovery. A full state disk loses records here, never the work."""
        violations: list[Violation] = []
        if imported and imported.head and error is None:
            try:
                gate = gate_check(self.repo, self.spec.base_commit, imported.head, self.spec.policy.git)
                violations = gate.violations
                self._record("gate", gate.model_dump())
            except Exception as exc:  # a gate that cannot run must not let the change through
                violations = [Violation(rule="gate", detail=f"the gate could not check the change: {exc}")]
            if violations and reason == "completed":
                reason = "policy"
                message = f"the change breaks the policy's git rules ({len(violations)} violation(s)); kept locally"
        if self.kept:
            message += (f"; the agent's work is kept in {self.kept}: `sandbox gc` imports it onto "
                        f"{self.spec.branch} once {'the cause is' if not self.environment_failure else 'that is'} "
                        "fixed")
        summary = self._summary(reason, message, watch, imported, oom, time.monotonic() - started)
        summary.violations = violations
        summary.kept = self.kept
        if self.environment_failure:
            summary.exit_code = int(ExitCode.ENVIRONMENT)
        self._handoff(summary)
        self.ui.end()
        if self.spec.open_pr and summary.pushed:
            self._open_pr(summary)
        self._record("run_ended", {"status": summary.status, "reason": reason, "message": message,
                                   "exit_code": summary.exit_code, "agent_exit_code": agent_exit,
                                   "oom_killed": oom, "error": error, "interrupted": reason == "interrupted",
                                   "cost_usd": summary.cost_usd, "branch": summary.branch,
                                   "pushed": summary.pushed, "pr_url": summary.pr_url})
        if self.audit is not None:
            self.audit.close()
            summary.audit_head = self.audit.head
        try:
            self._write_summary(summary)
        except Exception as exc:
            # The run is over and its work is where the summary says; only the records are missing. The
            # store keeps the run as running, so `sandbox gc` finishes it once there is room again.
            log.warning("summary_not_written run_id=%s error=%r", self.spec.run_id, exc)
            if disk_full(exc) and not self.environment_failure:
                summary.exit_code = int(ExitCode.ENVIRONMENT)
                summary.message += "; the state directory's filesystem is full, the run's records are incomplete"
        return summary

    def _teardown(self) -> None:
        """Remove every object of the run and release its files. Nothing here raises: what cannot be removed
        now (the engine gone) keeps its labels for `sandbox gc`, and work not yet imported is kept."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        # Nobody reads the sidecar's lines any more: its pump must not wait for room (a sweep's or the service's
        # process lives on).
        self._gateway_backlog.close(0)
        removed: list[str] = []
        failure: str | None = None
        try:
            removed = self.backend.remove_run(self.spec.run_id)
        except Exception as exc:
            failure = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("teardown_failed run_id=%s error=%s", self.spec.run_id, failure)
        if self.broker is not None:
            try:
                held = self.broker.close()  # what the sidecar still held is booked at its worst case
                if held:
                    log.info("shared_budget_held run_id=%s usd=%.6f", self.spec.run_id, held)
            except Exception as exc:
                log.warning("shared_budget_close_failed run_id=%s error=%r", self.spec.run_id, exc)
        try:
            self._cleanup_files()
        except Exception as exc:
            log.warning("cleanup_failed run_id=%s error=%r", self.spec.run_id, exc)
        self._record("teardown", {"removed": removed, "error": failure, "kept": self.kept})

    # --- recovery -------------------------------------------------------------------------------------------

    @classmethod
    def for_recovery(cls, run_dir: Path, backend: Backend, images: ImageSet, store: RunStore | None,
                     reporter: Reporter | None = None) -> Supervisor:
        """A supervisor for a run another process started and did not finish (recovery.py holds its lock)."""
        from agent_sandbox.git.checkout import open_repo

        spec = RunSpec.model_validate_json((run_dir / "spec.json").read_text())
        return cls(spec, open_repo(spec.repo), backend, images, reporter, store=store)

    def recover(self, why: str, by: str) -> RunSummary:
        """Finish a run whose supervisor is gone, or whose work waits to be imported: stop what still runs,
        record what the sidecar and the agent did that the trail lacks, pack and import the work, tear down,
        and write the summary. The caller holds the run's lock."""
        started = time.monotonic()
        self.audit, dropped = AuditLog.resume(self.run_dir / "audit.jsonl", self.spec.run_id, self.redact)
        prior_path = self.run_dir / "summary.json"
        prior = RunSummary.model_validate_json(prior_path.read_text()) if prior_path.exists() else None
        self.cancel("interrupted", why)  # no check and no push for recovered work
        self.agent_started = True
        watch, recorded = self._replay()
        # Stopped first, so that their logs end and the workspace stops changing; removed once read.
        for role in ("agent", "check", "finalise", "sidecar"):
            self.backend.stop(f"{self.prefix}-{role}", 1)
        gateway_lines, lost = self._unrecorded_sidecar(recorded)
        agent_lines = self._unrecorded(f"{self.prefix}-agent", False, self._stream_lines())
        self._record("recovery", {"by": by, "why": why, "dropped_bytes": dropped,
                                  "gateway_lines": len(gateway_lines), "gateway_lines_lost": lost,
                                  "agent_lines": len(agent_lines)})
        for line in gateway_lines:
            self._gateway_event(line, watch)
        with (self.run_dir / "agent-stream.jsonl").open("a", encoding="utf-8") as stream:
            for line in agent_lines:
                self._keep_line(stream, line)
                self._agent_line(f"{self.prefix}-agent", line, watch)
        imported: Imported | None = None
        error: str | None = None
        try:
            self.backend.remove_run(self.spec.run_id)
            quota.remount(self.run_dir / "workspace")
            if (self.run_dir / "workspace" / ".git").exists():
                for sub in ("out", "in"):
                    (self.run_dir / sub).mkdir(exist_ok=True)
                (self.run_dir / "out" / "result.json").unlink(missing_ok=True)
                imported, fin_error = self._collect("interrupted")
                error = fin_error
            elif (imported := self._on_branch()) is not None:
                # The workspace is gone because the work was imported: the branch is what there is.
                self.work_settled = True
            else:
                self.work_settled = True  # nothing left to import, and nothing to keep
        except SandboxError as exc:
            error = exc.message
            if exc.exit_code == ExitCode.ENVIRONMENT:
                self.environment_failure = exc.message
        except Exception as exc:
            log.exception("recovery_failed run_id=%s", self.spec.run_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._teardown()
            remove_leftovers(self.spec.run_id)
        if imported is not None and imported.head:
            self._files = self._diffstat(imported)
        landed = f"its work is on {imported.branch}" if imported and imported.head else (
            "it had changed nothing" if imported else f"its work could not be imported: {error}")
        if prior is not None:
            reason = prior.reason
            before = prior.message.split("; the agent's work is kept")[0]
            message = f"{before}; recovered by {by}: {landed}"
        else:
            reason, message = "interrupted", f"{why}; recovered by {by}: {landed}"
        log.info("recovered run_id=%s by=%s imported=%s", self.spec.run_id, by, bool(imported and imported.head))
        return self._finish(reason, message, watch, imported, False, None, error, started)

    def _unrecorded_sidecar(self, seen: int) -> tuple[list[_Line], int]:
        """The sidecar's lines past number `seen`, from its container's log, and how many of them the log no
        longer has (rotated away). Every line but egress decisions is kept; egress lines (a connection flood)
        up to the live run's output bound, so that a flood cannot hide the model calls after it."""
        out: list[_Line] = []
        expected, missing = seen + 1, 0
        egress_bytes = 0
        kept = self.run_dir / "model" / SIDECAR_EVENTS
        try:
            # The sidecar's own file, which no flood rotates away; its container's log where there is none.
            if kept.is_file() and not kept.is_symlink():
                fh = kept.open("rb")
                source: Iterator[bytes] = iter(lambda: fh.read(1 << 20), b"")
            else:
                fh, source = None, self.backend.output(f"{self.prefix}-sidecar")
            for line in _lines(source):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                n = event.get("n") if isinstance(event, dict) else None
                if not isinstance(n, int) or n <= seen:
                    continue
                missing += max(0, n - expected)  # rotated out of the log, or past the file's egress cap
                expected = n + 1
                if event.get("event") == "egress":
                    egress_bytes += line.size + 1
                    if egress_bytes > MAX_OUTPUT_BYTES:
                        continue
                out.append(line)
            if fh is not None:
                fh.close()
        except Exception as exc:  # the container is gone (removed, or the engine restarted without it)
            log.info("no_sidecar_log run_id=%s error=%r", self.spec.run_id, exc)
        return out, missing

    def _stream_lines(self) -> int:
        path = self.run_dir / "agent-stream.jsonl"
        if not path.exists():
            return 0
        with path.open("rb") as fh:
            return sum(1 for _ in fh)

    def _unrecorded(self, container: str, stderr: bool, seen: int) -> list[_Line]:
        """The lines of a stopped container's log past the first `seen` (which the trail has already)."""
        out: list[_Line] = []
        size = 0
        try:
            for n, line in enumerate(_lines(self.backend.output(container, stderr=stderr))):
                if n < seen:
                    continue
                size += line.size + 1
                if size > MAX_OUTPUT_BYTES or len(out) >= MAX_OUTPUT_LINES:
                    break  # the same bounds as a live run's: a flood is not read back in full either
                out.append(line)
        except Exception as exc:  # the container is gone (removed, or the engine restarted without it)
            log.info("no_container_log container=%s error=%r", container, exc)
        return out

    def _replay(self) -> tuple[_Watch, int]:
        """What the run had learnt (spend, calls, tokens, egress, turns, the agent's result), rebuilt from its
        trail and stream without recording anything again; and how many of the sidecar's (numbered) lines the
        trail has: one event each, in order."""
        assert self.audit is not None
        w = _Watch()
        sidecar_lines = 0
        self._replaying = True
        try:
            for e in self.audit.events():
                if e.get("source") not in ("gateway", "proxy"):
                    continue
                sidecar_lines += e.get("type") != "sidecar_output"
                if isinstance(e.get("payload"), dict):
                    self._gateway_event(json.dumps({"event": e.get("type"), **e["payload"]}), w)
            path = self.run_dir / "agent-stream.jsonl"
            if path.exists():
                with path.open(encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        self._agent_line(f"{self.prefix}-agent", line.rstrip("\n"), w)
        finally:
            self._replaying = False
        w.reason = None
        return w, sidecar_lines

    # --- steps ----------------------------------------------------------------------------------------------

    def _record(self, type_: str, payload: dict[str, Any], source: str = "supervisor") -> None:
        if self.audit is not None and not self._replaying:
            try:
                self.audit.write(source, type_, payload)  # type: ignore[arg-type]
            except OSError as exc:
                # A full state disk must not take the run down with it: the work comes first.
                if not self.audit_failed:
                    self.audit_failed = f"the audit trail could not be written: {exc}"
                    log.warning("audit_write_failed run_id=%s error=%r", self.spec.run_id, exc)
                    if disk_full(exc):
                        self.environment_failure = f"the state directory's filesystem is full ({exc.strerror})"
        if type_ in ("limit_hit", "agent_lingered"):
            # The agent is about to be stopped: its output must not hold up the stop (after a flood, nothing
            # more of it is kept).
            self._agent_backlog.close(0 if self.state.flooded else MAX_OUTPUT_BYTES)

    def _record_start(self) -> None:
        images = {}
        for role, ref in (("agent", self.images.agent), ("sidecar", self.images.sidecar)):
            try:
                images[role] = self.backend.image_info(ref)
            except Exception as exc:  # recorded, not fatal: the start of the container will say more
                images[role] = {"ref": ref, "error": str(exc)}
        self._record("run_started", {
            "spec": self.spec.model_dump(mode="json", exclude={"task"}),
            "task": self.spec.task,
            "policy_hash": self.spec.policy.digest(),
            "images": images,
            "claude_code_version": self.images.claude_code_version,
            "backend": self.backend.name,
        })

    def _prepare(self) -> None:
        for sub in ("in", "out", "model"):
            (self.run_dir / sub).mkdir()
        (self.run_dir / "in" / "task.md").write_text(self.spec.task)
        if self.ca_pem:
            (self.run_dir / "in" / "ca-certificates.pem").write_text(self.ca_pem)
        for name, command in (("pre.sh", self.spec.pre), ("check.sh", self.spec.check)):
            if command:
                (self.run_dir / "in" / name).write_text(f"#!/bin/bash\nset -o pipefail\n{command}\n")
        # The workspace is a filesystem of the disk limit's size where the machine allows it (quota.py).
        self.quota = quota.plan(self.run_dir.parent, self.limits.disk_bytes)
        self._record("disk_quota", {"mode": self.quota.mode, "bytes": self.quota.size_bytes,
                                    "detail": self.quota.detail})
        quota.mount(self.run_dir / "workspace", self.quota)
        prepare_checkout(self.repo, self.spec.base_commit, self.run_dir / "workspace", self.spec.branch, self.chown)
        if self.chown:
            os.chown(self.run_dir / "out", *self.chown)
            os.chown(self.run_dir / "model", SIDECAR_UID, SIDECAR_UID)
        self._record("checkout_prepared", {"base_commit": self.spec.base_commit, "branch": self.spec.branch,
                                           "objects": str(self.repo.objects)})
        for name, internal in ((f"{self.prefix}-int", True), (f"{self.prefix}-egress", False)):
            self.backend.create_network(NetworkSpec(name=name, internal=internal, labels=self.labels))
            self._record("network_created", {"name": name, "internal": internal})

    def _start_sidecar(self) -> None:
        egress = self.spec.policy.egress
        budget = self.limits.budget_usd
        if self.spec.daily_remaining_usd is not None:
            # The gateway stops at whichever comes first: the run's budget or what is left of the day's.
            budget = min(budget, self.spec.daily_remaining_usd)
        if self.budget_guard is not None:
            budget = min(budget, self.budget_guard.remaining())
        config = SidecarConfig(run_id=self.spec.run_id, upstream_url=self.spec.upstream_url, budget_usd=budget,
                               prices=self.spec.policy.pricing, egress=egress, own_addresses=host_addresses(),
                               gateway_name=SIDECAR_ALIAS, extra_ca_pem=self.ca_pem,
                               server_tools=list(self.spec.policy.agent.server_tools),
                               # The backstop should the supervisor die (liveness.py): no model call and no
                               # connection once its heartbeat stops, or once the run is over by the clock.
                               heartbeat_path=f"/sandbox/heartbeat/{HEARTBEAT_FILE}",
                               heartbeat_timeout_s=HEARTBEAT_TIMEOUT,
                               events_path=f"/sandbox/model-out/{SIDECAR_EVENTS}",
                               # The check, after the agent, still reaches the network through the proxy.
                               deadline_s=self._deadline() + (CHECK_TIMEOUT + DEADLINE_MARGIN if self.spec.check
                                                              else 0))
        self.heartbeat = Heartbeat(self.run_dir)
        self.heartbeat.start()
        mounts = [Mount(source=str(self.run_dir / "model"), target="/sandbox/model-out", read_only=False),
                  Mount(source=str(self.run_dir / HEARTBEAT_DIR), target="/sandbox/heartbeat", read_only=True)]
        if self.budget_guard is not None:
            # The shared budget's ledger, on a socket in a directory mounted into the sidecar alone.
            sidecar_owner = (SIDECAR_UID, SIDECAR_UID) if self.chown else None
            self.broker = self.budget_guard.serve(self.spec.run_id, sidecar_owner)
            config.broker_socket = "/sandbox/budget/" + self.broker.path.name
            mounts.append(Mount(source=str(self.broker.path.parent), target="/sandbox/budget", read_only=True))
        if self.spec.model_script:
            config.script_path = "/sandbox/model/script.yaml"
            config.transcript_path = "/sandbox/model-out/transcript.jsonl"
            mounts.append(Mount(source=self.spec.model_script, target=config.script_path))
        spec = ContainerSpec(
            name=f"{self.prefix}-sidecar", image=self.images.sidecar, user=self.sidecar_user,
            env={CONFIG_ENV: config.model_dump_json()},
            secret_env={KEY_ENV: self.api_key} if self.api_key else {},
            mounts=mounts, networks=[f"{self.prefix}-int", f"{self.prefix}-egress"], aliases=[SIDECAR_ALIAS],
            tmpfs={"/tmp": "rw,nosuid,nodev,noexec,size=64m"},
            memory_bytes=512 * 1024**2, nano_cpus=1_000_000_000, pids_limit=128,
            labels={**self.labels, ROLE_LABEL: "sidecar"}, extra_hosts=egress.hosts,
            # A lost DNS query costs a 1 s retry, not the resolver's default 5 s (the proxy resolves per name).
            dns_options=["timeout:1", "attempts:3"],
        )
        self.sidecar = self.backend.start(spec)
        self._record("container_created", {"role": "sidecar", "security": spec.security_summary()})
        threading.Thread(target=self._pump, args=("gateway", self.sidecar, False), daemon=True).start()
        deadline = time.monotonic() + SIDECAR_READY_TIMEOUT
        while time.monotonic() < deadline:
            self._checkpoint()
            try:
                _source, line = self._next_line(timeout=0.2)
            except queue.Empty:
                if not self.backend.status(self.sidecar).running:
                    break
                continue
            if line is None:
                break
            event = self._gateway_event(line, _Watch())
            if event.get("event") == "ready":
                return
        raise SandboxError("the sidecar did not become ready: " + self._tail(self.sidecar))

    def _deadline(self) -> float:
        """Seconds after which the run's own containers end it whatever happens to the supervisor: past the
        wall clock, with room for the check and the supervisor's own stop."""
        return float(self.limits.wall_seconds + DEADLINE_MARGIN)

    def _tail(self, container: str) -> str:
        try:
            out = b"".join(self.backend.output(container, stderr=True))
            return self.redact(out.decode(errors="replace")[-1500:]) or "(no output)"
        except Exception as exc:
            return f"(no logs: {exc})"

    def _claude_args(self) -> list[str]:
        return ["-p", "--output-format", "stream-json", "--verbose",
                # Unattended: nobody is there to answer a prompt. The container is the boundary instead.
                "--permission-mode", "bypassPermissions",
                "--model", self.spec.model,
                "--max-turns", str(self.limits.max_turns),
                "--no-session-persistence"]

    def _sandboxed(self, role: str, env: dict[str, str], mounts: list[Mount], **kwargs: Any) -> ContainerSpec:
        """The recipe of a container that runs the agent's code (the agent, the check): the policy's limits,
        the internal network only, the proxy, and no key."""
        uid, gid = self.agent_user.split(":")
        return ContainerSpec(
            name=f"{self.prefix}-{role}", image=self.images.agent, user=self.agent_user,
            env={**env, "SANDBOX_RUN_ID": self.spec.run_id, "HOME": "/home/agent", **proxy_env()},
            mounts=mounts, networks=[f"{self.prefix}-int"],
            tmpfs={"/tmp": f"rw,nosuid,nodev,exec,size={min(self.limits.disk_bytes, 1024**3)}",
                   "/home/agent": f"rw,nosuid,nodev,exec,size=512m,uid={uid},gid={gid},mode=0700"},
            memory_bytes=self.limits.memory_bytes, nano_cpus=int(self.limits.cpus * 1e9),
            pids_limit=self.limits.pids, working_dir="/workspace",
            labels={**self.labels, ROLE_LABEL: role},
            # Names the sidecar does not know get no answer on an internal network: fail in a second, not ten.
            dns_options=["timeout:1", "attempts:1"], **kwargs,
        )

    def _start_isolated(self, spec: ContainerSpec, go_ahead: str, **record: Any) -> str:
        """Start a container of the agent's, leave it a route to the sidecar alone, then give its entry point
        the go-ahead. The name `sidecar` is pinned in its /etc/hosts to the one address it can reach."""
        sidecar_ip = self.backend.address(self.sidecar, f"{self.prefix}-int")
        spec = spec.model_copy(update={"extra_hosts": {**spec.extra_hosts, SIDECAR_ALIAS: sidecar_ip}})
        container = self.backend.start(spec)
        self._record("container_created", {"role": spec.labels[ROLE_LABEL], "security": spec.security_summary(),
                                           **record})
        routes = self.backend.isolate(container, self.spec.run_id, sidecar_ip)
        self._record("network_isolated", {"container": spec.name,
                                          "default_route": f"removed; routes left: {'; '.join(routes)}"})
        (self.run_dir / "in" / go_ahead).touch()
        return container

    def _start_agent(self) -> str:
        author = self.spec.policy.git.author
        spec = self._sandboxed("agent", {
            "ANTHROPIC_BASE_URL": f"http://{SIDECAR_ALIAS}:{GATEWAY_PORT}",
            # Claude Code wants a key to start; the real one exists only in the sidecar.
            "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,
            "GIT_AUTHOR_NAME": author.name, "GIT_AUTHOR_EMAIL": author.email,
            "GIT_COMMITTER_NAME": author.name, "GIT_COMMITTER_EMAIL": author.email,
            # Its entry point ends the container by itself past this, should the supervisor be gone.
            "SANDBOX_DEADLINE_SECONDS": str(int(self._deadline())),
        }, self._work_mounts(), command=self._claude_args(), init=False)
        self.agent_started = True  # the workspace is the agent's from here: never removed before it is imported
        agent = self._start_isolated(spec, "network-ready", command=["claude", *spec.command])
        threading.Thread(target=self._pump, args=("agent", agent, False), daemon=True).start()
        threading.Thread(target=self._pump, args=("agent_stderr", agent, True), daemon=True).start()
        if self.quota.mode == "sampled":
            threading.Thread(target=self._measure_disk, daemon=True).start()
        self._usage = {"samples": 0, "peak_memory_bytes": 0, "cpu_ns": 0, "peak_pids": 0}
        threading.Thread(target=self._sample, args=(agent,), daemon=True).start()
        return agent

    def _sample(self, agent: str) -> None:
        u = self._usage
        for st in self.backend.stats(agent):
            u["samples"] += 1
            u["peak_memory_bytes"] = max(u["peak_memory_bytes"], st["peak_memory"], st["memory"])
            u["cpu_ns"] = max(u["cpu_ns"], st["cpu_ns"])
            u["peak_pids"] = max(u["peak_pids"], st["pids"])

    def _record_usage(self) -> None:
        u = getattr(self, "_usage", None)
        if u is None:
            return
        me = psutil.Process()
        cpu = me.cpu_times()
        self._record("resource_usage", {
            "samples": u["samples"], "peak_memory_bytes": u["peak_memory_bytes"],
            "cpu_seconds": round(u["cpu_ns"] / 1e9, 3), "peak_pids": u["peak_pids"],
            "supervisor_rss_bytes": me.memory_info().rss, "supervisor_cpu_seconds": round(cpu.user + cpu.system, 3)})

    def _measure_disk(self) -> None:
        workspace = self.run_dir / "workspace"
        self._disk_done = threading.Event()
        try:
            baseline = tree_size(workspace)
            while not self._disk_done.wait(DISK_CHECK_INTERVAL):
                self._q.put(("disk", str(tree_size(workspace) - baseline)))
        except SandboxError as exc:
            # A limit that cannot be measured must not quietly switch off: the run ends instead.
            self._q.put(("disk", f"unmeasurable: {exc.message}"))

    def _work_mounts(self) -> list[Mount]:
        return [
            Mount(source=str(self.run_dir / "workspace"), target="/workspace", read_only=False),
            # History to read, never to write: the host's .git stays out of the agent's reach.
            Mount(source=str(self.repo.objects), target=CONTAINER_OBJECTS, read_only=True),
            Mount(source=str(self.run_dir / "in"), target="/sandbox/in", read_only=True),
        ]

    def _next_line(self, timeout: float) -> tuple[str, str | None]:
        """The next line read from a container (queue.Empty after timeout); the sidecar's backlog shrinks by it
        (the agent's is settled by the watch loop, which bounds that output)."""
        source, line = self._q.get(timeout=timeout)
        if source == "gateway" and line is not None:
            self._gateway_backlog.done(len(line))
        return source, line

    def _pump(self, source: str, container: str, stderr: bool) -> None:
        # Lines read but not yet recorded are bounded: a flood waits in the container (the agent's) or in the
        # sidecar's log file (the sidecar's), not in this process's memory.
        backlog = self._agent_backlog if source.startswith("agent") else self._gateway_backlog
        try:
            for line in _lines(self.backend.output(container, stderr=stderr)):
                if backlog is not None and not backlog.add(len(line)):
                    continue
                self._q.put((source, line))
        except Exception as exc:
            log.warning("output_stream_failed source=%s error=%r", source, exc)
        finally:
            self._q.put((source, None))

    # --- watching -------------------------------------------------------------------------------------------

    def _watch(self, agent: str, w: _Watch) -> None:
        lim = self.limits
        t0 = time.monotonic()
        stream = (self.run_dir / "agent-stream.jsonl").open("a", encoding="utf-8")
        stderr = (self.run_dir / "agent-stderr.log").open("a", encoding="utf-8")
        backlog = self._agent_backlog
        try:
            agent_done = False
            while not agent_done:
                now = time.monotonic()
                if self.heartbeat is not None:
                    self.heartbeat.progress = now  # the sidecar serves only while this loop goes round
                if w.reason is None:
                    if self._cancel is not None:
                        self._limit(agent, w, *self._cancel, grace=1.0)
                    elif self.environment_failure is not None:
                        # The trail can no longer be written: an unrecorded agent is an unsupervised one.
                        self._limit(agent, w, "error", self.environment_failure, limit="state_disk")
                    elif now - t0 > lim.wall_seconds:
                        self._limit(agent, w, "timeout", f"wall-clock limit of {lim.wall_seconds}s reached")
                    elif now - w.last_activity > lim.idle_seconds:
                        self._limit(agent, w, "idle", f"no output and no model call for {lim.idle_seconds}s")
                    elif w.result_at is not None and now - w.result_at > RESULT_GRACE:
                        self._record("agent_lingered", {"seconds": RESULT_GRACE})
                        self.backend.stop(agent, STOP_GRACE)
                        w.result_at = None
                try:
                    source, line = self._next_line(timeout=0.25)
                except queue.Empty:
                    continue
                if source in ("agent", "agent_stderr") and line is not None:
                    backlog.done(len(line))
                    if not self._agent_output(agent, w, source, line):
                        continue  # past the output bound: the run is ending, nothing more is recorded
                if source == "agent":
                    if line is None:
                        agent_done = True
                        continue
                    w.last_activity = time.monotonic()
                    self._keep_line(stream, line)
                    self._agent_line(agent, line, w)
                elif source == "agent_stderr":
                    if line is not None:
                        self._keep_line(stderr, line)
                elif source == "disk" and line is not None and w.reason is None:
                    if line.startswith("unmeasurable"):
                        self._limit(agent, w, "error", f"the disk limit cannot be enforced: {line}", limit="disk")
                        continue
                    grown = int(line)
                    if grown > lim.disk_bytes:
                        self._limit(agent, w, "error", f"the workspace grew by {grown // 1024**2} MiB, over the "
                                                      f"disk limit of {lim.disk}", limit="disk")
                elif source == "gateway":
                    if line is None:
                        if not w.sidecar_gone and w.reason is None and w.result is None:
                            w.sidecar_gone = True
                            self._limit(agent, w, "error", "the sidecar stopped while the agent was running")
                        continue
                    w.sidecar_bytes += getattr(line, "size", len(line)) + 1
                    if w.sidecar_bytes > MAX_OUTPUT_BYTES and '"event":"egress"' in line[:200]:
                        # A connection flood: the run ends, and its decision lines are counted, no longer
                        # recorded (model calls always are), so neither the trail nor this process grows on.
                        w.egress_unrecorded += 1
                        if w.reason is None:
                            self._limit(agent, w, "error", f"the agent made connections enough for more than "
                                        f"{MAX_OUTPUT_BYTES // 1024**2} MiB of egress decisions (egress_flood)",
                                        limit="egress_flood")
                        continue
                    self._gateway_event(line, w, agent)
        finally:
            backlog.close(0 if w.flooded else MAX_OUTPUT_BYTES)
            if hasattr(self, "_disk_done"):
                self._disk_done.set()
            if self.heartbeat is not None:
                self.heartbeat.progress = None  # out of the loop: collection and the check wait boundedly
            for fh in (stream, stderr):
                with contextlib.suppress(OSError):  # what a full disk kept in the buffer is lost, not the run
                    fh.close()

    def _keep_line(self, fh: Any, line: str) -> None:
        """A line of the agent's output into its file in the run directory; a full disk is the audit's concern."""
        try:
            fh.write(self.redact(line) + "\n")
            fh.flush()
        except OSError as exc:
            if disk_full(exc) and self.environment_failure is None:
                self.environment_failure = f"the state directory's filesystem is full ({exc.strerror})"

    def _agent_output(self, agent: str, w: _Watch, source: str, line: str) -> bool:
        """Count a line of the agent's output against the bounds; False once they are exceeded."""
        if w.flooded:
            return False
        size = getattr(line, "size", len(line))
        w.output_bytes += size + 1
        w.output_lines += 1
        if w.output_bytes > MAX_OUTPUT_BYTES or w.output_lines > MAX_OUTPUT_LINES:
            w.flooded = True
            if w.reason is None:
                self._limit(agent, w, "error", f"the agent wrote more than {MAX_OUTPUT_BYTES // 1024**2} MiB or "
                                               f"{MAX_OUTPUT_LINES} lines of output (output_flood); what came "
                                               "before is kept", limit="output_flood")
            return False
        cut = getattr(line, "cut", 0)
        if cut:
            self._record("agent_line_truncated", {
                "stream": "stdout" if source == "agent" else "stderr", "line": w.output_lines, "bytes": size,
                "kept": size - cut})
        return True

    def _limit(self, agent: str, w: _Watch, reason: str, message: str, limit: str | None = None,
               grace: float = STOP_GRACE) -> None:
        w.reason, w.message = reason, message
        self._record("limit_hit", {"limit": limit or reason, "reason": reason, "message": message})
        self.ui.event("limit", message)
        log.info("limit_hit run_id=%s limit=%s", self.spec.run_id, reason)
        self.backend.stop(agent, grace)

    def _agent_line(self, agent: str, line: str, w: _Watch) -> None:
        # Everything here is the agent's own account (any process in its container can write to this
        # stream): recorded with source `agent`, as claims. What the model was asked and answered is the
        # gateway's record; `completed` needs the two to agree (_result_backed).
        for type_, payload in agent_stream.events_from_line(line):
            self._record(type_, payload, source="agent")
            if type_ == "tool_call":
                if payload.get("message_id"):
                    w.turns.add(payload["message_id"])
                if payload.get("id"):
                    w.open_tools[str(payload["id"])] = str(payload.get("name"))
                inp = payload.get("input") or {}
                detail = inp.get("command") or inp.get("file_path") or inp.get("pattern") or ""
                self.ui.event("tool", f"{payload.get('name')}: {str(detail)[:100]}")
            elif type_ == "tool_result":
                w.open_tools.pop(str(payload.get("tool_use_id")), None)
            elif type_ == "assistant_text" and payload.get("message_id"):
                w.turns.add(payload["message_id"])
            elif type_ == "result":
                w.result, w.result_at = payload, getattr(line, "at", None) or time.monotonic()
                w.open_at_result = [f"{name} {tid}" for tid, name in w.open_tools.items()]
        self.ui.status(turns=len(w.turns))
        if w.reason is None and len(w.turns) > self.limits.max_turns:
            self._limit(agent, w, "turns", f"more than {self.limits.max_turns} turns")

    def _gateway_event(self, line: str, w: _Watch, agent: str | None = None) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError:
            self._record("sidecar_output", {"text": line[:2000]}, source="gateway")
            return {}
        kind = str(event.pop("event", "unknown"))
        for k in ("time", "run_id", "n"):
            event.pop(k, None)
        if kind == "egress":
            self._record("egress", event, source="proxy")
            w.egress_lines.add(event)
            decision = event.get("decision")
            if decision == "deny":
                w.egress_denied += 1
                self.ui.status(denied=w.egress_denied)
                self.ui.event("denied", f"{event.get('host')}:{event.get('port')}: {event.get('reason')}")
            elif decision == "would_deny":
                w.egress_would_deny += 1
                self.ui.event("would_deny", f"{event.get('host')}:{event.get('port')}: {event.get('reason')}")
            else:
                w.egress_allowed += 1
            return {"event": kind, **event}
        self._record(kind, event, source="gateway")
        w.last_activity = time.monotonic()
        if kind == "model_call":
            # The gateway's record of model calls, which nothing in the agent's container can write, stamped
            # with when the line was read: it decides whether the agent's claimed result stands (_result_backed).
            w.gateway_calls.append((getattr(line, "at", None) or time.monotonic(), event))
            w.model_calls += 1
            w.spent_usd = float(event.get("spent_usd", w.spent_usd))
            self.ui.status(spent=w.spent_usd)
            u = event.get("usage") or {}
            w.tokens = Tokens(input=w.tokens.input + int(u.get("input_tokens", 0)),
                              output=w.tokens.output + int(u.get("output_tokens", 0)),
                              cache_read=w.tokens.cache_read + int(u.get("cache_read_input_tokens", 0)),
                              cache_write=w.tokens.cache_write + int(u.get("cache_creation_input_tokens", 0)))
            if self.budget_guard is not None:
                # The gateway books the call in the shared ledger itself (run/budget.py).
                shared = self.budget_guard.spent_usd
                if shared >= self.budget_guard.cap_usd and agent is not None and w.reason is None:
                    self._limit(agent, w, "budget", f"the {self.budget_guard.label} of "
                                                    f"${self.budget_guard.cap_usd:.2f} is spent", limit="shared_budget")
            if self.store and not self._replaying:
                day_total = self._book(float(event.get("cost_usd", 0)))
                cap = self.daily_budget_usd
                if cap is not None and day_total >= cap and agent is not None and w.reason is None:
                    self._limit(agent, w, "budget", f"the host's daily budget of ${cap:.2f} is spent "
                                                    f"(${day_total:.4f} today)", limit="daily_budget")
        elif kind == "model_call_refused" and event.get("reason") == "budget":
            w.budget_refused = True
            if agent is not None and w.reason is None:
                self._limit(agent, w, "budget", f"model budget of ${self.limits.budget_usd:.2f} spent")
        return {"event": kind, **event}

    def _book(self, usd: float) -> float:
        """Book a model call's cost in the store's daily ledger; the day's total. A store that cannot be written
        (a full disk) ends the run rather than letting spend go unbooked."""
        assert self.store is not None
        try:
            return self.store.add_spend(self.spec.run_id, usd)
        except sqlite3.Error as exc:
            log.warning("spend_not_booked run_id=%s usd=%.6f error=%r", self.spec.run_id, usd, exc)
            if self.environment_failure is None:
                self.environment_failure = f"the run store cannot be written: {exc}"
            return 0.0

    def _reason(self, w: _Watch, exit_code: int | None, oom: bool) -> tuple[str, str]:
        if w.reason:
            return w.reason, w.message
        if oom:
            return "error", "the agent ran out of memory and was killed"
        if w.budget_refused:
            return "budget", f"model budget of ${self.limits.budget_usd:.2f} spent"
        r = w.result
        if r is not None:
            sub = r.get("subtype")
            if sub == "success" and not r.get("is_error"):
                self._settle_gateway(w)
                backed, why = self._result_backed(w, r)
                calls = [p for _, p in w.gateway_calls]
                self._record("result_verified", {
                    "backed": backed, "detail": why, "gateway_calls": len(calls),
                    "claimed_turns": r.get("num_turns") if isinstance(r.get("num_turns"), int) else None,
                    "last_stop_reason": calls[-1].get("stop_reason") if calls else None})
                if backed:
                    return "completed", "the agent finished its task"
                return "error", f"the agent's claimed result is not backed by the gateway's record: {why}"
            if sub == "error_max_turns":
                return "turns", f"Claude Code reached --max-turns {self.limits.max_turns}"
            if sub == "error_max_budget_usd":
                return "budget", "Claude Code reached its own budget"
            return "error", f"the agent ended with an error: {str(r.get('result') or sub)[:300]}"
        return "error", f"the agent exited with code {exit_code} without a result"

    def _settle_gateway(self, w: _Watch) -> None:
        """Record the gateway's events still queued once the watch loop is done: when the agent ended (its
        last model call among them), and after the check (its egress)."""
        while True:
            try:
                source, line = self._next_line(timeout=0.3)
            except queue.Empty:
                return
            if source == "gateway" and line is not None:
                self._gateway_event(line, w)

    def _result_backed(self, w: _Watch, r: dict[str, Any]) -> tuple[bool, str]:
        """Whether the gateway's record agrees with the agent's claim of success: the model answered, through
        the gateway, at least as many times as the claim says, no model call began after the result, and (when
        the gateway reports how calls ended) the last call ended the conversation. The agent's own stream
        adds one check: no tool call it reported is still without a result."""
        ok = [(at, p) for at, p in w.gateway_calls if 200 <= int(p.get("status") or 0) < 300]
        if not ok:
            return False, "the gateway recorded no successful model call"
        claimed = r.get("num_turns")
        if isinstance(claimed, int) and claimed > len(ok):
            return False, f"it claims {claimed} turns, the gateway served {len(ok)} model call(s)"
        if w.open_at_result:
            return False, ("the result came while tool calls were still running: "
                           + ", ".join(w.open_at_result[:5]))
        at = w.result_at or time.monotonic()
        later = [p for t, p in ok if t - int(p.get("duration_ms") or 0) / 1000 > at + RESULT_SLACK]
        if later:
            return False, f"{len(later)} model call(s) began after the result (call {later[0].get('call')} first)"
        before = [p for t, p in ok if p not in later]
        if any("stop_reason" in p for p in before):
            main = [p for p in before if p.get("tools_offered", 1)] or before
            last = main[-1]
            if last.get("stop_reason") not in END_STOP_REASONS or last.get("tool_uses"):
                return False, (f"the last model call (call {last.get('call')}) ended with "
                               f"{last.get('stop_reason')}, asking for {len(last.get('tool_uses') or [])} tool(s)")
        return True, f"{len(ok)} model call(s) through the gateway agree"

    # --- after the agent ------------------------------------------------------------------------------------

    def _collect(self, reason: str) -> tuple[Imported | None, str | None]:
        author = self.spec.policy.git.author
        spec = ContainerSpec(
            name=f"{self.prefix}-finalise", image=self.images.agent, user=self.agent_user,
            entrypoint=["/opt/sandbox/finalize.sh"],
            env={"SANDBOX_RUN_ID": self.spec.run_id, "SANDBOX_BASE_COMMIT": self.spec.base_commit,
                 "SANDBOX_BRANCH": self.spec.branch,
                 "SANDBOX_END_REASON": reason, "HOME": "/tmp",
                 # It ends by itself even if whoever waits for it dies (finalize.sh runs under `timeout`).
                 "SANDBOX_DEADLINE_SECONDS": str(int(FINALISER_TIMEOUT + DEADLINE_MARGIN)),
                 # No file the finaliser writes (the bundle above all) may grow past the run's disk limit.
                 "SANDBOX_DISK_LIMIT": str(self.limits.disk_bytes),
                 "GIT_AUTHOR_NAME": author.name, "GIT_AUTHOR_EMAIL": author.email,
                 "GIT_COMMITTER_NAME": author.name, "GIT_COMMITTER_EMAIL": author.email},
            mounts=[*self._work_mounts(),
                    Mount(source=str(self.run_dir / "out"), target="/sandbox/out", read_only=False)],
            no_network=True, tmpfs={"/tmp": "rw,nosuid,nodev,size=256m"},
            memory_bytes=1024**3, nano_cpus=1_000_000_000, pids_limit=256, working_dir="/workspace",
            labels={**self.labels, ROLE_LABEL: "finaliser"},
        )
        fin = self.backend.start(spec)
        self._record("container_created", {"role": "finaliser", "security": spec.security_summary()})
        info = self.backend.wait(fin, FINALISER_TIMEOUT)
        if info.running:
            self.backend.stop(fin, 1)
            return None, "the finaliser did not finish in time"
        result_path = self.run_dir / "out" / "result.json"
        try:
            result = read_result(result_path)
        except (OSError, ValueError):
            return None, f"the finaliser wrote no result (exit {info.exit_code}): {self._tail(fin)}"
        self._record("finalised", result)
        if self.spec.check and result.get("head"):
            if self._cancel is None:
                self.check_result = self._run_check(result["head"])
            else:
                self._record("check", {"exit_code": 130, "head": result["head"], "interrupted": True,
                                       "output": f"not run: {self._cancel[1]}"})
        if result.get("status") == "unchanged":
            self.work_settled = True
            return Imported(branch=None, head=None, commits=[]), None
        if result.get("status") != "packed":
            return None, f"the agent's work could not be packed: {result.get('detail')}"
        bundle = self.run_dir / "out" / "work.bundle"
        if bundle.is_symlink() or not bundle.is_file():
            self.work_settled = True  # refused, not lost: a bundle that is no plain file is never imported
            return None, "the finaliser reported a bundle but wrote no plain file"
        if bundle.stat().st_size > self.limits.disk_bytes:
            self.work_settled = True
            # Never import more than the disk limit into the host repository.
            return None, (f"the agent's bundle ({bundle.stat().st_size} bytes) is larger than the disk limit "
                          f"of {self.limits.disk}; nothing was imported")
        self.ui.phase("import", f"fetching the bundle into {self.spec.branch}")
        imported = self._import(bundle, result.get("head"))
        self.work_settled = True
        self._files = self._diffstat(imported)
        self._record("imported", {"branch": imported.branch, "head": imported.head, "commits": imported.commits,
                                  "files": self._files})
        if imported.head != result.get("head"):
            # The bundle must hold what the finaliser packed, which is also what the check saw.
            return imported, (f"the imported head {imported.head} is not the packed head {result.get('head')}; "
                              "the branch is kept for inspection")
        return imported, None

    def _on_branch(self) -> Imported | None:
        """What the run's branch holds in the host repository now, or None without the branch."""
        if not branch_exists(self.repo, self.spec.branch):
            return None
        g = git.Git(self.repo.path)
        head = g.rev_parse("--verify", f"refs/heads/{self.spec.branch}")
        return Imported(branch=self.spec.branch, head=head,
                        commits=g.rev_list("--reverse", f"{self.spec.base_commit}..{head}").split())

    def _import(self, bundle: Path, head: str | None) -> Imported:
        """Fetch the bundle onto the branch. A recovery may find the branch there already, at the packed head
        (the dead supervisor got that far): that is the work, imported."""
        try:
            return import_bundle(self.repo, bundle, self.spec.branch, self.spec.base_commit,
                                 replace=self.spec.replace_branch)
        except SandboxError as exc:
            there = self._on_branch()
            if head and there is not None and there.head == head:
                return there
            if disk_full(exc):
                self.environment_failure = f"the host repository's filesystem is full: {exc.message}"
            else:
                self.work_settled = True  # refused for what it is, not for want of room: nothing to retry
            raise

    def _run_check(self, head: str) -> dict[str, Any]:
        """The operator's check on a clean checkout of the packed head, in a container like the agent's: the
        same image and limits, the network through the proxy only. Its egress is on record like the agent's."""
        self.ui.phase("check", f"`{self.spec.check}` on {head[:12]}")
        check_dir = self.run_dir / "check"
        quota.mount(check_dir, self.quota)
        if self.chown:
            os.chown(check_dir, *self.chown)
        mounts = [Mount(source=str(self.run_dir / "workspace"), target="/workspace", read_only=True),
                  Mount(source=str(self.repo.objects), target=CONTAINER_OBJECTS, read_only=True),
                  Mount(source=str(self.run_dir / "in"), target="/sandbox/in", read_only=True),
                  # Its only writable mount: the bundle in out/ stays out of reach of the code it runs.
                  Mount(source=str(check_dir), target="/sandbox/check", read_only=False)]
        spec = self._sandboxed("check", {"SANDBOX_CHECK_HEAD": head, "SANDBOX_CHECK_TIMEOUT": str(CHECK_TIMEOUT)},
                               mounts, entrypoint=["/opt/sandbox/check.sh"])
        container = self._start_isolated(spec, "check-ready", command=["check", self.spec.check or ""])
        deadline = time.monotonic() + CHECK_TIMEOUT + 30
        info = self.backend.status(container)
        while info.running and time.monotonic() < deadline and self._cancel is None:
            info = self.backend.wait(container, 1.0)
        if self._cancel is not None and info.running:
            # The work is packed already: stop the check and still bring the work home.
            self._record("limit_hit", {"limit": self._cancel[0], "reason": self._cancel[0],
                                       "message": f"{self._cancel[1]} during the check"})
            self.backend.stop(container, 1)
            check = {"exit_code": 130, "head": head, "interrupted": True, "output": "the check was interrupted"}
            self._record("check", check)
            return check
        if info.running:
            self.backend.stop(container, 1)
        self._settle_gateway(self.state)  # the check's egress lines
        try:
            written = read_result(check_dir / "result.json")
            check = {"head": head, "output": str(written.get("output", ""))[-4000:]}
        except (OSError, ValueError):
            check = {"head": head, "output": f"the check wrote no result: {self._tail(container)}"}
        # The verdict is check.sh's exit status, from the engine: the result file lies in a directory the checked
        # code can write, so it is read for the output alone.
        check["exit_code"] = info.exit_code if info.exit_code is not None else 125
        self._record("check", check)
        return check

    def _diffstat(self, imported: Imported) -> list[dict[str, Any]]:
        if not imported.head:
            return []
        out = git.Git(self.repo.path).diff("--numstat", "--no-renames", self.spec.base_commit, imported.head)
        rows = []
        for line in out.splitlines():
            added, deleted, path = line.split("\t", 2)
            rows.append({"path": path, "added": None if added == "-" else int(added),
                         "deleted": None if deleted == "-" else int(deleted)})
        return rows

    def _cleanup_files(self) -> None:
        # Recovery's copy of the sidecar's lines: the trail has them now.
        (self.run_dir / "model" / SIDECAR_EVENTS).unlink(missing_ok=True)
        transcript = self.run_dir / "model" / "transcript.jsonl"
        if transcript.is_file():
            # The sidecar wrote it inside its container; redaction happens here, on the host.
            transcript.write_text(self.redact(transcript.read_text(errors="replace")))
        if self.agent_started and not self.work_settled:
            # The work never reached the branch (the engine gone, a full disk, a finaliser that failed): it
            # stays, and the store marks the run for `sandbox gc` to import it.
            workspace = self.run_dir / "workspace"
            parked = quota.is_mounted(workspace)
            quota.park(workspace)
            # Unmounted, the work is in the filesystem image (gc mounts it again to import it).
            self.kept = str(quota.image_path(workspace) if parked else workspace)
            quota.release(self.run_dir / "check")
            if self.store:
                try:
                    self.store.update(self.spec.run_id, recover=self.environment_failure or "the work was not imported")
                except Exception as exc:
                    log.warning("store_update_failed run_id=%s error=%r", self.spec.run_id, exc)
            return
        quota.release_run(self.run_dir, keep=self.spec.keep)
        if not self.spec.keep:
            remove_tree(self.run_dir / "workspace")
            remove_tree(self.run_dir / "check")
            # The task is in the (redacted) audit trail; this raw copy was only for the agent's stdin.
            (self.run_dir / "in" / "task.md").unlink(missing_ok=True)
            (self.run_dir / "out" / "work.bundle").unlink(missing_ok=True)

    def _handoff(self, s: RunSummary) -> None:
        """Push the branch when asked to and allowed to; a failure keeps the branch and says how to retry."""
        if not self.spec.push:
            return
        s.remote = self.spec.remote
        if not s.branch:
            s.push_error = "nothing to push: the agent changed nothing"
        elif s.violations:
            s.push_error = "refused: the change breaks the policy's git rules"
        elif s.reason != "completed":
            s.push_error = f"not pushed: the run ended with reason {s.reason}"
        else:
            self.ui.phase("push", f"{s.branch} to {self.spec.remote}")
            try:
                push_branch(self.repo, self.spec.remote, s.branch, force=self.spec.replace_branch)
                s.pushed = True
            except HandoffError as exc:
                s.push_error = f"{exc.message}; the branch is kept locally: retry with `sandbox push {s.id}`"
                s.exit_code = int(HANDOFF_FAILED)
        self._record("push", {"remote": s.remote, "branch": s.branch, "pushed": s.pushed, "error": s.push_error})

    def _open_pr(self, s: RunSummary) -> None:
        title = self.spec.title or ("sandbox: " + self.spec.task.strip().splitlines()[0][:72])
        body = self.redact(report.render(self.run_dir, s))
        try:
            assert self.spec.pr_repo and self.github_token
            s.pr_url = open_pull_request(slug=self.spec.pr_repo, head=s.branch or "", base=self.spec.pr_base,
                                         title=title, body=body, token=self.github_token)
        except (HandoffError, AssertionError) as exc:
            s.push_error = f"pushed, but {getattr(exc, 'message', exc)}"
            s.exit_code = int(HANDOFF_FAILED)
        self._record("pull_request", {"url": s.pr_url, "error": s.push_error if not s.pr_url else None})

    def _write_summary(self, s: RunSummary) -> None:
        """summary.json and the report, then the store: the store calls a run ended only once its files exist,
        and a run it still calls running once its supervisor is gone is finished by `sandbox gc`."""
        tmp = self.run_dir / ".summary.json.tmp"
        tmp.write_text(s.model_dump_json(indent=2))
        tmp.replace(self.run_dir / "summary.json")
        report.write(self.run_dir, s)
        if self.store:
            t = s.tokens
            self.store.update(s.id, status=s.status, reason=s.reason, message=s.message, branch=s.branch,
                              ended_at=time.time(), duration_s=s.duration_s, cost_usd=s.cost_usd,
                              input_tokens=t.input, output_tokens=t.output, cache_read_tokens=t.cache_read,
                              cache_write_tokens=t.cache_write, turns=s.turns, egress_denied=s.egress_denied,
                              files_changed=len(s.files_changed), audit_head=s.audit_head, pushed=int(s.pushed),
                              recover=(self.environment_failure or "the work was not imported") if s.kept else None)

    def _summary(self, reason: str, message: str, w: _Watch, imported: Imported | None, oom: bool,
                 duration: float) -> RunSummary:
        files = [r["path"] for r in self._files] if imported and imported.head else []
        net = egress_overview(w.egress_lines.lines())
        return RunSummary(
            id=self.spec.run_id, status=STATUS_BY_REASON[reason], reason=reason,  # type: ignore[arg-type]
            message=message, repo=self.spec.repo,
            branch=imported.branch if imported else None, base_commit=self.spec.base_commit,
            head=imported.head if imported else None, commits=imported.commits if imported else [],
            files_changed=files, cost_usd=round(w.spent_usd, 6), model_calls=w.model_calls, turns=len(w.turns),
            duration_s=round(duration, 2), exit_code=int(EXIT_BY_REASON[reason]), oom_killed=oom,
            egress_allowed=w.egress_allowed, egress_denied=w.egress_denied, egress_would_deny=w.egress_would_deny,
            egress_hosts_allowed=net.allowed, egress_hosts_denied=net.denied, egress_hosts_would_deny=net.would_deny,
            egress_suggestion=net.suggestion, tokens=w.tokens,
            run_dir=str(self.run_dir), warnings=self.spec.warnings,
        )
