"""The supervisor: runs one task from prepared checkout to imported branch, and always tears down.

Everything that limits the agent lives here or in the sidecar, outside the agent's container: the wall
clock, idle time, turns and the budget. Whatever ends the run, the finaliser still packs the agent's work,
the host imports it, and every container and network labelled with the run id is removed.

The flow is `run()`, in the order of docs/how-it-works.md; each step lives in the module named for its job:
watch.py (the agent and its limits), collect.py (finaliser, check, import), finish.py (teardown, gate,
summary, handoff) and recovery.py; base.py holds the run's state.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time

import psutil

from agent_sandbox.audit import events as ev
from agent_sandbox.audit.log import AuditLog
from agent_sandbox.backend import Mount, Workload
from agent_sandbox.backend.plan import SIDECAR_NAME
from agent_sandbox.errors import ExitCode, SandboxError, disk_full
from agent_sandbox.git.checkout import Imported
from agent_sandbox.interrupts import interrupts
from agent_sandbox.run import held_mounts, pool, quota, workspace
from agent_sandbox.run.base import CHECK_TIMEOUT, DEADLINE_MARGIN, SIDECAR_READY_TIMEOUT, STOP_GRACE, _Cancelled
from agent_sandbox.run.budget import SharedBudget
from agent_sandbox.run.liveness import (
    HEARTBEAT_FILE,
    HEARTBEAT_TIMEOUT,
    Heartbeat,
)
from agent_sandbox.run.recovery import Recovering
from agent_sandbox.run.spec import RunSummary
from agent_sandbox.run.workloads import CONTROL_SOCKET, HELD_TARGET, SIDECAR_EVENTS, SIDECAR_UID, held_sidecar
from agent_sandbox.sidecar.config import SidecarConfig

log = logging.getLogger(__name__)

API_KEY_ENV = "ANTHROPIC_API_KEY"

# A sweep's budget: the ledger its runs' gateways reserve and settle against (run/budget.py).
BudgetGuard = SharedBudget


def host_addresses() -> list[str]:
    """Every address of this host's interfaces: the proxy refuses them like private ones."""
    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.add(a.address.split("%")[0])
    return sorted(out)


class Supervisor(Recovering):
    """Runs one task, from a new run directory to its summary."""

    def run(self) -> RunSummary:
        """The run, from a new run directory to its summary. It holds the run's lock (liveness.py) throughout:
        whoever can take it knows the supervisor is gone. Signals stop the agent (interrupts.py); nothing
        interrupts the collection, import and teardown that follow."""
        self.run_dir.mkdir(parents=True, exist_ok=self.slot is not None)  # a pool's slot made it
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
            self.store.run_started(
                {
                    "id": self.spec.run_id,
                    "repo": self.spec.repo,
                    "base_commit": self.spec.base_commit,
                    "branch": self.spec.branch,
                    "task": self.redact(self.spec.task.strip().splitlines()[0][:300]),
                    "policy": self.spec.policy.name,
                    "policy_sha256": self.spec.policy.digest(),
                    "status": "running",
                    "started_at": time.time(),
                    "run_dir": str(self.run_dir),
                    "supervisor_pid": os.getpid(),
                }
            )
        watch = self.state
        imported: Imported | None = None
        oom = False
        agent_exit: int | None = None
        error: str | None = None
        self.ui.begin(self.spec.run_id, self.limits, self.spec.model)
        try:
            self._record_start()
            self._checkpoint()
            # The steps of docs/how-it-works.md. 2. Prepare: the checkout and what the workloads share.
            self.ui.phase("prepare", f"checkout of {self.spec.base_commit[:12]} on {self.spec.branch}")
            self._prepare()
            self._checkpoint()
            # 3. Sidecar: the model gateway and the egress proxy. 4. Agent, confined to the sidecar: its container
            # starts while the sidecar gets ready, and its code runs once the sidecar is; 5. watched until it
            # ends, with every limit enforced from here.
            self.ui.phase("start", "networks and sidecar")
            sidecar = self._sidecar_workload()
            self._checkpoint()
            self.ui.phase("agent", f"Claude Code {self.images.claude_code_version}, model {self.spec.model}")
            agent = self._start_agent(sidecar=lambda: self._start_sidecar(sidecar), ready=self._await_sidecar)
            try:
                self._watch(agent, watch)
            except KeyboardInterrupt:  # signals not taken over (interrupts.py): the agent still stops cleanly
                self.cancel("interrupted", "the supervisor was interrupted")
                self._limit(agent, watch, "interrupted", "the supervisor was interrupted", grace=1.0)
            info = self.handle.wait(agent, STOP_GRACE + 5)
            oom, agent_exit = info.oom_killed, info.exit_code
            self._record_usage()
            reason, message = self._reason(watch, info.exit_code, oom)
            if watch.reason is None and reason in ("turns", "budget"):
                # Claude Code's own layer (--max-turns) or the gateway's refusal got there first.
                self._record(ev.LimitHit(limit=reason, reason=reason, message=message))
            # 6. Collect: pack, check and import the work, whatever ended the run.
            self.ui.phase("collect", "packing the agent's work")
            imported, fin_error = self._collect(reason)
            if fin_error and reason == "completed":
                reason, message = "error", fin_error
            check = self.check_result
            if check is not None and check.exit_code != 0 and not check.interrupted and reason == "completed":
                reason = "check"
                message = f"the check `{self.spec.check}` failed (exit {check.exit_code}) on the agent's work"
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
            self._teardown()  # 7. Teardown, on every path
        if self._cancel is not None and reason in ("completed", "check"):
            # Stopped after the agent had finished (during the collection or the check): the run is
            # interrupted, and its work, already packed, is on the branch all the same.
            ran = self.check_result
            when = "during the check" if ran and ran.interrupted else "after the agent finished"
            unchecked = bool(self.spec.check) and (ran is None or ran.interrupted)
            landed = "; its work is on the branch" + (", unchecked" if unchecked else "")
            reason, message = (
                self._cancel[0],
                f"{self._cancel[1]} {when}" + (landed if imported and imported.head else ""),
            )
        if self.backend.engine_lost and self.environment_failure is None:
            self.environment_failure = "the Docker engine went away during the run (stopped or restarted)"
            if reason in ("completed", "error"):
                reason, message = "error", f"{self.environment_failure}: {message}"
        return self._finish(reason, message, watch, imported, oom, agent_exit, error, started)

    def _record_start(self) -> None:
        images = {}
        for role, ref in (("agent", self.images.agent), ("sidecar", self.images.sidecar)):
            try:
                images[role] = self.backend.image_info(ref)
            except Exception as exc:  # recorded, not fatal: the start of the container will say more
                images[role] = {"ref": ref, "error": str(exc)}
        self._record(
            ev.RunStarted(
                spec=self.spec.model_dump(mode="json", exclude={"task"}),
                task=self.spec.task,
                policy_hash=self.spec.policy.digest(),
                images=images,
                claude_code_version=self.images.claude_code_version,
                backend=self.backend.name,
            )
        )

    def _prepare(self) -> None:
        for sub in ("in", "out", "model"):
            (self.run_dir / sub).mkdir(exist_ok=self.slot is not None)
        inputs = {"task.md": self.spec.task}
        if self.ca_pem:
            inputs["ca-certificates.pem"] = self.ca_pem
        for name, command in (("pre.sh", self.spec.pre), ("check.sh", self.spec.check)):
            if command:
                inputs[name] = f"#!/bin/bash\nset -o pipefail\n{command}\n"
        for name, text in inputs.items():
            (self.run_dir / "in" / name).write_text(text)
            # Whatever the supervisor's umask (077 on a careful machine): the workloads' user reads its inputs.
            os.chmod(self.run_dir / "in" / name, 0o644)
        os.chmod(self.run_dir / "in", 0o755)
        # The workspace is limited to the disk limit's size where the machine allows it (quota.py), and is a
        # copy-on-write layer over the base commit's cached tree where it can mount one (workspace.py).
        self.quota = quota.plan(self.run_dir.parent, self.limits.disk_bytes)
        self._record(ev.DiskQuota(mode=self.quota.mode, bytes=self.quota.size_bytes, detail=self.quota.detail))
        prepared = workspace.prepare(
            self.run_dir, self.repo, self.spec.base_commit, self.spec.branch, self.quota, self.chown
        )
        if self.chown:
            os.chown(self.run_dir / "out", *self.chown)
            os.chown(self.run_dir / "model", SIDECAR_UID, SIDECAR_UID)
        self._record(
            ev.CheckoutPrepared(
                base_commit=self.spec.base_commit,
                branch=self.spec.branch,
                objects=str(self.repo.objects),
                mode=prepared.mode,
                cached=prepared.cached,
                seconds=prepared.seconds,
                detail=prepared.detail,
            )
        )
        if self.slot:
            # The networks and the held sidecar the pool made (and the agent's container, where it made one):
            # this run's from here on.
            made = self.slot.slot.networks
            held = []
            if self.slot.slot.agent is not None:
                if prepared.mode != "overlay":
                    raise SandboxError(f"the pool's agent container needs an overlay workspace ({prepared.detail})")
                # The repository's objects, read-only, on the mount point the held containers' history reads.
                held_mounts.bind_objects(self.run_dir, self.repo.objects)
                held = [self.recipes.held_agent(), self.recipes.held_finaliser()]
            self._adopted = self.handle.adopt(self._held_sidecar(), held)
        else:
            made = self.handle.prepare()
        for network in made:
            self._record(ev.NetworkCreated(**network))

    def _sidecar_workload(self) -> Workload:
        """The sidecar's workload: its configuration, and what it mounts (the heartbeat it watches, the shared
        budget's socket, the model script)."""
        egress = self.spec.policy.egress
        budget = self.limits.budget_usd
        if self.spec.daily_remaining_usd is not None:
            # The gateway stops at whichever comes first: the run's budget or what is left of the day's.
            budget = min(budget, self.spec.daily_remaining_usd)
        if self.budget_guard is not None:
            budget = min(budget, self.budget_guard.remaining())
        config = SidecarConfig(
            run_id=self.spec.run_id,
            upstream_url=self.spec.upstream_url,
            budget_usd=budget,
            prices=self.spec.policy.pricing,
            egress=egress,
            own_addresses=host_addresses(),
            gateway_name=SIDECAR_NAME,
            extra_ca_pem=self.ca_pem,
            server_tools=list(self.spec.policy.agent.server_tools),
            # The backstop should the supervisor die (liveness.py): no model call and no
            # connection once its heartbeat stops, or once the run is over by the clock.
            heartbeat_path=f"/sandbox/heartbeat/{HEARTBEAT_FILE}",
            heartbeat_timeout_s=HEARTBEAT_TIMEOUT,
            events_path=f"/sandbox/model-out/{SIDECAR_EVENTS}",
            control_socket=f"/sandbox/model-out/{CONTROL_SOCKET}",
            # The check, after the agent, still reaches the network through the proxy.
            deadline_s=self._deadline() + (CHECK_TIMEOUT + DEADLINE_MARGIN if self.spec.check else 0),
        )
        self.heartbeat = Heartbeat(self.run_dir)
        self.heartbeat.start()
        mounts: list[Mount] = []
        if self.budget_guard is not None:
            # The shared budget's ledger, on a socket in a directory mounted into the sidecar alone.
            self.broker = self.budget_guard.serve(self.spec.run_id, self._sidecar_owner())
            config.broker_socket = "/sandbox/budget/" + self.broker.path.name
            mounts.append(Mount(source=str(self.broker.path.parent), target="/sandbox/budget", read_only=True))
        if self.spec.model_script:
            config.transcript_path = "/sandbox/model-out/transcript.jsonl"
            if self.slot:
                config.script_path = f"{HELD_TARGET}/{pool.copy_script(self.run_dir, self.spec.model_script)}"
            else:
                config.script_path = "/sandbox/model/script.yaml"
                mounts.append(Mount(source=self.spec.model_script, target=config.script_path))
        if self.slot:
            # The pool's sidecar, held: no mount can be added to it (the runner claims no slot for a shared
            # budget), and its configuration arrives as a file (`_start_sidecar`).
            assert not mounts, "a pooled sidecar takes no mounts"
            self._held_config = config.model_dump_json()
            return self._held_sidecar()
        return self.recipes.sidecar(config, self.api_key, mounts)

    def _held_sidecar(self) -> Workload:
        return held_sidecar(self.images.sidecar, self.users, self.run_dir, self.spec.policy.egress.hosts)

    def _start_sidecar(self, workload: Workload) -> None:
        if self.slot:
            # Made ahead, its imports done: it starts serving once its configuration is there.
            assert self._adopted is not None
            pool.configure(self.run_dir, self._held_config, self.api_key, self._sidecar_owner())
            self._record_started(workload, self._adopted)
        else:
            self._start(workload)
        threading.Thread(target=self._pump, args=("gateway", "sidecar", False), daemon=True).start()

    def _sidecar_owner(self) -> tuple[int, int] | None:
        return (SIDECAR_UID, SIDECAR_UID) if self.chown else None

    def _await_sidecar(self) -> None:
        """Until the sidecar listens on its ports (its `listening` line, before its heavy imports: the agent's
        start overlaps the rest of the sidecar's), or SandboxError. Should it stop before it serves, the watch
        says so (run/watch.py)."""
        deadline = time.monotonic() + SIDECAR_READY_TIMEOUT
        while time.monotonic() < deadline:
            self._checkpoint()
            try:
                _source, line = self._next_line(timeout=0.2)
            except queue.Empty:
                if not self.handle.status("sidecar").running:
                    break
                continue
            if line is None:
                break
            event = self._gateway_event(line, self.state)
            if event.get("event") in ("listening", "ready"):
                return
        raise SandboxError("the sidecar did not become ready: " + self._tail("sidecar"))
