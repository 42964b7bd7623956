"""Sweeps: one task across many repositories, in parallel, under one budget per sweep and UTC day.

A sweep's branch is `sandbox/<name>/<date>` in every repository: a re-run the same day replaces it rather
than adding another, and skips the repositories that already succeeded that day (unless forced). The
summary (JSON and Markdown) is kept per sweep and day in the state directory, and beside it the day's spend
ledger: every invocation of the day spends from the same budget, so a rerun continues with what is left.
The repositories take turns: each day's order starts with the first that got no turn the day before.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import threading
import time
from collections.abc import Iterator
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
from agent_sandbox.run.runner import DailyBudgetSpent, run_task
from agent_sandbox.run.spec import RunSummary, Status
from agent_sandbox.run.supervisor import BudgetGuard, Supervisor
from agent_sandbox.sidecar.script import ScriptError, load_script

log = logging.getLogger(__name__)

RowStatus = Literal["succeeded", "no_changes", "failed", "killed", "skipped"]
DAY_BUDGET_LABEL = "day's sweep budget"
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
    """Model spend for the sweep's name per UTC day, shared by every invocation of that day: once spent, no
    run starts and running ones are stopped, and a rerun the same day starts nothing. (The policy's per-run
    budget still applies to each run.)"""
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
    """The sweep's budget for the day, shared by all of the day's invocations."""
    spent_usd: float
    """Spent by this invocation's runs."""
    day_spent_usd: float = 0.0
    """Spent by all of the day's invocations, this one included (from the day's spend ledger)."""
    rotation_start: str | None = None
    """The repository the day's rotation starts with: the first that got no turn the day before. The same for
    every invocation of the day."""
    order: list[str] = Field(default_factory=list)
    """The order this invocation took the repositories in: those not tried yet today, then those that failed
    earlier today, then those already done, each in the day's rotation."""
    stopped: str | None = None
    """Why runs were stopped or not started, if they were."""
    rows: list[SweepRow]
    """One per repository, in manifest order."""
    exit_code: int
    """0 when every repository succeeded or needed no change."""


class SweepBudgetSpent(SandboxError):
    """The sweep's budget for the day is already spent: the invocation starts nothing."""

    exit_code = ExitCode.BUDGET


class SpendEntry(BaseModel):
    """What one invocation of a sweep spent."""

    model_config = ConfigDict(extra="forbid")

    started_at: float
    """When the invocation started (Unix time)."""
    spent_usd: float = 0.0
    """What its runs spent so far (updated while they run)."""


class DayLedger(BaseModel):
    """What a sweep's invocations spent on one UTC day. Kept beside the day's summary and written while runs
    go, so that a rerun the same day, also after a crash, spends only what is left of the day's budget."""

    model_config = ConfigDict(extra="forbid")

    invocations: list[SpendEntry] = Field(default_factory=list)
    """One per invocation of the day that started a run."""

    @property
    def spent_usd(self) -> float:
        return sum(e.spent_usd for e in self.invocations)


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


def ledger_path(name: str, date: str) -> Path:
    return sweep_dir(name) / f"{date}.spend.json"


def load_ledger(name: str, date: str, today: SweepSummary | None) -> DayLedger:
    """The day's spend ledger. A day summarised before ledgers existed counts what its summary says."""
    path = ledger_path(name, date)
    if path.is_file():
        try:
            return DayLedger.model_validate_json(path.read_text())
        except ValueError:
            # Never spend a day's budget twice over a damaged file: the summary's figure is the floor.
            log.warning("sweep_ledger_unreadable path=%s", path)
    if today is None:
        return DayLedger()
    return DayLedger(
        invocations=[SpendEntry(started_at=today.started_at, spent_usd=max(today.day_spent_usd, today.spent_usd))]
    )


def _write_ledger(name: str, date: str, ledger: DayLedger) -> None:
    path = ledger_path(name, date)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(ledger.model_dump_json(indent=2))
    tmp.replace(path)


def _previous_summary(name: str, date: str) -> SweepSummary | None:
    """The summary of the last day before `date` on which the sweep ran."""
    days = sorted((p.stem for p in sweep_dir(name).glob("????-??-??.json") if p.stem < date), reverse=True)
    for day in days:
        try:
            return load_summary(name, day)
        except ValueError:
            log.warning("sweep_summary_unreadable name=%s date=%s", name, day)
    return None


def rotation_start(paths: list[str], today: SweepSummary | None, before: SweepSummary | None) -> int:
    """Where the day's rotation of the repositories starts (an index into `paths`, the manifest's order).

    Every invocation of a day uses the day's first choice. A new day starts at the first repository of the
    previous day's rotation that got no turn that day (its row was skipped, or it is new), so that a budget that
    covers only some reaches every one in turn; when all had a turn, one further along, so that the order
    still moves."""
    if today is not None and today.rotation_start in paths:
        return paths.index(today.rotation_start)
    if before is None:
        return 0
    start = paths.index(before.rotation_start) if before.rotation_start in paths else 0
    had_turn = {r.repo for r in before.rows if r.status != "skipped"}
    for i in range(len(paths)):
        j = (start + i) % len(paths)
        if paths[j] not in had_turn:
            return j
    return (start + 1) % len(paths)


def _row(repo: str, s: RunSummary) -> SweepRow:
    status: RowStatus = "no_changes" if s.status == Status.SUCCEEDED and not s.branch else ROW_STATUS[s.status]
    reason: str | None = s.reason
    message = s.message
    if s.exit_code == int(ExitCode.HANDOFF):
        # The work is there but nobody was asked to review it: the push or the pull request failed. The row is
        # not done, so the next invocation the same day runs it again.
        status, reason, message = "failed", "push", s.push_error or s.message
    return SweepRow(
        repo=repo,
        status=status,
        reason=reason,
        message=message,
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
    manifest_path: str,
    force: bool = False,
    reporter: Reporter | None = None,
    backend: Backend | None = None,
    day: dt.date | None = None,
) -> SweepSummary:
    """Run the manifest's repositories (those not done today, unless force) under what is left of the sweep's
    budget for the day, in the day's rotation; a run's failure is its row's, never the sweep's.

    SweepBudgetSpent (or the host's DailyBudgetSpent) when the budget leaves nothing: nothing starts and the
    day's summary stays as it was. backend: as for run_task; day: the UTC day (today), for tests."""
    m = load_manifest(manifest_path)
    with _one_at_a_time(m.name, reporter):
        return _sweep(m, manifest_path, force, reporter, backend, day)


@contextlib.contextmanager
def _one_at_a_time(name: str, reporter: Reporter | None) -> Iterator[None]:
    """Hold the sweep's lock: two invocations of one sweep at once would each spend the whole of what is left
    of the day's budget and run the same repositories on the same branch. A second one waits for the first to
    end, then continues where the day stands."""
    d = sweep_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    with (d / ".lock").open("a") as f:
        waiting = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    log.info("sweep_waiting name=%s reason=another invocation of the sweep is running", name)
                    if reporter is not None:
                        reporter.phase("sweep", f"waiting for the other invocation of {name} to end")
                interrupts.checkpoint()  # a signal while waiting ends the wait: nothing has started
                time.sleep(0.25)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sweep(
    m: SweepManifest,
    manifest_path: str,
    force: bool,
    reporter: Reporter | None,
    backend: Backend | None,
    day: dt.date | None,
) -> SweepSummary:
    date = (day or dt.datetime.now(dt.UTC).date()).isoformat()
    branch = f"sandbox/{m.name}/{date}"
    today = load_summary(m.name, date)
    earlier = {r.repo: r for r in today.rows} if today else {}
    paths = [r.path for r in m.repos]
    start = rotation_start(paths, today, None if today else _previous_summary(m.name, date))
    ring = paths[start:] + paths[:start]
    # Who has not had a turn today goes first, then the retries of today's failures: a repository that keeps
    # failing does not take the budget from those still waiting.
    fresh = [p for p in ring if p not in earlier or earlier[p].status == "skipped"]
    retry = [p for p in ring if p in earlier and earlier[p].status != "skipped" and not earlier[p].done]
    done = [p for p in ring if p in earlier and earlier[p].done]
    order = fresh + retry + done
    log.info("sweep_order name=%s date=%s rotation_start=%s order=%s", m.name, date, paths[start], ",".join(order))
    to_run = order if force else fresh + retry

    ledger = load_ledger(m.name, date, today)
    before = ledger.spent_usd
    if m.budget_usd is not None and to_run and before >= m.budget_usd:
        log.info(
            "sweep_budget_spent name=%s date=%s budget_usd=%.2f spent_usd=%.4f", m.name, date, m.budget_usd, before
        )
        raise SweepBudgetSpent(
            f"the sweep {m.name}'s budget of ${m.budget_usd:.2f} for {date} (UTC) is spent (${before:.4f}); "
            "nothing started before the next UTC day",
            hint="raise budget_usd in the manifest to allow more today",
        )
    guard = BudgetGuard(m.budget_usd, DAY_BUDGET_LABEL, spent_usd=before) if m.budget_usd else None
    if guard is not None:
        log.info(
            "sweep_budget name=%s date=%s budget_usd=%.2f spent_earlier_usd=%.4f remaining_usd=%.4f",
            m.name,
            date,
            m.budget_usd,
            before,
            guard.remaining(),
        )
    running: dict[str, Supervisor] = {}
    lock = threading.Lock()
    stopped: list[str] = []
    host_spent: list[DailyBudgetSpent] = []
    started_runs: list[str] = []
    finished_costs: list[float] = []
    started = time.time()
    entry = SpendEntry(started_at=started)

    def skip(r: SweepRepo, reason: str, message: str) -> SweepRow:
        prev = earlier.get(r.path)
        log.info("sweep_skip name=%s repo=%s reason=%s", m.name, r.path, reason)
        if prev is not None and prev.status != "skipped":
            # Its turn today came earlier: what it did then says more than "not started".
            return prev.model_copy(update={"earlier": True})
        return SweepRow(repo=r.path, status="skipped", reason=reason, message=message)

    def one(r: SweepRepo) -> SweepRow:
        prev = earlier.get(r.path)
        if prev is not None and prev.done and not force:
            return prev.model_copy(update={"earlier": True})
        if guard is not None and guard.exhausted:
            return skip(r, "budget", f"not started: the {DAY_BUDGET_LABEL} of ${m.budget_usd:.2f} is spent")
        if host_spent:
            return skip(r, "daily_budget", "not started: " + host_spent[0].message)
        if stopped:
            return skip(r, "interrupted", "not started: " + stopped[0])
        req = m.entry_request(r, branch)

        def register(sup: Supervisor) -> None:
            with lock:
                running[r.path] = sup
                started_runs.append(r.path)

        try:
            name = Path(r.path).name
            rep = PrefixReporter(reporter, name) if reporter is not None else None
            s = run_task(req, reporter=rep, budget_guard=guard, on_start=register, backend=backend)
        except Interrupted as exc:
            return skip(r, "interrupted", "not started: " + exc.message)
        except DailyBudgetSpent as exc:
            host_spent.append(exc)
            return skip(r, "daily_budget", "not started: " + exc.message)
        except SandboxError as exc:
            return SweepRow(repo=r.path, status="failed", reason="error", message=exc.message)
        except Exception as exc:  # one repository's crash must not take the sweep down with it
            log.exception("sweep_run_crashed repo=%s", r.path)
            return SweepRow(repo=r.path, status="failed", reason="error", message=f"{type(exc).__name__}: {exc}")
        finally:
            with lock:
                running.pop(r.path, None)
        finished_costs.append(s.cost_usd)
        return _row(r.path, s)

    def spent_now() -> float:
        # The shared ledger also holds what runs still in flight spent; the rows alone, without a budget.
        own = sum(finished_costs)
        return max(own, guard.spent_usd - before) if guard is not None else own

    def book(spent: float) -> None:
        entry.spent_usd = spent
        if not any(e is entry for e in ledger.invocations):
            ledger.invocations.append(entry)
        _write_ledger(m.name, date, ledger)

    def book_progress() -> None:
        # Written as the spend grows, so that a sweep killed outright still leaves the day's spend behind.
        spent = spent_now()
        if started_runs and spent != entry.spent_usd:
            book(spent)

    def interrupted(name: str) -> None:
        # The running runs get the signal themselves (interrupts.py): they stop their agents and bring their
        # work home. No further run starts.
        stopped.append(f"the sweep was interrupted ({name})")

    by_path = {r.path: r for r in m.repos}
    results: dict[str, SweepRow] = {}
    with (
        interrupts.delivered_to(interrupted),
        ThreadPoolExecutor(max_workers=m.concurrency, thread_name_prefix="sweep") as pool,
    ):
        futures = {p: pool.submit(one, by_path[p]) for p in order}
        try:
            for p, f in futures.items():
                while True:
                    try:
                        results[p] = f.result(timeout=0.5)
                        break
                    except TimeoutError:
                        book_progress()
                        continue
        except KeyboardInterrupt:  # signals not taken over (a library caller): stop the runs from here
            stopped.append("the sweep was interrupted")
            with lock:
                for sup in running.values():
                    sup.cancel("interrupted", "the sweep was interrupted")
            results = {p: f.result() for p, f in futures.items()}
    if started_runs:
        book(spent_now())  # also when nothing was spent: the invocation is on the day's record
    elif host_spent:
        # Nothing could start: the host's day is over, and the day's summary stays as it was.
        log.info("sweep_host_budget_spent name=%s date=%s", m.name, date)
        raise host_spent[0]
    rows = [results[p] for p in paths]
    why = stopped[0] if stopped else None
    if guard is not None and guard.exhausted:
        why = (
            f"the {DAY_BUDGET_LABEL} of ${m.budget_usd:.2f} was spent (${guard.spent_usd:.4f} on {date}): "
            "no further runs started, running ones stopped"
        )
    elif host_spent:
        why = host_spent[0].message
    failed = [r for r in rows if not r.done]
    code = ExitCode.INTERRUPTED if stopped else (ExitCode.SWEEP_INCOMPLETE if failed else ExitCode.OK)
    summary = SweepSummary(
        name=m.name,
        date=date,
        manifest=str(Path(manifest_path).resolve()),
        started_at=started,
        ended_at=time.time(),
        budget_usd=m.budget_usd,
        spent_usd=entry.spent_usd,
        day_spent_usd=ledger.spent_usd,
        rotation_start=paths[start],
        order=order,
        stopped=why,
        rows=rows,
        exit_code=int(code),
    )
    write_summary(summary)
    log.info(
        "sweep_done name=%s date=%s rows=%d failed=%d spent_usd=%.4f day_spent_usd=%.4f exit_code=%d",
        m.name,
        date,
        len(rows),
        len(failed),
        summary.spent_usd,
        summary.day_spent_usd,
        summary.exit_code,
    )
    return summary


def render(s: SweepSummary) -> str:
    lines = [
        f"# Sweep {s.name}, {s.date}",
        "",
        f"{sum(r.done for r in s.rows)} of {len(s.rows)} repositories done; "
        f"spent ${s.spent_usd:.4f}"
        + (f", ${s.day_spent_usd:.4f} today" if s.day_spent_usd > s.spent_usd else "")
        + (f" of the day's ${s.budget_usd:.2f}" if s.budget_usd else "")
        + ".",
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
