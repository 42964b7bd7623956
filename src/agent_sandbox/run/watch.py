"""Watching the agent: its output and the sidecar's lines into the trail, and the limits (wall clock, idle,
turns, budget, output) decided from them; then the reason the run ended, and whether the agent's claimed
result is backed by the gateway's record."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent_sandbox.audit import events as ev
from agent_sandbox.backend.plan import Role, Started
from agent_sandbox.errors import SandboxError, disk_full
from agent_sandbox.git.checkout import CONTAINER_OBJECTS
from agent_sandbox.run import agent_stream, pool
from agent_sandbox.run.base import (
    DEADLINE_MARGIN,
    DISK_CHECK_INTERVAL,
    END_STOP_REASONS,
    RESULT_GRACE,
    RESULT_SLACK,
    SIDECAR_READY_TIMEOUT,
    STOP_GRACE,
    RunBase,
)
from agent_sandbox.run.output import (
    MAX_OUTPUT_BYTES,
    MAX_OUTPUT_LINES,
    lines,
    tree_size,
)
from agent_sandbox.run.spec import Tokens
from agent_sandbox.run.state import RunState
from agent_sandbox.run.workloads import AGENT_START, CONTROL_SOCKET, FINALISER_START, FINALISER_TIMEOUT, SIDECAR_OUT
from agent_sandbox.sidecar.events import GatewaySettled

log = logging.getLogger(__name__)

FINALISER_AHEAD_AFTER = 3.0  # seconds of the agent's after which the finaliser is started ahead, held
FINALISER_HOLD_MARGIN = 60.0  # seconds a finaliser started ahead waits for its go-ahead past the agent's deadline
FINALISER_AHEAD_JOIN = 120.0  # seconds the collection waits for the start of the finaliser started ahead
SAMPLER_JOIN = 5.0  # seconds the resource figures may still take once the agent has ended
SETTLE_WAIT = 3.0  # seconds the sidecar's answer to a settle request may take (it waits up to 2 s for calls)
SETTLE_QUIET = 0.3  # without an answer: the gateway's lines are all in once it has been quiet this long


class Watching(RunBase):
    """The agent from its start until it ends."""

    def _start_agent(self, sidecar: Callable[[], None], ready: Callable[[], None]) -> Role:
        """Start the agent's container, confined but held, while `sidecar` starts the sidecar's and `ready` waits
        for it to listen; then give the agent the go-ahead. The backend has the agent's start wait for whatever
        it needs of the sidecar's (its address). Whatever fails, the agent's start is over before this returns
        or raises (teardown must not race it)."""
        held = self.slot is not None and self.slot.slot.agent_started is not None
        workload = self.recipes.held_agent() if held else self.recipes.agent(self._deadline())
        box: dict[str, Any] = {}

        def begin() -> None:
            try:
                if held:
                    # Made and confined by the pool (fleet/pool.py), held: it starts on the run's start file.
                    assert self.slot is not None and self.slot.slot.agent_started is not None
                    if not self.handle.status("agent").running:
                        raise SandboxError("the pool's agent container ended before its run")
                    box["started"] = Started.model_validate(self.slot.slot.agent_started)
                else:
                    box["started"] = self.handle.start(workload, hold=True)
            except BaseException as exc:  # handed to the supervisor's thread below
                box["error"] = exc

        starting = threading.Thread(target=begin, name="agent-start", daemon=True)
        if self.slot is not None:
            # A run the warm pool began starts no sidecar: the finaliser's container starts (held) alongside the
            # agent's instead, before Claude Code's own start, which it would slow (measured: later, at the
            # agent's first line, it slows the agent's turns; after 3 s it is on the critical path at the end).
            # Where the pool made the finaliser too, it only takes the run's settings, for after its go-ahead.
            if held:
                self._held_finaliser()
            else:
                self._start_finaliser_ahead()
        starting.start()
        try:
            sidecar()
            self._checkpoint()
            ready()
        finally:
            starting.join()
        if "error" in box:
            raise box["error"]
        self._record_started(workload, box["started"], command=["claude", *self.recipes.claude_args()])
        self._checkpoint()
        self.agent_started = True  # the workspace is the agent's from here: never removed before it is imported
        # Its resources are sampled from before its go-ahead: the engine answers the first sample slowly under
        # load, and an agent that ends within that time would otherwise end with no figures at all.
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        if held:
            # Its arguments, identity and deadline, and the paths that prove the run's mounts reached it.
            first = sorted(os.listdir(self.repo.objects))[:1]
            require = ["/workspace/.git", *(f"{CONTAINER_OBJECTS}/{name}" for name in first)]
            pool.start_held(self.run_dir, AGENT_START, self.recipes.agent_start(self._deadline(), require))
        self.handle.release("agent")
        threading.Thread(target=self._pump, args=("agent", "agent", False), daemon=True).start()
        threading.Thread(target=self._pump, args=("agent_stderr", "agent", True), daemon=True).start()
        if self.quota.mode == "sampled":
            threading.Thread(target=self._measure_disk, daemon=True).start()
        return "agent"

    def _start_finaliser_ahead(self) -> None:
        """Start the finaliser's container now, held until the agent has ended (collect.py gives the go-ahead):
        its start is then off the run's critical path. Only once the agent has worked FINALISER_AHEAD_AFTER: the
        start costs the engine and the machine a fifth of a second of work, which on a small machine slows an
        agent that is still starting, or one about to end (then the finaliser is started at the collection,
        while the agent's container and the sidecar are removed). No network; it waits without reading the
        workspace."""
        workload = self.recipes.finaliser(
            None, FINALISER_TIMEOUT + DEADLINE_MARGIN, hold_s=self._deadline() + STOP_GRACE + FINALISER_HOLD_MARGIN
        )
        ahead: dict[str, Any] = {"workload": workload}

        def start() -> None:
            try:
                ahead["started"] = self.handle.start(workload, hold=True)
            except Exception as exc:  # collect.py starts it the usual way instead
                ahead["error"] = exc
                log.warning("finaliser_ahead_failed run_id=%s error=%r", self.spec.run_id, exc)

        ahead["thread"] = threading.Thread(target=start, name="finaliser-ahead", daemon=True)
        self._finaliser_ahead = ahead
        ahead["thread"].start()

    def _held_finaliser(self) -> None:
        """The finaliser the warm pool made (held_finaliser), given the run's settings: collect.py gives it its
        go-ahead as it would one started ahead."""
        assert self.slot is not None and self.slot.slot.finaliser_started is not None
        pool.start_held(self.run_dir, FINALISER_START, self.recipes.finaliser_start())
        self._finaliser_ahead = {
            "workload": self.recipes.held_finaliser(),
            "started": Started.model_validate(self.slot.slot.finaliser_started),
        }

    def _finaliser_started_ahead(self) -> dict[str, Any] | None:
        """Once its start is over: the finaliser started ahead (`workload`, `started`), or None (none was, or its
        start failed). Teardown calls this too: no container's start may race the run's removal."""
        ahead = self._finaliser_ahead
        if ahead is None:
            return None
        if "thread" not in ahead:
            return ahead  # the pool's, started with the slot
        ahead["thread"].join(FINALISER_AHEAD_JOIN)
        if ahead["thread"].is_alive():
            log.warning("finaliser_ahead_slow run_id=%s waited_s=%.0f", self.spec.run_id, FINALISER_AHEAD_JOIN)
            return None
        return ahead if "started" in ahead else None

    def _sample(self) -> None:
        u = self._usage
        for st in self.handle.stats("agent"):
            u["samples"] += 1
            u["peak_memory_bytes"] = max(u["peak_memory_bytes"], st["peak_memory"], st["memory"])
            u["cpu_ns"] = max(u["cpu_ns"], st["cpu_ns"])
            u["peak_pids"] = max(u["peak_pids"], st["pids"])

    def _record_usage(self) -> None:
        u = self._usage
        if not self.agent_started:
            return
        if self._sampler is not None and not u["samples"]:
            # Its samples end with the container: a short agent's first one may still be on its way (the engine
            # answers stats slowly under load), and a run without figures would say the agent used nothing.
            self._sampler.join(SAMPLER_JOIN)
        me = psutil.Process()
        cpu = me.cpu_times()
        self._record(
            ev.ResourceUsage(
                samples=u["samples"],
                peak_memory_bytes=u["peak_memory_bytes"],
                cpu_seconds=round(u["cpu_ns"] / 1e9, 3),
                peak_pids=u["peak_pids"],
                supervisor_rss_bytes=me.memory_info().rss,
                supervisor_cpu_seconds=round(cpu.user + cpu.system, 3),
            )
        )

    def _measure_disk(self) -> None:
        from agent_sandbox.run.workspace import disk_root

        workspace = disk_root(self.run_dir)  # an overlay's layer: only what the run wrote
        try:
            baseline = tree_size(workspace)
            while not self._disk_done.wait(DISK_CHECK_INTERVAL):
                self._q.put(("disk", str(tree_size(workspace) - baseline)))
        except SandboxError as exc:
            # A limit that cannot be measured must not quietly switch off: the run ends instead.
            self._q.put(("disk", f"unmeasurable: {exc.message}"))

    def _next_line(self, timeout: float) -> tuple[str, str | None]:
        """The next line read from a container (queue.Empty after timeout); the sidecar's backlog shrinks by it
        (the agent's is settled by the watch loop, which bounds that output)."""
        source, line = self._q.get(timeout=timeout)
        if source == "gateway" and line is not None:
            self._gateway_backlog.done(len(line))
        return source, line

    def _pump(self, source: str, role: Role, stderr: bool) -> None:
        # Lines read but not yet recorded are bounded: a flood waits in the container (the agent's) or in the
        # sidecar's log file (the sidecar's), not in this process's memory.
        backlog = self._agent_backlog if source.startswith("agent") else self._gateway_backlog
        try:
            for line in lines(self.handle.output(role, stderr=stderr)):
                if not backlog.add(len(line)):
                    continue
                self._q.put((source, line))
        except Exception as exc:
            log.warning("output_stream_failed source=%s error=%r", source, exc)
        finally:
            self._q.put((source, None))

    def _watch(self, agent: str, w: RunState) -> None:
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
                if self._finaliser_ahead is None and w.reason is None and now - t0 > FINALISER_AHEAD_AFTER:
                    self._start_finaliser_ahead()
                if w.reason is None:
                    if self._cancel is not None:
                        self._limit(agent, w, *self._cancel, grace=1.0)
                    elif self.environment_failure is not None:
                        # The trail can no longer be written: an unrecorded agent is an unsupervised one.
                        self._limit(agent, w, "error", self.environment_failure, limit="state_disk")
                    elif not w.sidecar_ready and now - t0 > SIDECAR_READY_TIMEOUT:
                        # The go-ahead came on its open ports (`listening`); it never served on them. (No tail of
                        # its output here: the sidecar still runs, and its output has not ended.)
                        self._limit(
                            agent,
                            w,
                            "error",
                            f"the sidecar did not become ready in {SIDECAR_READY_TIMEOUT:g}s: it opened its ports "
                            "but never served on them",
                        )
                    elif now - t0 > lim.wall_seconds:
                        self._limit(agent, w, "timeout", f"wall-clock limit of {lim.wall_seconds}s reached")
                    elif now - w.last_activity > lim.idle_seconds:
                        self._limit(agent, w, "idle", f"no output and no model call for {lim.idle_seconds}s")
                    elif w.result_at is not None and not w.lingered and now - w.result_at > RESULT_GRACE:
                        self._record(ev.AgentLingered(seconds=RESULT_GRACE))
                        self.handle.stop("agent", STOP_GRACE)
                        # result_at stays: model calls that began after the result still count against it.
                        w.lingered = True
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
                        self._limit(
                            agent,
                            w,
                            "error",
                            f"the workspace grew by {grown // 1024**2} MiB, over the disk limit of {lim.disk}",
                            limit="disk",
                        )
                elif source == "gateway":
                    if line is None:
                        if not w.sidecar_gone and w.reason is None and w.result is None:
                            w.sidecar_gone = True
                            why = (
                                "the sidecar stopped while the agent was running"
                                if w.sidecar_ready
                                else "the sidecar did not become ready: " + self._tail("sidecar")
                            )
                            self._limit(agent, w, "error", why)
                        continue
                    w.sidecar_bytes += getattr(line, "size", len(line)) + 1
                    if w.sidecar_bytes > MAX_OUTPUT_BYTES and '"event":"egress"' in line[:200]:
                        # A connection flood: the run ends, and its decision lines are counted, no longer
                        # recorded (model calls always are), so neither the trail nor this process grows on.
                        w.egress_unrecorded += 1
                        if w.reason is None:
                            self._limit(
                                agent,
                                w,
                                "error",
                                f"the agent made connections enough for more than "
                                f"{MAX_OUTPUT_BYTES // 1024**2} MiB of egress decisions (egress_flood)",
                                limit="egress_flood",
                            )
                        continue
                    self._gateway_event(line, w, agent)
        finally:
            backlog.close(0 if w.flooded else MAX_OUTPUT_BYTES)
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

    def _agent_output(self, agent: str, w: RunState, source: str, line: str) -> bool:
        """Count a line of the agent's output against the bounds; False once they are exceeded."""
        if w.flooded:
            return False
        size = getattr(line, "size", len(line))
        w.output_bytes += size + 1
        w.output_lines += 1
        if w.output_bytes > MAX_OUTPUT_BYTES or w.output_lines > MAX_OUTPUT_LINES:
            w.flooded = True
            if w.reason is None:
                self._limit(
                    agent,
                    w,
                    "error",
                    f"the agent wrote more than {MAX_OUTPUT_BYTES // 1024**2} MiB or "
                    f"{MAX_OUTPUT_LINES} lines of output (output_flood); what came "
                    "before is kept",
                    limit="output_flood",
                )
            return False
        cut = getattr(line, "cut", 0)
        if cut:
            self._record(
                ev.AgentLineTruncated(
                    stream="stdout" if source == "agent" else "stderr", line=w.output_lines, bytes=size, kept=size - cut
                )
            )
        return True

    def _limit(
        self, agent: str, w: RunState, reason: str, message: str, limit: str | None = None, grace: float = STOP_GRACE
    ) -> None:
        w.reason, w.message = reason, message
        self._record(ev.LimitHit(limit=limit or reason, reason=reason, message=message))
        self.ui.event("limit", message)
        log.info("limit_hit run_id=%s limit=%s", self.spec.run_id, reason)
        self.handle.stop("agent", grace)

    def _agent_line(self, agent: str, line: str, w: RunState) -> None:
        # Everything here is the agent's own account (any process in its container can write to this
        # stream): recorded with source `agent`, as claims. What the model was asked and answered is the
        # gateway's record; `completed` needs the two to agree (_result_backed).
        for type_, payload in agent_stream.events_from_line(line):
            self._record_untrusted("agent", type_, payload)
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

    def _gateway_event(self, line: str, w: RunState, agent: str | None = None) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError:
            self._record(ev.SidecarOutput(text=line[:2000]), source="gateway")
            return {}
        kind = str(event.pop("event", "unknown"))
        for k in ("time", "run_id", "n"):
            event.pop(k, None)
        if kind == "egress":
            self._record_untrusted("proxy", "egress", event)
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
        self._record_untrusted("gateway", kind, event)
        w.last_activity = time.monotonic()
        if kind == "ready":
            w.sidecar_ready = True
        if kind == "model_call":
            # The gateway's record of model calls, which nothing in the agent's container can write, stamped
            # with when the line was read: it decides whether the agent's claimed result stands (_result_backed).
            w.gateway_calls.append((getattr(line, "at", None) or time.monotonic(), event))
            w.model_calls += 1
            w.spent_usd = float(event.get("spent_usd", w.spent_usd))
            self.ui.status(spent=w.spent_usd)
            u = event.get("usage") or {}
            w.tokens = Tokens(
                input=w.tokens.input + int(u.get("input_tokens", 0)),
                output=w.tokens.output + int(u.get("output_tokens", 0)),
                cache_read=w.tokens.cache_read + int(u.get("cache_read_input_tokens", 0)),
                cache_write=w.tokens.cache_write + int(u.get("cache_creation_input_tokens", 0)),
            )
            if self.budget_guard is not None:
                # The gateway books the call in the shared ledger itself (run/budget.py).
                shared = self.budget_guard.spent_usd
                if shared >= self.budget_guard.cap_usd and agent is not None and w.reason is None:
                    self._limit(
                        agent,
                        w,
                        "budget",
                        f"the {self.budget_guard.label} of ${self.budget_guard.cap_usd:.2f} is spent",
                        limit="shared_budget",
                    )
            if self.store and not self._replaying:
                day_total = self._book(float(event.get("cost_usd", 0)))
                cap = self.daily_budget_usd
                if cap is not None and day_total >= cap and agent is not None and w.reason is None:
                    self._limit(
                        agent,
                        w,
                        "budget",
                        f"the host's daily budget of ${cap:.2f} is spent (${day_total:.4f} today)",
                        limit="daily_budget",
                    )
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

    def _reason(self, w: RunState, exit_code: int | None, oom: bool) -> tuple[str, str]:
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
                self._record(
                    ev.ResultVerified(
                        backed=backed,
                        detail=why,
                        gateway_calls=len(calls),
                        claimed_turns=r.get("num_turns") if isinstance(r.get("num_turns"), int) else None,
                        last_stop_reason=calls[-1].get("stop_reason") if calls else None,
                    )
                )
                if backed:
                    return "completed", "the agent finished its task"
                return "error", f"the agent's claimed result is not backed by the gateway's record: {why}"
            if sub == "error_max_turns":
                return "turns", f"Claude Code reached --max-turns {self.limits.max_turns}"
            if sub == "error_max_budget_usd":
                return "budget", "Claude Code reached its own budget"
            return "error", f"the agent ended with an error: {str(r.get('result') or sub)[:300]}"
        return "error", f"the agent exited with code {exit_code} without a result"

    def _settle_gateway(self, w: RunState) -> None:
        """Record the gateway's events still to come once the watch loop is done: when the agent ended (its
        last model call among them), and after the check (its egress). The sidecar is asked to settle: its
        `settled` line comes after every model call begun before (sidecar/__main__.py), so reading up to it
        is enough. Without an answer (no sidecar any more, an older one), until it has been quiet SETTLE_QUIET."""
        token = secrets.token_hex(8)
        if self._ask_settle(token):
            deadline = time.monotonic() + SETTLE_WAIT
            while (left := deadline - time.monotonic()) > 0:
                try:
                    source, line = self._next_line(timeout=left)
                except queue.Empty:
                    break
                if source != "gateway":
                    continue
                if line is None:
                    return  # its output ended: there is nothing more to read
                event = self._gateway_event(line, w)
                if event.get("event") == GatewaySettled.TYPE and event.get("token") == token:
                    w.inflight_at_settle = int(event.get("inflight") or 0)
                    if not w.inflight_at_settle:
                        return
                    # Calls the gateway could not see end (a slow upstream, a call that outlasts its client): what
                    # comes of them in the quiet wait below is recorded, and the result is not taken on trust.
                    log.warning(
                        "settled_with_calls_in_flight run_id=%s inflight=%d", self.spec.run_id, w.inflight_at_settle
                    )
                    break
            else:
                log.warning("settle_unanswered run_id=%s waited_s=%.1f", self.spec.run_id, SETTLE_WAIT)
        while True:
            try:
                source, line = self._next_line(timeout=SETTLE_QUIET)
            except queue.Empty:
                return
            if source == "gateway" and line is not None:
                self._gateway_event(line, w)

    def _ask_settle(self, token: str) -> bool:
        """Send the sidecar a settle request on its control socket; whether it took it. Through the run handle:
        on Docker the socket is in the run's model directory, on Kubernetes in the sidecar's pod."""
        answer = self.handle.ask("sidecar", f"{SIDECAR_OUT}/{CONTROL_SOCKET}", token.encode() + b"\n", SETTLE_WAIT + 2)
        return answer is not None and answer.startswith(b"ok")

    def _result_backed(self, w: RunState, r: dict[str, Any]) -> tuple[bool, str]:
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
            return False, ("the result came while tool calls were still running: " + ", ".join(w.open_at_result[:5]))
        if w.inflight_at_settle:
            return False, (
                f"{w.inflight_at_settle} model call(s) were still in flight at the gateway after the agent had ended"
            )
        at = w.result_at or time.monotonic()
        later = [p for t, p in ok if t - int(p.get("duration_ms") or 0) / 1000 > at + RESULT_SLACK]
        if later:
            return False, f"{len(later)} model call(s) began after the result (call {later[0].get('call')} first)"
        before = [p for t, p in ok if p not in later]
        if any("stop_reason" in p for p in before):
            main = [p for p in before if p.get("tools_offered", 1)] or before
            last = main[-1]
            if last.get("stop_reason") not in END_STOP_REASONS or last.get("tool_uses"):
                return False, (
                    f"the last model call (call {last.get('call')}) ended with "
                    f"{last.get('stop_reason')}, asking for {len(last.get('tool_uses') or [])} tool(s)"
                )
        return True, f"{len(ok)} model call(s) through the gateway agree"
