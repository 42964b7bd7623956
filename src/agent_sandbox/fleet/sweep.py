"""Sweeps: one task across many repositories, in parallel, under one shared budget, once a day.

A sweep's branch is `sandbox/<name>/<date>` in every repository: a re-run the same day replaces it rather
than adding another, and skips the repositories that already succeeded that day (unless forced). The
summary (JSON and Markdown) is kept per sweep and day in the state directory.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_sandbox.backend.base import Backend
from agent_sandbox.config.policy import is_policy_file, load_policy
from agent_sandbox.errors import ExitCode, SandboxError, UsageError, validation_message
from agent_sandbox.git.checkout import open_repo, resolve_commit
from agent_sandbox.interrupts import Interrupted, interrupts
from agent_sandbox.paths import state_dir
from agent_sandbox.run.progress import Reporter
from agent_sandbox.run.request import Assignment, RunRequest, RunSettings
from agent_sandbox.run.runner import run_task
from agent_sandbox.run.spec import RunSummary, Status
from agent_sandbox.run.supervisor import BudgetGuard, Supervisor
from agent_sandbox.sidecar.script import ScriptError, load_script

log = logging.getLogger(__name__)

RowStatus = Literal["succeeded", "no_changes", "failed", "killed", "skipped"]
ROW_STATUS: dict[Status, RowStatus] = {Status.SUCCEEDED: "succeeded", Status.FAILED: "failed", Status.KILLED: "killed"}
"""A run's status as its repository's row says it (a success that changed nothing is `no_changes`)."""


class SweepRepo(RunSettings, Assignment):
    """One repository of a sweep. Its `task` and `base`, and any run setting it gives (policy, model_script,
    timeout, push, ...), override the sweep's for this repository."""

    path: str
    """The repository (relative paths are relative to the manifest)."""


class SweepManifest(RunSettings):
    """A sweep: what to do, where, how many at once, and for how much. Its run settings (policy, limits, pre,
    check, push, ...) apply to every repository that does not set its own; relative paths in them (a policy
    file, a model script) are relative to the manifest."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    """Names the branch sandbox/<name>/<date> and the sweep's summaries."""
    task: str = Field(min_length=1)
    """The task for every repository."""
    concurrency: int = Field(default=1, ge=1, le=32)
    """Runs at once."""
    budget_usd: float | None = Field(default=None, gt=0)
    """Model spend for the whole sweep: once spent, no run starts and running ones are stopped. (The policy's
    per-run budget still applies to each run.)"""
    repos: list[SweepRepo] = Field(min_length=1)
    """The repositories."""

    def settings_for(self, r: SweepRepo) -> dict[str, Any]:
        """The run settings of one entry: the sweep's, overridden by those the entry sets itself."""
        own = {k: getattr(r, k) for k in r.model_fields_set & RunSettings.model_fields.keys()}
        return {**self.settings(), **own}

    def entry_request(self, r: SweepRepo, branch: str) -> RunRequest:
        """The run for one entry, on the sweep's branch (which a re-run the same day moves)."""
        return RunRequest(
            **self.settings_for(r),
            repo=r.path,
            task=r.task or self.task,
            base=r.base,
            branch=branch,
            replace_branch=True,
        )


class SweepRow(BaseModel):
    """One repository's outcome in a sweep."""

    model_config = ConfigDict(extra="forbid")

    repo: str
    """The repository."""
    status: RowStatus
    """succeeded, no_changes, failed, killed or skipped."""
    reason: str | None = None
    """The run's reason, or why it was skipped."""
    message: str = ""
    """For people."""
    run_id: str | None = None
    """The run."""
    cost_usd: float = 0.0
    """Its model spend."""
    duration_s: float = 0.0
    """Its wall time."""
    files_changed: int = 0
    """Paths its branch changes."""
    branch: str | None = None
    """The branch with the work."""
    pushed: bool = False
    """Pushed for review."""
    pr_url: str | None = None
    """The pull request."""
    earlier: bool = False
    """Carried over from an earlier run of the sweep the same day (not run again)."""

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "no_changes")


class SweepSummary(BaseModel):
    """A sweep's outcome for one day."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """The sweep."""
    date: str
    """The UTC day."""
    manifest: str
    """The manifest file."""
    started_at: float
    """Unix time."""
    ended_at: float
    """Unix time."""
    budget_usd: float | None
    """The shared budget."""
    spent_usd: float
    """Spent by this invocation's runs."""
    stopped: str | None = None
    """Why runs were stopped or not started, if they were."""
    rows: list[SweepRow]
    """One per repository, in manifest order."""
    exit_code: int
    """0 when every repository succeeded or needed no change."""


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def load_manifest(path: str) -> SweepManifest:
    """Read and validate a manifest; every repository and script is checked before anything starts."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read sweep manifest {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: a sweep manifest is a mapping")
    try:
        m = SweepManifest.model_validate(data)
    except ValidationError as exc:
        raise UsageError(validation_message(exc, str(p))) from None
    here = p.resolve().parent
    m = m.model_copy(update=_relative_to(here, m))
    load_policy(m.policy)
    seen: set[str] = set()
    repos = []
    for i, r in enumerate(m.repos):
        where = f"{p}: repos[{i}] ({r.path})"
        try:
            host = open_repo(_resolve(here, r.path) or "")
            resolve_commit(host, r.base)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc.message}") from None
        if str(host.path) in seen:
            raise UsageError(f"{where}: listed twice")
        seen.add(str(host.path))
        # model_copy marks what it updates as set, and what an entry sets overrides the sweep: only its own.
        r = r.model_copy(update={"path": str(host.path), **_relative_to(here, r)})
        own = m.settings_for(r)
        try:
            if "policy" in r.model_fields_set:
                load_policy(own["policy"])
            for script in dict.fromkeys((own["model_script"], m.model_script)):
                if script:
                    load_script(script)
        except ScriptError as exc:
            raise UsageError(f"{where}: {exc}") from None
        except UsageError as exc:
            raise UsageError(f"{where}: {exc.message}", hint=exc.hint) from None
        repos.append(r)
    return m.model_copy(update={"repos": repos})


def _relative_to(here: Path, settings: RunSettings) -> dict[str, Any]:
    """The policy file and model script the settings name themselves, as absolute paths (relative ones are
    relative to the manifest)."""
    paths: dict[str, Any] = {}
    if "policy" in settings.model_fields_set and is_policy_file(settings.policy):
        paths["policy"] = _resolve(here, settings.policy)
    if "model_script" in settings.model_fields_set:
        paths["model_script"] = _resolve(here, settings.model_script)
    return paths


def sweep_dir(name: str) -> Path:
    return state_dir() / "sweeps" / name


def load_summary(name: str, date: str | None = None) -> SweepSummary | None:
    d = sweep_dir(name)
    path = d / f"{date}.json" if date else d / "latest.json"
    if not path.is_file():
        return None
    return SweepSummary.model_validate_json(path.read_text())


def _row(repo: str, s: RunSummary) -> SweepRow:
    status = "no_changes" if s.status == Status.SUCCEEDED and not s.branch else ROW_STATUS[s.status]
    return SweepRow(
        repo=repo,
        status=status,
        reason=s.reason,
        message=s.message,
        run_id=s.id,
        cost_usd=s.cost_usd,
        duration_s=s.duration_s,
        files_changed=len(s.files_changed),
        branch=s.branch,
        pushed=s.pushed,
        pr_url=s.pr_url,
    )


class PrefixReporter:
    """Plain progress lines from several runs at once, each prefixed with its repository."""

    def __init__(self, inner: Reporter, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def begin(self, run_id: str, limits: Any, model: str) -> None:
        self.inner.phase(f"{self.prefix}", f"run {run_id}")

    def phase(self, name: str, detail: str = "") -> None:
        self.inner.phase(self.prefix, f"{name}: {detail}")

    def event(self, kind: str, text: str) -> None:
        self.inner.event(kind, f"{self.prefix}: {text}")

    def status(self, **fields: Any) -> None:
        pass

    def end(self) -> None:
        pass


def run_sweep(
    manifest_path: str, force: bool = False, reporter: Reporter | None = None, backend: Backend | None = None
) -> SweepSummary:
    """Run the manifest's repositories (those not done today, unless force), under one shared budget; a run's
    failure is its row's, never the sweep's. backend: as for run_task."""
    m = load_manifest(manifest_path)
    date = dt.datetime.now(dt.UTC).date().isoformat()
    branch = f"sandbox/{m.name}/{date}"
    today = load_summary(m.name, date)
    earlier = {r.repo: r for r in today.rows} if today else {}
    guard = BudgetGuard(m.budget_usd, "sweep budget") if m.budget_usd else None
    running: dict[str, Supervisor] = {}
    lock = threading.Lock()
    stopped: list[str] = []
    started = time.time()

    def one(r: SweepRepo) -> SweepRow:
        prev = earlier.get(r.path)
        if prev is not None and prev.done and not force:
            return prev.model_copy(update={"earlier": True})
        if guard is not None and guard.exhausted:
            return SweepRow(
                repo=r.path,
                status="skipped",
                reason="budget",
                message=f"not started: the sweep budget of ${m.budget_usd:.2f} is spent",
            )
        if stopped:
            return SweepRow(repo=r.path, status="skipped", reason="interrupted", message="not started: " + stopped[0])
        req = m.entry_request(r, branch)

        def register(sup: Supervisor) -> None:
            with lock:
                running[r.path] = sup

        try:
            name = Path(r.path).name
            rep = PrefixReporter(reporter, name) if reporter is not None else None
            s = run_task(req, reporter=rep, budget_guard=guard, on_start=register, backend=backend)
        except Interrupted as exc:
            return SweepRow(repo=r.path, status="skipped", reason="interrupted", message="not started: " + exc.message)
        except SandboxError as exc:
            return SweepRow(repo=r.path, status="failed", reason="error", message=exc.message)
        except Exception as exc:  # one repository's crash must not take the sweep down with it
            log.exception("sweep_run_crashed repo=%s", r.path)
            return SweepRow(repo=r.path, status="failed", reason="error", message=f"{type(exc).__name__}: {exc}")
        finally:
            with lock:
                running.pop(r.path, None)
        return _row(r.path, s)

    def interrupted(name: str) -> None:
        # The running runs get the signal themselves (interrupts.py): they stop their agents and bring their
        # work home. No further run starts.
        stopped.append(f"the sweep was interrupted ({name})")

    rows: list[SweepRow] = []
    with (
        interrupts.delivered_to(interrupted),
        ThreadPoolExecutor(max_workers=m.concurrency, thread_name_prefix="sweep") as pool,
    ):
        futures = [pool.submit(one, r) for r in m.repos]
        try:
            for f in futures:
                while True:
                    try:
                        rows.append(f.result(timeout=0.5))
                        break
                    except TimeoutError:
                        continue
        except KeyboardInterrupt:  # signals not taken over (a library caller): stop the runs from here
            stopped.append("the sweep was interrupted")
            with lock:
                for sup in running.values():
                    sup.cancel("interrupted", "the sweep was interrupted")
            rows = [f.result() for f in futures]
    why = stopped[0] if stopped else None
    if guard is not None and guard.exhausted:
        why = f"the sweep budget of ${m.budget_usd:.2f} was spent: no further runs started, running ones stopped"
    failed = [r for r in rows if not r.done]
    code = ExitCode.INTERRUPTED if stopped else (ExitCode.SWEEP_INCOMPLETE if failed else ExitCode.OK)
    summary = SweepSummary(
        name=m.name,
        date=date,
        manifest=str(Path(manifest_path).resolve()),
        started_at=started,
        ended_at=time.time(),
        budget_usd=m.budget_usd,
        spent_usd=guard.spent_usd if guard else sum(r.cost_usd for r in rows if not r.earlier),
        stopped=why,
        rows=rows,
        exit_code=int(code),
    )
    write_summary(summary)
    log.info("sweep_done name=%s rows=%d failed=%d", m.name, len(rows), len(failed))
    return summary


def render(s: SweepSummary) -> str:
    lines = [
        f"# Sweep {s.name}, {s.date}",
        "",
        f"{sum(r.done for r in s.rows)} of {len(s.rows)} repositories done; "
        f"spent ${s.spent_usd:.4f}" + (f" of ${s.budget_usd:.2f}" if s.budget_usd else "") + ".",
        "",
    ]
    if s.stopped:
        lines += [f"**Stopped:** {s.stopped}", ""]
    lines += [
        "| repository | status | reason | cost | time | files | branch | PR |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in s.rows:
        status = r.status + (" (earlier today)" if r.earlier else "")
        lines.append(
            f"| `{r.repo}` | {status} | {r.reason or ''} | ${r.cost_usd:.4f} | {r.duration_s:.0f}s | "
            f"{r.files_changed} | {f'`{r.branch}`' if r.branch else ''} | {r.pr_url or ''} |"
        )
    lines.append("")
    for r in s.rows:
        if not r.done and r.message:
            lines.append(f"- `{r.repo}`: {r.message}")
    return "\n".join(lines).rstrip() + "\n"


def write_summary(s: SweepSummary) -> None:
    d = sweep_dir(s.name)
    d.mkdir(parents=True, exist_ok=True)
    data = s.model_dump_json(indent=2)
    for name in (f"{s.date}.json", "latest.json"):
        tmp = d / f".{name}.tmp"
        tmp.write_text(data)
        tmp.replace(d / name)
    (d / f"{s.date}.md").write_text(render(s))
    (d / "latest.md").write_text(render(s))
