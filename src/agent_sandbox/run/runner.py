"""From command-line options to a finished run: validate everything first, create things second."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from agent_sandbox.backend import Backend, connect
from agent_sandbox.backend.plan import ImageSet
from agent_sandbox.config.policy import Policy, load_policy
from agent_sandbox.config.settings import load_settings
from agent_sandbox.errors import EnvironmentNotReady, ExitCode, SandboxError, UsageError, disk_full
from agent_sandbox.git.checkout import HostRepo, branch_exists, open_repo, resolve_commit
from agent_sandbox.git.handoff import GITHUB_REPO_ENV, github_slug, remote_url
from agent_sandbox.interrupts import interrupts
from agent_sandbox.paths import runs_dir, state_dir
from agent_sandbox.run import followup, pool, workspace
from agent_sandbox.run.progress import Guarded, Reporter
from agent_sandbox.run.request import LIMIT_OVERRIDES, RunRequest
from agent_sandbox.run.spec import RunSpec, RunSummary
from agent_sandbox.run.supervisor import API_KEY_ENV, BudgetGuard, Supervisor
from agent_sandbox.run.workloads import Users, held_shape
from agent_sandbox.sidecar.script import ScriptError, load_script
from agent_sandbox.store import RunStore

log = logging.getLogger(__name__)

MIN_STATE_FREE = 16 * 1024**2  # room for a run's records (trail, stream, summary) before it starts


class DailyBudgetSpent(SandboxError):
    """The host's daily budget leaves nothing for another run."""

    exit_code = ExitCode.BUDGET


def default_pr_base(host: HostRepo, base: str) -> str:
    """The branch a pull request targets: --base when it names a branch, else the checked-out branch."""
    import git

    g = git.Git(host.path)
    for candidate in (base, "HEAD"):
        try:
            return g.rev_parse("--abbrev-ref", "--verify", "--end-of-options", candidate)
        except git.GitCommandError:
            continue
    return "main"


def check_branch_name(name: str) -> None:
    import git

    try:
        git.Git().check_ref_format("--branch", name)
    except git.GitCommandError:
        raise UsageError(f"{name!r} is not a valid branch name") from None


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs on one host."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _inherits_policy(req: RunRequest, earlier: RunSpec | None) -> bool:
    """A follow-up runs under the earlier run's policy unless its request names one."""
    return earlier is not None and "policy" not in req.model_fields_set


def _effective_policy(req: RunRequest, earlier: RunSpec | None = None) -> tuple[Policy, str]:
    overrides = req.limit_overrides()
    if earlier is not None and _inherits_policy(req, earlier):
        # Loaded again from its source (a fix to the policy since applies), with the earlier run's limits: a
        # follow-up gets the budgets the earlier run had, its own overrides aside.
        ref = earlier.policy_source.removeprefix("preset:")
        try:
            pol, source = load_policy(ref)
        except UsageError as exc:
            raise UsageError(
                f"--follow-up: run {earlier.run_id}'s policy ({earlier.policy_source}): {exc.message}",
                hint="pass --policy NAME|FILE",
            ) from None
        then = earlier.policy.limits
        overrides = {**{key: getattr(then, key) for key in LIMIT_OVERRIDES.values()}, **overrides}
    else:
        pol, source = load_policy(req.policy)
    if overrides:
        try:
            limits = pol.limits.model_validate({**pol.limits.model_dump(), **overrides})
        except ValueError as exc:
            raise UsageError(f"bad limit: {exc}") from None
        pol = pol.model_copy(update={"limits": limits})
    return pol, source


def _script_path(req: RunRequest) -> str | None:
    if not req.model_script:
        return None
    try:
        load_script(req.model_script)
    except ScriptError as exc:
        raise UsageError(str(exc)) from None
    return str(Path(req.model_script).resolve())


def _pr_repo(req: RunRequest, host: HostRepo, push: bool) -> str | None:
    """Check that the push and pull request asked for can happen; the pull request's owner/name."""
    if push and remote_url(host, req.remote) is None:
        raise UsageError(f"no remote {req.remote!r} in {host.path} to push to", hint="pass --remote NAME")
    if not req.open_pr:
        return None
    if not os.environ.get("GITHUB_TOKEN"):
        raise UsageError("--open-pr needs a GitHub token in GITHUB_TOKEN (it stays on the host)")
    slug = os.environ.get(GITHUB_REPO_ENV) or github_slug(remote_url(host, req.remote))
    if not slug:
        raise UsageError(
            f"cannot tell the GitHub repository from remote {req.remote!r}", hint=f"set {GITHUB_REPO_ENV}=owner/name"
        )
    return slug


def _follow_up(req: RunRequest, host: HostRepo) -> followup.FollowUp | None:
    """The earlier run a follow-up continues, checked (followup.resolve), or None for a run of its own. The run
    store, when there is one, says which branches a running run is about to move."""
    if req.follow_up is None:
        return None
    active: dict[str, str] = {}
    path = state_dir() / "runs.sqlite"
    if path.exists():
        store = RunStore(path)
        try:
            for row in store.list_runs(repo=str(host.path), status="running", limit=1000):
                if row.get("branch"):
                    active[row["branch"]] = row["id"]
        finally:
            store.close()
    return followup.resolve(req.follow_up.strip(), host, active)


def _daily_remaining(daily_budget_usd: float | None) -> float | None:
    """What is left of the host's daily budget, or DailyBudgetSpent. Reads the ledger only if it exists."""
    if daily_budget_usd is None:
        return None
    path = state_dir() / "runs.sqlite"
    spent = 0.0
    if path.exists():
        store = RunStore(path)
        try:
            spent = store.spent_on()
        finally:
            store.close()
    remaining = daily_budget_usd - spent
    if remaining <= 0:
        raise DailyBudgetSpent(
            f"the host's daily model budget of ${daily_budget_usd:.2f} is spent "
            f"(${spent:.4f} today, UTC); no new run starts before tomorrow",
            hint="raise SANDBOX_DAILY_BUDGET_USD or daily_budget_usd in the host config to allow more",
        )
    return remaining


def _progress(reporter: Reporter | None, phase: str) -> Callable[[str], None]:
    """A line of progress before the run begins (an image build, a warning), or nothing without a reporter."""
    if reporter is None:
        return lambda line: log.info("%s %s", phase, line)
    return lambda line: reporter.phase(phase, line)


def _dirty_warning(host: HostRepo, base: str, base_commit: str) -> list[str]:
    """Starting from HEAD of a working tree with uncommitted changes: the agent will not see them. Say so."""
    if base != "HEAD" or host.path == host.git_dir:
        return []
    import git

    status = git.Git(host.path).status("--porcelain", "--untracked-files=normal").splitlines()
    if not status:
        return []
    return [
        f"{host.path} has uncommitted changes ({len(status)} path(s)); the sandbox starts from the "
        f"committed HEAD ({base_commit[:12]}) and will not see them: commit them first, or pass --base"
    ]


def run_task(
    req: RunRequest,
    reporter: Reporter | None = None,
    budget_guard: BudgetGuard | None = None,
    on_start: Callable[[Supervisor], None] | None = None,
    backend: Backend | None = None,
) -> RunSummary:
    """Validate the request, then run it. budget_guard adds a spend cap shared with other runs (a sweep's);
    on_start receives the supervisor (to cancel it from another thread); backend replaces the one the host
    settings name (a caller that holds one already, or a test's in-memory backend)."""
    # 1. Inputs: each check is free of side effects, so bad input leaves nothing behind.
    interrupts.checkpoint()
    if reporter is not None:
        reporter = Guarded(reporter)  # a terminal that goes away must not end the run
    task, title = req.task_text()
    req.check_follow_up()
    host = open_repo(req.repo)
    follow = _follow_up(req, host)
    earlier = follow.earlier.spec if follow else None
    pol, source = _effective_policy(req, earlier)
    script_path = _script_path(req)
    api_key = os.environ.get(API_KEY_ENV) or None
    if script_path is None and api_key is None:
        raise UsageError(
            f"no model API key: set {API_KEY_ENV} on the host (it is given to the sidecar only), "
            "or pass --model-script FILE to use the scripted model"
        )
    if follow is not None:
        # The branch's tip, not where the earlier run left it: whatever was added on top since is kept, and the
        # import is a fast-forward of the branch as it is now.
        base_commit, warnings = follow.head, list(follow.warnings)
    else:
        base_commit = resolve_commit(host, req.base)
        warnings = _dirty_warning(host, req.base, base_commit)
    for w in warnings:
        _progress(reporter, "warning")(w)
    if req.branch is not None:
        check_branch_name(req.branch)
        if branch_exists(host, req.branch) and not req.replace_branch:
            raise UsageError(f"branch {req.branch} already exists in {host.path}")
    push = req.push or req.open_pr or pol.git.push
    pr_repo = _pr_repo(req, host, push)
    settings = load_settings()
    remaining = _daily_remaining(settings.daily_budget_usd)

    # 2. The machine: Docker answers, the images exist, the state directory has room.
    interrupts.checkpoint()
    backend = backend or connect(req.backend_config(settings.backend))
    # A policy's extra packages and setup commands: built on first use, then a lookup.
    image_progress = _progress(reporter, "image")

    def building(line: str) -> None:
        interrupts.checkpoint()  # a signal during a long build ends it: nothing of the run exists yet
        image_progress(line)

    images = backend.images(pol, building)
    _check_room()

    # A run begun ahead by the warm pool, where one is kept (fleet/pool.py): its networks and sidecar are up.
    slot = _claim(backend, images, pol, budget_guard)
    run_id = slot.slot.run_id if slot else new_run_id()
    model = req.model or (earlier.model if earlier is not None and _inherits_policy(req, earlier) else None)
    try:
        spec = RunSpec(
            run_id=run_id,
            repo=str(host.path),
            base_ref=follow.branch if follow else req.base,
            base_commit=base_commit,
            # A follow-up lands on the earlier run's branch without replacing it: the import only fast-forwards
            # it, and the push needs no force.
            branch=follow.branch if follow else (req.branch or f"sandbox/{run_id}"),
            replace_branch=req.replace_branch,
            pre=req.pre,
            check=req.check,
            task=followup.task_with_context(task, follow.context) if follow else task,
            follow_up=follow.earlier.run_id if follow else None,
            instruction=task if follow else None,
            policy=pol,
            policy_source=source,
            model=model or pol.agent.model,
            model_script=script_path,
            upstream_url=pol.agent.api_url,
            keep=req.keep,
            run_dir=str(runs_dir() / run_id),
            daily_remaining_usd=remaining,
            push=push,
            remote=req.remote,
            open_pr=req.open_pr,
            pr_repo=pr_repo,
            pr_base=req.pr_base or (earlier.pr_base if earlier else default_pr_base(host, req.base)),
            title=title or (earlier.title if earlier else None),
            warnings=warnings,
        )
        store = open_store()
    except BaseException:
        _give_back(backend, slot)
        raise
    # 3. Runs of this state directory that nobody supervises any more are finished first (cheap when there
    # are none: a look at the store and a lock per unfinished run). Only now is anything created.
    sup: Supervisor | None = None
    try:
        recover_first(backend, store, images, reporter)
        interrupts.checkpoint()
        sup = Supervisor(
            spec,
            host,
            backend,
            images,
            reporter,
            api_key=api_key,
            store=store,
            daily_budget_usd=settings.daily_budget_usd,
            budget_guard=budget_guard,
            slot=slot,
        )
        if on_start is not None:
            on_start(sup)
        return sup.run()
    except BaseException:
        if sup is None:
            _give_back(backend, slot)
        raise
    finally:
        store.close()


def _claim(backend: Backend, images: ImageSet, pol: Policy, budget_guard: BudgetGuard | None) -> pool.Claimed | None:
    """A slot of the warm pool for this run, where one fits: Docker, and no shared budget (whose socket the
    held sidecar does not mount)."""
    if budget_guard is not None or getattr(backend, "name", None) != "docker":
        return None
    if not pool.available():
        return None
    try:
        engine = backend.engine_id()
    except Exception as exc:  # the run finds out about its engine soon enough
        log.info("pool_claim_skipped error=%r", exc)
        return None
    # The pool's agent containers are made for an overlay workspace (its mounts reach them after their start).
    shape = held_shape(images, Users.here(), pol) if workspace.overlay_unavailable() is None else None
    claimed = pool.claim(images.sidecar, pol.egress.hosts, engine, shape)
    if claimed is not None and Path(claimed.slot.run_dir) != runs_dir() / claimed.slot.run_id:
        # Made for another state directory (its keeper's environment said so): not this run's to take.
        _give_back(backend, claimed)
        return None
    return claimed


def _give_back(backend: Backend, slot: pool.Claimed | None) -> None:
    """A slot claimed by a run that then did not start: everything of it goes (its lock last)."""
    if slot is None:
        return
    try:
        backend.attach_run(slot.slot.run_id).teardown()
        workspace.release_run(Path(slot.slot.run_dir))
        shutil.rmtree(slot.slot.run_dir, ignore_errors=True)
    except Exception as exc:  # `sandbox gc` removes it once the lock is free
        log.warning("pool_slot_not_removed run_id=%s error=%r", slot.slot.run_id, exc)
    finally:
        os.close(slot.lock_fd)


def open_store() -> RunStore:
    """The run store, or a clear EnvironmentNotReady when the state directory has no room for it."""
    try:
        return RunStore()
    except (OSError, sqlite3.Error) as exc:
        if disk_full(exc):
            raise EnvironmentNotReady(
                f"the state directory's filesystem is full ({state_dir()}): {exc}",
                hint="free some space, or set SANDBOX_STATE_DIR elsewhere",
            ) from None
        raise


def _check_room() -> None:
    """A run needs some room in the state directory for its records before it starts."""
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < MIN_STATE_FREE:
        raise EnvironmentNotReady(
            f"the state directory's filesystem ({root}) has {free // 1024**2} MiB free; a run needs at least "
            f"{MIN_STATE_FREE // 1024**2} MiB for its records",
            hint="free some space, or set SANDBOX_STATE_DIR",
        )


def recover_first(backend: Backend, store: RunStore, images: ImageSet, reporter: Reporter | None) -> None:
    """Recover this state directory's runs whose supervisor is gone (orphans.py), saying so; never fatal."""
    from agent_sandbox.run.orphans import collect

    try:
        done = collect(backend, store, images, objects=False, progress=_progress(reporter, "recover"))
    except Exception as exc:  # the new run matters more; `sandbox gc` will try again
        log.warning("recover_first_failed error=%r", exc)
        return
    for r in done:
        if r.action in ("recovered", "failed"):
            log.info("recovered_before_run run_id=%s action=%s", r.run_id, r.action)
            _progress(reporter, "recover")(f"{r.run_id}: {r.action}: {r.detail}")
