"""From command-line options to a finished run: validate everything first, create things second."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from .backend.docker import DockerBackend
from .checkout import open_repo, resolve_commit
from .errors import ExitCode, SandboxError, UsageError
from .handoff import GITHUB_REPO_ENV, github_slug, remote_url
from .images import require_images
from .paths import runs_dir
from .policy import load_policy
from .script import ScriptError, load_script
from .settings import load_settings
from .spec import RunSpec, RunSummary
from .store import RunStore
from .supervisor import API_KEY_ENV, Reporter, Supervisor


class DailyBudgetSpent(SandboxError):
    """The host's daily budget leaves nothing for another run."""

    exit_code = ExitCode.BUDGET


def default_pr_base(host: object, base: str) -> str:
    """The branch a pull request targets: --base when it names a branch, else the checked-out branch."""
    import git

    from .checkout import HostRepo

    assert isinstance(host, HostRepo)
    g = git.Git(host.path)
    for candidate in (base, "HEAD"):
        try:
            return g.rev_parse("--abbrev-ref", "--verify", "--end-of-options", candidate)
        except git.GitCommandError:
            continue
    return "main"


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs on one host."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def run_task(*, repo: str, task: str | None, policy: str = "default", model: str | None = None,
             model_script: str | None = None, base: str = "HEAD", keep: bool = False,
             timeout: int | None = None, idle_timeout: int | None = None, budget_usd: float | None = None,
             max_turns: int | None = None, push: bool = False, remote: str = "origin", open_pr: bool = False,
             pr_base: str | None = None, reporter: Reporter | None = None) -> RunSummary:
    # 1. Inputs: each check is free of side effects, so bad input leaves nothing behind.
    if task is None or not task.strip():
        raise UsageError("a task is required: pass --task TEXT")
    host = open_repo(repo)
    pol, source = load_policy(policy)
    overrides = {k: v for k, v in {"wall_seconds": timeout, "idle_seconds": idle_timeout,
                                   "budget_usd": budget_usd, "max_turns": max_turns}.items() if v is not None}
    if overrides:
        try:
            limits = pol.limits.model_validate({**pol.limits.model_dump(), **overrides})
        except ValueError as exc:
            raise UsageError(f"bad limit: {exc}") from None
        pol = pol.model_copy(update={"limits": limits})
    script_path = None
    if model_script:
        try:
            load_script(model_script)
        except ScriptError as exc:
            raise UsageError(str(exc)) from None
        script_path = str(Path(model_script).resolve())
    api_key = os.environ.get(API_KEY_ENV) or None
    if script_path is None and api_key is None:
        raise UsageError(f"no model API key: set {API_KEY_ENV} on the host (it is given to the sidecar only), "
                         "or pass --model-script FILE to use the scripted model")
    base_commit = resolve_commit(host, base)
    push = push or open_pr or pol.git.push
    pr_repo = None
    if push and remote_url(host, remote) is None:
        raise UsageError(f"no remote {remote!r} in {host.path} to push to", hint="pass --remote NAME")
    if open_pr:
        if not os.environ.get("GITHUB_TOKEN"):
            raise UsageError("--open-pr needs a GitHub token in GITHUB_TOKEN (it stays on the host)")
        pr_repo = os.environ.get(GITHUB_REPO_ENV) or github_slug(remote_url(host, remote))
        if not pr_repo:
            raise UsageError(f"cannot tell the GitHub repository from remote {remote!r}",
                             hint=f"set {GITHUB_REPO_ENV}=owner/name")
    settings = load_settings()
    store = RunStore()
    remaining = None
    if settings.daily_budget_usd is not None:
        spent = store.spent_on()
        remaining = settings.daily_budget_usd - spent
        if remaining <= 0:
            raise DailyBudgetSpent(
                f"the host's daily model budget of ${settings.daily_budget_usd:.2f} is spent "
                f"(${spent:.4f} today, UTC); no new run starts before tomorrow",
                hint="raise SANDBOX_DAILY_BUDGET_USD or daily_budget_usd in the host config to allow more")

    # 2. The machine: Docker answers and the images exist.
    backend = DockerBackend.connect()
    images = require_images(backend.client)

    run_id = new_run_id()
    spec = RunSpec(
        run_id=run_id, repo=str(host.path), base_ref=base, base_commit=base_commit, branch=f"sandbox/{run_id}",
        task=task, policy=pol, policy_source=source, model=model or pol.agent.model, model_script=script_path,
        upstream_url=pol.agent.api_url, keep=keep, run_dir=str(runs_dir() / run_id), daily_remaining_usd=remaining,
        push=push, remote=remote, open_pr=open_pr, pr_repo=pr_repo, pr_base=pr_base or default_pr_base(host, base),
    )
    # 3. Only now is anything created.
    try:
        return Supervisor(spec, host, backend, images, reporter, api_key=api_key, store=store,
                          daily_budget_usd=settings.daily_budget_usd).run()
    finally:
        store.close()
