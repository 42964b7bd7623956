"""The end of a run: teardown (which never raises), the gate, the summary, the push and pull request, and the
records written last."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent_sandbox.audit import events as ev
from agent_sandbox.errors import ExitCode, disk_full
from agent_sandbox.git.checkout import Imported, remove_tree
from agent_sandbox.git.gate import Violation
from agent_sandbox.git.gate import check as gate_check
from agent_sandbox.git.github import PullRequestResult
from agent_sandbox.git.handoff import HandoffError, open_pull_request, push_branch, remote_url, run_note
from agent_sandbox.run import later, pool, quota, report, workspace
from agent_sandbox.run.collect import Collecting
from agent_sandbox.run.spec import EXIT_BY_REASON, HANDOFF_FAILED, STATUS_BY_REASON, RunSpec, RunSummary
from agent_sandbox.run.state import RunState
from agent_sandbox.run.workloads import SIDECAR_EVENTS
from agent_sandbox.sidecar.egress import overview as egress_overview

log = logging.getLogger(__name__)


class Finishing(Collecting):
    """What comes after the work is collected, for a run and for its recovery."""

    def _finish(
        self,
        reason: str,
        message: str,
        watch: RunState,
        imported: Imported | None,
        oom: bool,
        agent_exit: int | None,
        error: str | None,
        started: float,
    ) -> RunSummary:
        """The gate, the summary, the push and pull request, the last audit line and the store: what comes
        after teardown, for a run and for its recovery. A full state disk loses records here, never the work."""
        violations: list[Violation] = []
        if imported and imported.head and error is None:
            try:
                gate = gate_check(self.repo, self.spec.base_commit, imported.head, self.spec.policy.git)
                violations = gate.violations
                self._record(ev.GateChecked(**gate.model_dump()))
            except Exception as exc:  # a gate that cannot run must not let the change through
                violations = [Violation(rule="gate", detail=f"the gate could not check the change: {exc}")]
            if violations and reason == "completed":
                reason = "policy"
                message = f"the change breaks the policy's git rules ({len(violations)} violation(s)); kept locally"
        if self.kept:
            message += (
                f"; the agent's work is kept in {self.kept}: `sandbox gc` imports it onto "
                f"{self.spec.branch} once {'the cause is' if not self.environment_failure else 'that is'} "
                "fixed"
            )
        summary = self._summary(reason, message, watch, imported, oom, time.monotonic() - started)
        summary.violations = violations
        summary.kept = self.kept
        if self.environment_failure:
            summary.exit_code = int(ExitCode.ENVIRONMENT)
        self._handoff(summary)
        self.ui.end()
        if self.spec.open_pr and summary.pushed:
            self._open_pr(summary)
        self._record(
            ev.RunEnded(
                status=summary.status,
                reason=reason,
                message=message,
                exit_code=summary.exit_code,
                agent_exit_code=agent_exit,
                oom_killed=oom,
                error=error,
                interrupted=reason == "interrupted",
                cost_usd=summary.cost_usd,
                branch=summary.branch,
                pushed=summary.pushed,
                pr_url=summary.pr_url,
            )
        )
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
        self._finaliser_started_ahead()  # its start, if under way, is over before anything is removed
        deferred = later.active() and self.work_settled and not self.spec.keep
        if deferred:
            # The work is home: the run answers first, and its objects go right after (the warm daemon's runs).
            # Should this process die before, they keep their labels, and `sandbox gc` removes them.
            later.defer(self._remove_after_answer)
        else:
            try:
                # What holds the work must stay when the working tree could not be brought home (`_keep_work`).
                removed = self.handle.teardown() if self._keep_work() else self.handle.remove_workloads()
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
        self._record(ev.Teardown(removed=removed, error=failure, kept=self.kept, after_answer=deferred))

    def _remove_after_answer(self) -> None:
        t0 = time.monotonic()
        try:
            removed = self.handle.teardown()
        except Exception as exc:
            log.warning("teardown_failed run_id=%s after_answer=True error=%r", self.spec.run_id, exc)
            return
        log.info(
            "teardown_after_answer run_id=%s removed=%d seconds=%.2f",
            self.spec.run_id,
            len(removed),
            time.monotonic() - t0,
        )

    def _keep_work(self) -> bool:
        """Before teardown, where the working tree is kept (`--keep`, or work not imported, which
        `_cleanup_files` parks for `sandbox gc`): the backend brings it into the workspace if it holds it
        elsewhere. False when it could not and the work is not imported: teardown then keeps what holds it, for
        `sandbox gc` to import from."""
        if not (self.spec.keep or (self.agent_started and not self.work_settled)):
            return True
        try:
            self.handle.keep_work(self.run_dir / "workspace")
            return True
        except Exception as exc:
            log.warning("work_not_kept run_id=%s error=%r", self.spec.run_id, exc)
            return self.work_settled or not self.agent_started

    def _cleanup_files(self) -> None:
        # A pooled sidecar's key file (run/pool.py): gone with the run, a recovered run's included.
        pool.forget_key(self.run_dir)
        # Recovery's copy of the sidecar's lines: the trail has them now.
        (self.run_dir / "model" / SIDECAR_EVENTS).unlink(missing_ok=True)
        transcript = self.run_dir / "model" / "transcript.jsonl"
        if transcript.is_file():
            # The sidecar wrote it inside its container; redaction happens here, on the host.
            transcript.write_text(self.redact(transcript.read_text(errors="replace")))
        if self.agent_started and not self.work_settled:
            # The work never reached the branch (the engine gone, a full disk, a finaliser that failed): it
            # stays, and the store marks the run for `sandbox gc` to import it.
            # Unmounted, the work is in the filesystem image (gc mounts it again to import it).
            self.kept = workspace.park(self.run_dir)
            quota.release(self.run_dir / "check")
            if self.store:
                try:
                    self.store.update(self.spec.run_id, recover=self.environment_failure or "the work was not imported")
                except Exception as exc:
                    log.warning("store_update_failed run_id=%s error=%r", self.spec.run_id, exc)
            return
        workspace.release_run(self.run_dir, keep=self.spec.keep)  # the overlay and its layer go here
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
        self._record(ev.Pushed(remote=s.remote, branch=s.branch, pushed=s.pushed, error=s.push_error))

    def _open_pr(self, s: RunSummary) -> None:
        """Open the branch's pull request, or update the one it already has open (a rerun of the same branch);
        a failure keeps the pushed branch and says how to retry."""
        try:
            if not (self.spec.pr_repo and self.github_token):
                # The runner refuses --open-pr without both; a run that lost them still says so, not crashes.
                raise HandoffError("no GitHub repository or GITHUB_TOKEN to open the pull request with")
            self.ui.phase("pr", f"{s.branch} into {self.spec.pr_base} on {self.spec.pr_repo}")
            pr = hand_off_pull_request(
                self.spec, s, self.run_dir, remote_url(self.repo, self.spec.remote), self.github_token, self.redact
            )
            log.info(
                "pr_handed_off run_id=%s url=%s created=%s problems=%d", s.id, pr.url, pr.created, len(pr.problems)
            )
        except HandoffError as exc:
            s.push_error = f"pushed, but {exc.message}; retry with `sandbox push {s.id}`"
            s.exit_code = int(HANDOFF_FAILED)
        self._record(ev.PullRequest(url=s.pr_url, error=s.push_error if not s.pr_url else None))

    def _write_summary(self, s: RunSummary) -> None:
        """summary.json and the report, then the store: the store calls a run ended only once its files exist,
        and a run it still calls running once its supervisor is gone is finished by `sandbox gc`."""
        tmp = self.run_dir / ".summary.json.tmp"
        tmp.write_text(s.model_dump_json(indent=2))
        tmp.replace(self.run_dir / "summary.json")
        report.write(self.run_dir, s)
        if self.store:
            t = s.tokens
            self.store.update(
                s.id,
                status=s.status,
                reason=s.reason,
                message=s.message,
                branch=s.branch,
                ended_at=time.time(),
                duration_s=s.duration_s,
                cost_usd=s.cost_usd,
                input_tokens=t.input,
                output_tokens=t.output,
                cache_read_tokens=t.cache_read,
                cache_write_tokens=t.cache_write,
                turns=s.turns,
                egress_denied=s.egress_denied,
                files_changed=len(s.files_changed),
                audit_head=s.audit_head,
                pushed=int(s.pushed),
                recover=(self.environment_failure or "the work was not imported") if s.kept else None,
            )

    def _summary(
        self, reason: str, message: str, w: RunState, imported: Imported | None, oom: bool, duration: float
    ) -> RunSummary:
        files = [r.path for r in self._files] if imported and imported.head else []
        net = egress_overview(w.egress_lines.lines())
        return RunSummary(
            id=self.spec.run_id,
            status=STATUS_BY_REASON[reason],
            reason=reason,  # type: ignore[arg-type]
            message=message,
            repo=self.spec.repo,
            branch=imported.branch if imported else None,
            base_commit=self.spec.base_commit,
            follow_up=self.spec.follow_up,
            head=imported.head if imported else None,
            commits=imported.commits if imported else [],
            files_changed=files,
            cost_usd=round(w.spent_usd, 6),
            model_calls=w.model_calls,
            turns=len(w.turns),
            duration_s=round(duration, 2),
            exit_code=int(EXIT_BY_REASON[reason]),
            oom_killed=oom,
            egress_allowed=w.egress_allowed,
            egress_denied=w.egress_denied,
            egress_would_deny=w.egress_would_deny,
            egress_hosts_allowed=net.allowed,
            egress_hosts_denied=net.denied,
            egress_hosts_would_deny=net.would_deny,
            egress_suggestion=net.suggestion,
            tokens=w.tokens,
            run_dir=str(self.run_dir),
            warnings=self.spec.warnings,
        )


def hand_off_pull_request(
    spec: RunSpec, s: RunSummary, run_dir: Path, remote: str | None, token: str, redact: Callable[[str], str]
) -> PullRequestResult:
    """Open the run's pull request, or update the one its branch has open, with the run's report as the body
    and a note on the run; the url and any refused label or reviewer go into the summary. The run's own
    hand-off and `sandbox push` both use it. HandoffError when GitHub refuses."""
    assert spec.pr_repo is not None
    git_rules = spec.policy.git
    pr = open_pull_request(
        slug=spec.pr_repo,
        head=s.branch or "",
        base=spec.pr_base,
        title=spec.title or ("sandbox: " + spec.task.strip().splitlines()[0][:72]),
        body=redact(report.render(run_dir, s)),
        token=token,
        remote=remote,
        draft=git_rules.pr_draft,
        labels=git_rules.pr_labels,
        reviewers=git_rules.pr_reviewers,
        note=redact(
            run_note(
                run_id=s.id,
                status=s.status,
                message=s.message,
                cost_usd=s.cost_usd,
                files_changed=len(s.files_changed),
                branch=s.branch or "",
            )
        ),
        full_report=f"`{run_dir / 'report.md'}` on the host that ran it (`sandbox show {s.id}`)",
    )
    s.pr_url = pr.url
    # A label or reviewer GitHub refused leaves the pull request fine, but the operator should know.
    s.warnings.extend(f"pull request {pr.url}: {p}" for p in pr.problems)
    return pr
