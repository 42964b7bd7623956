"""Finishing a run whose supervisor is gone (or whose work waits to be imported): what the trail lacks is read
back from the sidecar's numbered copy of its lines and the agent's log, then the run is collected and
finished like any other."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from agent_sandbox.audit import events as ev
from agent_sandbox.audit.log import AuditLog
from agent_sandbox.backend import Backend
from agent_sandbox.backend.plan import ImageSet, Role
from agent_sandbox.errors import ExitCode, SandboxError
from agent_sandbox.git.checkout import Imported
from agent_sandbox.run import workspace
from agent_sandbox.run.budget import remove_leftovers
from agent_sandbox.run.finish import Finishing
from agent_sandbox.run.output import (
    MAX_OUTPUT_BYTES,
    MAX_OUTPUT_LINES,
    Line,
    lines,
)
from agent_sandbox.run.progress import Reporter
from agent_sandbox.run.spec import RunSpec, RunSummary
from agent_sandbox.run.state import RunState
from agent_sandbox.run.workloads import SIDECAR_EVENTS
from agent_sandbox.store import RunStore

log = logging.getLogger(__name__)


class Recovering(Finishing):
    """A run another process started and did not finish."""

    @classmethod
    def for_recovery(
        cls, run_dir: Path, backend: Backend, images: ImageSet, store: RunStore | None, reporter: Reporter | None = None
    ) -> Self:
        """A supervisor for a run another process started and did not finish (orphans.py holds its lock)."""
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
        roles: tuple[Role, ...] = ("agent", "check", "finaliser", "sidecar")
        for role in roles:
            self.handle.stop(role, 1)
        gateway_lines, lost = self._unrecorded_sidecar(recorded)
        agent_lines = self._unrecorded("agent", False, self._stream_lines())
        self._record(
            ev.Recovery(
                by=by,
                why=why,
                dropped_bytes=dropped,
                gateway_lines=len(gateway_lines),
                gateway_lines_lost=lost,
                agent_lines=len(agent_lines),
            )
        )
        for line in gateway_lines:
            self._gateway_event(line, watch)
        with (self.run_dir / "agent-stream.jsonl").open("a", encoding="utf-8") as stream:
            for line in agent_lines:
                self._keep_line(stream, line)
                self._agent_line("agent", line, watch)
        imported: Imported | None = None
        error: str | None = None
        try:
            # The workloads go; what holds the work stays (on Kubernetes the run's volume) for the finaliser,
            # which starts under this handle, and `_teardown` removes the rest.
            self.handle.remove_workloads()
            workspace.remount(self.run_dir)
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
        landed = (
            f"its work is on {imported.branch}"
            if imported and imported.head
            else ("it had changed nothing" if imported else f"its work could not be imported: {error}")
        )
        reason: str
        if prior is not None:
            reason = prior.reason
            before = prior.message.split("; the agent's work is kept")[0]
            message = f"{before}; recovered by {by}: {landed}"
        else:
            reason, message = "interrupted", f"{why}; recovered by {by}: {landed}"
        log.info("recovered run_id=%s by=%s imported=%s", self.spec.run_id, by, bool(imported and imported.head))
        return self._finish(reason, message, watch, imported, False, None, error, started)

    def _unrecorded_sidecar(self, seen: int) -> tuple[list[Line], int]:
        """The sidecar's lines past number `seen`, from its container's log, and how many of them the log no
        longer has (rotated away). Every line but egress decisions is kept; egress lines (a connection flood)
        up to the live run's output bound, so that a flood cannot hide the model calls after it."""
        out: list[Line] = []
        expected, missing = seen + 1, 0
        egress_bytes = 0
        kept = self.run_dir / "model" / SIDECAR_EVENTS
        try:
            # The sidecar's own file, which no flood rotates away; its container's log where there is none.
            if kept.is_file() and not kept.is_symlink():
                fh = kept.open("rb")
                source: Iterator[bytes] = iter(lambda: fh.read(1 << 20), b"")
            else:
                fh, source = None, self.handle.output("sidecar")
            for line in lines(source):
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

    def _unrecorded(self, role: Role, stderr: bool, seen: int) -> list[Line]:
        """The lines of a stopped container's log past the first `seen` (which the trail has already)."""
        out: list[Line] = []
        size = 0
        try:
            for n, line in enumerate(lines(self.handle.output(role, stderr=stderr))):
                if n < seen:
                    continue
                size += line.size + 1
                if size > MAX_OUTPUT_BYTES or len(out) >= MAX_OUTPUT_LINES:
                    break  # the same bounds as a live run's: a flood is not read back in full either
                out.append(line)
        except Exception as exc:  # the container is gone (removed, or the engine restarted without it)
            log.info("no_container_log role=%s error=%r", role, exc)
        return out

    def _replay(self) -> tuple[RunState, int]:
        """What the run had learnt (spend, calls, tokens, egress, turns, the agent's result), rebuilt from its
        trail and stream without recording anything again; and how many of the sidecar's (numbered) lines the
        trail has: one event each, in order."""
        assert self.audit is not None
        w = RunState()
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
                        self._agent_line("agent", line.rstrip("\n"), w)
        finally:
            self._replaying = False
        w.reason = None
        return w, sidecar_lines
