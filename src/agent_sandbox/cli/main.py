"""The `sandbox` command line."""

from __future__ import annotations

import sys

from agent_sandbox.interrupts import interrupts

RUNNING_COMMANDS = ("run", "demo", "sweep", "gc")


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv[1:] if not a.startswith("-")), None)


# Before anything slow is imported: for the commands that run things, SIGINT, SIGTERM and SIGHUP become
# requests to stop (interrupts.py) from the process's first moments, so a signal at any point ends the run
# cleanly and never halfway through packing or teardown.
if _command(sys.argv) in RUNNING_COMMANDS:
    interrupts.install()

import atexit  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import typing  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import click  # noqa: E402
from click.core import ParameterSource  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from agent_sandbox import __version__  # noqa: E402
from agent_sandbox.audit.redact import visible  # noqa: E402
from agent_sandbox.cli.ui import reporter_for  # noqa: E402
from agent_sandbox.errors import EnvironmentNotReady, ExitCode, SandboxError, UsageError  # noqa: E402
from agent_sandbox.run.request import RunRequest  # noqa: E402
from agent_sandbox.run.spec import RunSummary  # noqa: E402


def _consoles() -> tuple[Console, Console]:
    # Off a terminal (CI, pipes, cron) rich would assume 80 columns and truncate tables; logs are wider.
    return (
        Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200),
        Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200),
    )


err, out = _consoles()


def renew_consoles() -> None:
    """Consoles for the standard streams as they are now (a daemon's run gets its client's: cli/daemon.py)."""
    global err, out
    err, out = _consoles()


def entry() -> NoReturn:
    """The `sandbox` command: main(), then an exit that skips the interpreter's teardown of every module, which
    takes a tenth to a quarter of a second once the work is done."""
    os._exit(exit_code())


def exit_code(prog_name: str | None = None) -> int:
    """main()'s exit code, with what of the interpreter's teardown matters done: threads that are no daemons
    joined, atexit handlers run (logging's among them), the streams flushed. prog_name: the command's name in
    help and usage errors (click's guess otherwise; a daemon's run process would be named for the daemon)."""
    try:
        main(prog_name=prog_name)
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _fail(exc: SandboxError) -> NoReturn:
    err.print(f"[bold red]error:[/bold red] {exc.message}", markup=True, highlight=False)
    if exc.hint:
        err.print(f"[dim]hint:[/dim] {exc.hint}")
    sys.exit(int(exc.exit_code))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sandbox")
@click.option("-v", "--verbose", is_flag=True, help="Log decisions (one structured line each) on stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Run coding agents unattended inside locked-down containers."""
    if ctx.invoked_subcommand in RUNNING_COMMANDS:
        interrupts.install()  # done at import already when the command line said so; this covers main([...])
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _v(text: Any) -> str:
    """Text that came from the agent (or passed through it), for a rich line with markup: control
    characters shown escaped, one line, and no markup of its own."""
    return escape(visible(str(text), oneline=True))


def _plain(text: Any) -> str:
    """The same, for a line printed without markup."""
    return visible(str(text), oneline=True)


def _print_summary(s: RunSummary, as_json: bool) -> None:
    if as_json:
        click.echo(s.model_dump_json())
        return
    colour = {"succeeded": "green", "killed": "yellow", "failed": "red"}[s.status]
    out.print(f"\n[bold {colour}]{s.status}[/bold {colour}] ({s.reason}) in {s.duration_s:.1f}s: {_v(s.message)}")
    if s.branch:
        out.print(f"  branch   {s.branch}  ({len(s.commits)} commit(s), {len(s.files_changed)} file(s))")
        out.print(f"  review   git -C {s.repo} diff {s.base_commit[:12]}..{s.branch}")
    else:
        out.print("  branch   none: the agent changed nothing")
    if s.follow_up:
        out.print(f"  follow-up of {_v(s.follow_up)}")
    for w in s.warnings:
        out.print(f"  [yellow]warning[/yellow]  {_v(w)}")
    for v in s.violations:
        out.print(f"  [red]policy[/red]   {_v(v.rule)}: {_v(v.detail)}")
        if v.hint:
            out.print(f"           what to do: {_plain(v.hint)}", markup=False)
    if s.pushed:
        out.print(f"  pushed   to {s.remote}" + (f"; pull request {s.pr_url}" if s.pr_url else ""))
    elif s.push_error:
        out.print(f"  [yellow]not pushed[/yellow] {_v(s.push_error)}")
    out.print(f"  cost     ${s.cost_usd:.4f} over {s.model_calls} model call(s), {s.turns} turn(s)")
    _print_egress(s)
    out.print(f"  run dir  {s.run_dir}")


def _print_egress(s: RunSummary) -> None:
    """Denied and would-be-denied hosts with their reasons, and the policy entries that would allow them."""
    if not (s.egress_denied or s.egress_would_deny):
        return
    counts = f"{s.egress_allowed} allowed, {s.egress_denied} denied"
    if s.egress_would_deny:
        counts += f", {s.egress_would_deny} would be denied (report mode)"
    out.print(f"  egress   {counts} connection(s)", markup=False)
    for label, hosts in (("denied", s.egress_hosts_denied), ("would deny", s.egress_hosts_would_deny)):
        for h in hosts[:10]:
            out.print(_plain(f"    {label:<10} {h.where} ({h.connections}): {'; '.join(h.reasons)}"), markup=False)
        if len(hosts) > 10:
            out.print(f"    ... and {len(hosts) - 10} more {label} (see the report)", markup=False)
    if not s.egress_suggestion.empty:
        if s.egress_would_deny:
            out.print("  to allow them in enforce mode, add to the policy:")
        else:
            out.print("  the policy would need these entries to allow the denied hosts:")
        for line in s.egress_suggestion.yaml().splitlines():
            out.print(_plain(f"    {line}"), markup=False)


def _request_option(name: str, **kw: Any) -> Any:
    """The `sandbox run` option for the RunRequest field `name`: `--name-with-dashes`, with the field's type,
    default and docstring (as its help), so that an option and its field cannot drift apart."""
    field = RunRequest.model_fields[name]
    kw.setdefault("help", field.description)
    if field.is_required():
        kw["required"] = True
    else:
        kw["default"] = field.default
        kw["show_default"] = field.default not in (None, False)
    if field.annotation is bool:
        kw["is_flag"] = True
    scalars = [t for t in typing.get_args(field.annotation) or (field.annotation,) if t in (int, float)]
    if scalars and "type" not in kw:
        kw["type"] = scalars[0]
    return click.option("--" + name.replace("_", "-"), name, **kw)


# `sandbox run`'s options: one per RunRequest field (not every field is an option: a sweep sets the branch,
# a webhook the ticket's text).
_RUN_OPTIONS = [
    _request_option("task"),
    _request_option("ticket", type=click.Path(dir_okay=False)),
    _request_option("repo", type=click.Path(file_okay=False)),
    _request_option("policy"),
    _request_option("model"),
    _request_option("model_script", type=click.Path(dir_okay=False)),
    _request_option("base"),
    _request_option("timeout"),
    _request_option("idle_timeout"),
    _request_option("budget_usd"),
    _request_option("max_turns"),
    _request_option("keep"),
    _request_option("pre"),
    _request_option("check"),
    _request_option("push"),
    _request_option("remote"),
    _request_option("open_pr"),
    _request_option("pr_base"),
    _request_option("follow_up", metavar="RUN_ID"),
    _request_option("backend", type=click.Choice(["docker", "kubernetes"])),
    _request_option("kube_context"),
    _request_option("namespace"),
    _request_option("render", type=click.Path(file_okay=False), metavar="DIR"),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout."),
]


def _run_options(f: Any) -> Any:
    for opt in reversed(_RUN_OPTIONS):
        f = opt(f)
    return f


def _request(options: dict[str, Any]) -> RunRequest:
    """The run request from `sandbox run`'s options; a value the model refuses is a usage error naming the
    option."""
    from pydantic import ValidationError

    try:
        return RunRequest(**options)
    except ValidationError as exc:
        lines = [f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        raise UsageError("\n".join(lines)) from None


class _Rendered(Exception):
    """The run's objects are written: the run stops before anything is made."""


def _render(request: RunRequest, config: Any, directory: str) -> list[str]:
    """The run's objects as the Kubernetes backend would make them, resolved by the real run's checks."""
    from pathlib import Path

    from agent_sandbox.backend.kubernetes import render
    from agent_sandbox.backend.plan import SIDECAR_NAME
    from agent_sandbox.run.runner import run_task
    from agent_sandbox.run.workloads import DEADLINE_MARGIN, FINALISER_TIMEOUT
    from agent_sandbox.sidecar.config import SidecarConfig

    written: list[str] = []

    def capture(sup: Any) -> None:
        spec, recipes = sup.spec, sup.recipes
        # The sidecar's configuration as far as it shapes its objects (the supervisor adds run-time paths).
        sidecar = SidecarConfig(
            run_id=spec.run_id,
            upstream_url=spec.upstream_url,
            budget_usd=spec.policy.limits.budget_usd,
            prices=spec.policy.pricing,
            egress=spec.policy.egress,
            gateway_name=SIDECAR_NAME,
        )
        workloads = [
            recipes.sidecar(sidecar, sup.api_key, []),
            recipes.agent(spec.policy.limits.wall_seconds + DEADLINE_MARGIN),
            recipes.finaliser("completed", FINALISER_TIMEOUT + DEADLINE_MARGIN),
        ]
        if spec.check:
            workloads.append(recipes.check(spec.base_commit, 900))
        paths = render.write(Path(directory), spec.run_id, sup.handle.plan.owner, workloads, config, spec.policy.egress)
        written.extend(map(str, paths))
        raise _Rendered

    with contextlib.suppress(_Rendered):
        run_task(request, on_start=capture, backend=render.render_backend(config))
    return written


@main.command()
@_run_options
def run(as_json: bool, **options: Any) -> None:
    """Run one task on a repository inside a fresh sandbox; the work lands on branch sandbox/<run-id>."""
    from agent_sandbox.config.backends import KubernetesConfig
    from agent_sandbox.config.settings import load_settings
    from agent_sandbox.run.runner import run_task

    # Only what the operator typed reaches the request: a follow-up inherits the earlier run's policy unless
    # --policy was given, which its default value alone cannot tell.
    ctx = click.get_current_context()
    options = {k: v for k, v in options.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    try:
        request = _request(options)
        if request.render is not None:
            config = request.backend_config(load_settings().backend)
            assert isinstance(config, KubernetesConfig)  # backend_config refuses --render otherwise
            for path in _render(request, config, request.render):
                out.print(path, markup=False, highlight=False)
            return
        # run_task connects to the backend the host settings name, with the request's overrides.
        summary = run_task(request, reporter=reporter_for(err))
    except SandboxError as exc:
        _fail(exc)
    # The terminal may be gone (an ssh drop): the run is over all the same, and exits with its own code.
    with contextlib.suppress(OSError, SystemExit):
        _print_summary(summary, as_json)
    sys.exit(summary.exit_code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@click.option("--keep", is_flag=True, help="Keep the workspace checkout in the run directory.")
def demo(as_json: bool, keep: bool) -> None:
    """A full sandboxed run, no API key needed: the scripted agent fixes a failing test in a throwaway repo."""
    import git

    from agent_sandbox.cli.demo import TASK, make_demo_repo
    from agent_sandbox.paths import state_dir
    from agent_sandbox.run.runner import run_task

    repo, script = make_demo_repo(state_dir() / "demo")
    err.print(f"demo repository: {repo}")
    try:
        summary = run_task(
            RunRequest(repo=str(repo), task=TASK, model_script=str(script), keep=keep), reporter=reporter_for(err)
        )
    except SandboxError as exc:
        _fail(exc)
    _print_summary(summary, as_json)
    if summary.branch and not as_json:
        diff = git.Git(repo).diff(f"{summary.base_commit}..{summary.branch}")
        out.print(f"\n[bold]git diff {summary.base_commit[:12]}..{summary.branch}[/bold]")
        out.print(diff, markup=False)
    sys.exit(summary.exit_code)


def _load_run(run_id: str) -> tuple[Any, Any]:
    """The spec and summary of a finished run, or a clear error."""
    from agent_sandbox.errors import UsageError
    from agent_sandbox.fleet.views import resolve_run
    from agent_sandbox.run.spec import RunSpec

    try:
        d = resolve_run(run_id)
    except SandboxError as exc:
        _fail(exc)
    if not (d / "summary.json").is_file():
        _fail(UsageError(f"run {run_id} has not finished (or its supervisor died: see `sandbox gc`)"))
    return RunSpec.model_validate_json((d / "spec.json").read_text()), RunSummary.model_validate_json(
        (d / "summary.json").read_text()
    )


@main.command()
@click.argument("run_id")
@click.option("--remote", default=None, help="Push to this remote instead of the run's.")
@click.option("--json", "as_json", is_flag=True)
def push(run_id: str, remote: str | None, as_json: bool) -> None:
    """Push a finished run's branch for review (e.g. after a failed push), and open or update its pull request
    when the run asked for one and does not have it yet."""
    import os
    from pathlib import Path

    from agent_sandbox.audit.redact import Redactor
    from agent_sandbox.errors import UsageError
    from agent_sandbox.git.checkout import branch_exists, open_repo
    from agent_sandbox.git.handoff import HandoffError, push_branch, remote_url
    from agent_sandbox.run import report
    from agent_sandbox.run.finish import hand_off_pull_request
    from agent_sandbox.store import RunStore

    spec, s = _load_run(run_id)
    if s.violations:
        refused = SandboxError(
            f"run {run_id} broke the policy's git rules; its branch is not pushed",
            hint="; ".join(v.detail for v in s.violations),
        )
        refused.exit_code = ExitCode.POLICY
        _fail(refused)
    if not s.branch:
        _fail(UsageError(f"run {run_id} has no branch: the agent changed nothing"))
    # The pull request is retried only where it is missing: one the run opened needs nothing from us.
    want_pr = spec.open_pr and not s.pr_url
    token = os.environ.get("GITHUB_TOKEN") if want_pr else None
    if want_pr and not (token and spec.pr_repo):
        _fail(
            UsageError(
                f"run {run_id} asked for a pull request: set GITHUB_TOKEN to open it"
                if spec.pr_repo
                else f"run {run_id} asked for a pull request but has no GitHub repository to open it on",
                hint="the pull request is opened with the host's GITHUB_TOKEN, never inside the sandbox",
            )
        )
    run_dir = Path(s.run_dir)

    def save() -> None:
        # summary.json and report.md say what was pushed and opened; `sandbox show` and sweeps read them.
        (run_dir / "summary.json").write_text(s.model_dump_json(indent=2))
        report.write(run_dir, s)

    store = RunStore()
    try:
        repo = open_repo(s.repo)
        if not branch_exists(repo, s.branch):
            _fail(UsageError(f"branch {s.branch} no longer exists in {s.repo}"))
        target = remote or s.remote or spec.remote
        push_branch(repo, target, s.branch)
        s.pushed, s.push_error, s.remote = True, None, target
        store.update(run_id, pushed=1)
        if want_pr and token and spec.pr_repo:
            redact = Redactor([token])
            try:
                hand_off_pull_request(spec, s, run_dir, remote_url(repo, target), token, redact)
            except HandoffError as exc:
                # Recorded before failing, so the summary and report say the branch is pushed and what is left.
                s.push_error = f"pushed, but {exc.message}; retry with `sandbox push {run_id}`"
                save()
                raise
    except HandoffError as exc:
        exc.exit_code = ExitCode.HANDOFF
        _fail(exc)
    except SandboxError as exc:
        _fail(exc)
    finally:
        store.close()
    if s.reason == "completed":
        s.exit_code = 0
    save()
    if as_json:
        click.echo(s.model_dump_json())
    else:
        out.print(f"pushed {s.branch} to {target}" + (f"; pull request {s.pr_url}" if want_pr else ""))


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help='{"id": ..., "markdown": ...}')
def report(run_id: str, as_json: bool) -> None:
    """Print a run's Markdown report."""
    from pathlib import Path

    from agent_sandbox.run.report import render

    _spec, s = _load_run(run_id)
    text = render(Path(s.run_dir), s)
    click.echo(json.dumps({"id": s.id, "markdown": text}) if as_json else text)


@main.command("ls")
@click.option("--repo", default=None, help="Only runs on this repository.")
@click.option("--status", type=click.Choice(["running", "succeeded", "failed", "killed"]), default=None)
@click.option("--since", default=None, help="Only runs started since: 30m, 2h, 7d, or an ISO date/time.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON array of runs.")
def ls_cmd(repo: str | None, status: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """List recent runs."""
    import datetime as dt

    from rich.table import Table

    from agent_sandbox.fleet.views import list_runs
    from agent_sandbox.store import RunStore

    store = RunStore()
    try:
        rows = list_runs(store, repo=repo, status=status, since=since, limit=limit)
    except SandboxError as exc:
        _fail(exc)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([r.model_dump() for r in rows]))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("id", "status", "reason", "started (UTC)", "time", "cost", "turns", "files", "denied", "task"):
        table.add_column(col, no_wrap=col != "task", overflow="ellipsis")
    colour = {"succeeded": "green", "killed": "yellow", "failed": "red", "running": "cyan"}
    for r in rows:
        started = dt.datetime.fromtimestamp(r.started_at, dt.UTC).strftime("%m-%d %H:%M")
        table.add_row(
            r.id,
            f"[{colour[r.status]}]{r.status}[/]",
            r.reason or "",
            started,
            f"{r.duration_s:.0f}s" if r.duration_s is not None else "",
            f"${r.cost_usd:.3f}",
            str(r.turns),
            str(r.files_changed),
            str(r.egress_denied),
            _v(r.task),
        )
    out.print(table if rows else "no runs")


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
def show(run_id: str, as_json: bool) -> None:
    """Show one run: what was asked, its limits, the outcome, cost, changes, and hosts allowed and denied."""
    from agent_sandbox.fleet.views import details, resolve_run
    from agent_sandbox.store import RunStore

    store = RunStore()
    try:
        d = details(resolve_run(run_id), store)
    except SandboxError as exc:
        _fail(exc)
    finally:
        store.close()
    if as_json:
        click.echo(d.model_dump_json())
        return
    r, sp, lim = d.run, d.spec, d.spec.policy.limits
    out.print(f"[bold]run {r.id}[/bold]  {r.status} ({r.reason or '-'})  {_v(r.message or '')}")
    out.print(f"  repo      {r.repo} @ {r.base_commit[:12]}  ->  {r.branch or 'no branch'}")
    out.print(f"  task      {_v(r.task)}")
    if sp.follow_up:
        out.print(f"  follow-up of {_v(sp.follow_up)} (on its branch, its task and result as context)")
    out.print(f"  policy    {sp.policy.name} ({sp.policy_source}, sha256 {r.policy_sha256[:16]}), model {sp.model}")
    out.print(
        f"  limits    wall {lim.wall_seconds}s, idle {lim.idle_seconds}s, budget ${lim.budget_usd:.2f}, "
        f"{lim.max_turns} turns, {lim.cpus:g} cpus, {lim.memory} memory, {lim.pids} pids, {lim.disk} disk"
    )
    out.print(
        f"  cost      ${r.cost_usd:.4f}; tokens {r.input_tokens} in, {r.output_tokens} out, "
        f"{r.cache_read_tokens} cache read, {r.cache_write_tokens} cache write; {r.turns} turns"
    )
    if r.duration_s is not None:
        out.print(f"  duration  {r.duration_s:.1f}s")
    if d.limits_hit:
        out.print(f"  limits hit {', '.join(d.limits_hit)}")
    if d.tool_calls:
        out.print("  tools     " + ", ".join(f"{_v(k)} {v}" for k, v in sorted(d.tool_calls.items())))
    if d.summary:
        out.print(
            f"  changes   {len(d.summary.commits)} commit(s), {len(d.summary.files_changed)} file(s): "
            + _plain(", ".join(d.summary.files_changed[:10])),
            markup=False,
        )
        for v in d.summary.violations:
            out.print(f"  [red]violation[/red] {_v(v.rule)}: {_v(v.detail)}")
        out.print(
            f"  pushed    {'yes, to ' + str(d.summary.remote) if d.summary.pushed else 'no'}"
            + (f" ({_plain(d.summary.push_error)})" if d.summary.push_error else ""),
            markup=False,
        )
    out.print(
        "  allowed   " + _plain(", ".join(f"{h} ({n})" for h, n in d.hosts_allowed.items()) or "none"), markup=False
    )
    out.print(
        "  denied    " + _plain(", ".join(f"{h} ({n})" for h, n in d.hosts_denied.items()) or "none"), markup=False
    )
    if d.hosts_would_deny:
        out.print(
            "  would deny " + _plain(", ".join(f"{h} ({n})" for h, n in d.hosts_would_deny.items())) + " (report mode)",
            markup=False,
        )
    out.print(f"  run dir   {r.run_dir}")


@main.command()
@click.argument("run_id")
@click.option("-f", "--follow", is_flag=True, help="Keep following a live run until it ends.")
@click.option("--raw", is_flag=True, help="The audit trail's JSON lines as they are.")
def logs(run_id: str, follow: bool, raw: bool) -> None:
    """Print a run's events as readable lines (or follow a live run)."""
    from agent_sandbox.fleet.views import brief, follow_events, resolve_run

    try:
        run_dir = resolve_run(run_id)
    except SandboxError as exc:
        _fail(exc)
    ended: int | None = None
    try:
        for line in follow_events(run_dir, follow):
            event = json.loads(line)
            if event.get("type") == "run_ended":
                ended = int((event.get("payload") or {}).get("exit_code") or 0)
            # The raw lines are JSON, control characters escaped; readable lines are made so here.
            click.echo(line if raw else _plain(brief(event)))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    if follow:
        # Like `gh run watch --exit-status`: the run's own exit code.
        if ended is None:
            err.print(
                "the run's supervisor is gone and the run never ended; `sandbox gc` recovers it "
                "(its work onto its branch)"
            )
            sys.exit(int(ExitCode.INTERRUPTED))
        sys.exit(ended)


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to a default one:
    `sandbox audit ID` is `sandbox audit show ID`, `sandbox sweep FILE` is `sandbox sweep run FILE`."""

    default = "show"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


class _RunIdGroup(_DefaultGroup):
    default = "show"


class _SweepGroup(_DefaultGroup):
    default = "run"


@main.group(cls=_SweepGroup)
def sweep() -> None:
    """Run one task across many repositories (`sandbox sweep FILE`), or show the latest summary
    (`sandbox sweep status NAME`)."""


@sweep.command("run", hidden=True)
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Run again even where the sweep already succeeded today.")
@click.option("--json", "as_json", is_flag=True, help="Print the sweep summary as JSON.")
def sweep_run(manifest: str, force: bool, as_json: bool) -> None:
    from agent_sandbox.cli.ui import ConsoleReporter
    from agent_sandbox.fleet.sweep import render, run_sweep

    try:
        summary = run_sweep(manifest, force=force, reporter=ConsoleReporter(err))
    except SandboxError as exc:
        _fail(exc)
    click.echo(summary.model_dump_json() if as_json else render(summary))
    sys.exit(summary.exit_code)


@sweep.command("status")
@click.argument("name")
@click.option("--date", default=None, help="A given day (YYYY-MM-DD, UTC) instead of the latest.")
@click.option("--json", "as_json", is_flag=True)
def sweep_status(name: str, date: str | None, as_json: bool) -> None:
    """Show a sweep's latest summary."""
    from agent_sandbox.errors import UsageError
    from agent_sandbox.fleet.sweep import load_summary, render

    s = load_summary(name, date)
    if s is None:
        _fail(UsageError(f"no summary for sweep {name!r}" + (f" on {date}" if date else "")))
    click.echo(s.model_dump_json() if as_json else render(s))


class _ServeGroup(_DefaultGroup):
    default = "start"


@main.group(cls=_ServeGroup)
def serve() -> None:
    """The task service: `sandbox serve --config FILE` (see docs/service.md)."""


# --bind, --port and --concurrency override the ServiceConfig fields of their names, validated as the file's
# values are. (Their help is written here: taking it from the model would import the service, and aiohttp
# with it, for every command.)
@serve.command("start", hidden=True)
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Service config YAML.")
@click.option("--bind", default=None, help="Address to listen on (config: bind; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (config: port; 0 picks a free one).")
@click.option("--concurrency", type=int, default=None, help="Tasks at once (config: concurrency).")
def serve_start(config_path: str, **overrides: Any) -> None:
    import asyncio

    from pydantic import ValidationError

    from agent_sandbox.errors import validation_message
    from agent_sandbox.fleet.service import ServiceConfig, TaskService, load_config

    try:
        cfg = load_config(config_path)
        given = {k: v for k, v in overrides.items() if v is not None}
        if given:  # validated as the file's values are
            cfg = ServiceConfig.model_validate({**cfg.model_dump(), **given})
    except ValidationError as exc:
        _fail(UsageError(validation_message(exc, "options")))
    except SandboxError as exc:
        _fail(exc)

    def ready(actual_port: int, reaped: list[str]) -> None:
        for t in reaped:
            err.print(f"reaped task {t}: it was running when the service stopped")
        # One line a supervisor process (or a test) can wait for.
        click.echo(
            json.dumps({"listening": f"http://{cfg.bind}:{actual_port}", "port": actual_port, "reaped": reaped}),
            err=False,
        )
        sys.stdout.flush()

    # The service's access, decision and task lines are its log (journalctl under systemd): INFO on stderr,
    # whatever -v says; other libraries stay at the level `main` chose.
    logging.getLogger("agent_sandbox").setLevel(logging.INFO)
    interrupts.install()
    try:
        asyncio.run(TaskService(cfg).serve(ready))
    except SandboxError as exc:  # the port is taken: one line and exit 3, no traceback
        _fail(exc)
    sys.exit(int(ExitCode.INTERRUPTED))


@serve.command("hash-token")
@click.argument("token")
def serve_hash_token(token: str) -> None:
    """Print the SHA-256 of a bearer token, for the config's tokens[].sha256."""
    from agent_sandbox.fleet.service import hash_token

    click.echo(hash_token(token))


@main.group(cls=_RunIdGroup)
def audit() -> None:
    """Query a run's audit trail (`sandbox audit ID`) or check its hash chain (`sandbox audit verify ID`)."""


@audit.command("show", hidden=True)
@click.argument("run_id")
@click.option("--type", "types", multiple=True, help="Only events of this type (repeatable).")
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Choice(["supervisor", "agent", "proxy", "gateway"]),
    help="Only from this source.",
)
@click.option("--json", "as_json", is_flag=True, help="Matching events as JSON lines.")
def audit_show(run_id: str, types: tuple[str, ...], sources: tuple[str, ...], as_json: bool) -> None:
    from agent_sandbox.fleet.views import brief, read_events, resolve_run

    try:
        events = read_events(resolve_run(run_id))
    except SandboxError as exc:
        _fail(exc)
    for e in events:
        if (types and e["type"] not in types) or (sources and e["source"] not in sources):
            continue
        click.echo(json.dumps(e, separators=(",", ":")) if as_json else _plain(brief(e)))


@audit.command("verify")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
def audit_verify(run_id: str, as_json: bool) -> None:
    """Check the trail's hash chain; report the first broken line."""
    from agent_sandbox.audit.log import verify
    from agent_sandbox.fleet.views import resolve_run
    from agent_sandbox.run.spec import RunSummary
    from agent_sandbox.store import RunStore

    try:
        run_dir = resolve_run(run_id)
    except SandboxError as exc:
        _fail(exc)
    path = run_dir / "audit.jsonl"
    # The chain head recorded at the end covers the tail; the store's copy survives edits to the run dir.
    store = RunStore()
    row = store.get(run_dir.name)
    store.close()
    head = row.get("audit_head") if row else None
    if head is None and (run_dir / "summary.json").is_file():
        head = RunSummary.model_validate_json((run_dir / "summary.json").read_text()).audit_head
    ok, line, message = verify(path, head)
    if as_json:
        click.echo(
            json.dumps(
                {"ok": ok, "line": line, "message": message, "path": str(path), "head_checked": head is not None}
            )
        )
    else:
        (out if ok else err).print(("ok: " if ok else "BROKEN: ") + message, markup=False)
    sys.exit(0 if ok else int(ExitCode.AUDIT_BROKEN))


@main.command()
@click.option("--dry-run", is_flag=True, help="Show what would be recovered or removed; change nothing.")
@click.option("--json", "as_json", is_flag=True)
def gc(dry_run: bool, as_json: bool) -> None:
    """Recover runs nobody supervises any more: pack and import their work, remove what they left, write
    their summaries. Only this state directory's runs are touched."""
    from agent_sandbox.backend import connect
    from agent_sandbox.config.settings import load_settings
    from agent_sandbox.run.orphans import collect
    from agent_sandbox.store import RunStore

    try:
        backend = connect(load_settings().backend)
        images = None if dry_run else backend.images()
        store = RunStore()
    except SandboxError as exc:
        _fail(exc)
    try:
        results = collect(
            backend,
            store,
            images,
            dry_run=dry_run,
            progress=None if as_json else lambda line: err.print(line, markup=False),
        )
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([r.model_dump() for r in results]))
        return
    if not results:
        out.print("nothing to collect")
    for r in results:
        action = f"would be {r.action}" if r.dry_run else r.action
        objs = f" [{', '.join(r.objects)}]" if r.objects else ""
        branch = f" -> {r.branch}" if r.branch else ""
        out.print(f"{action:<8} {r.run_id}{branch}: {_plain(r.detail)}{objs}", markup=False)
    sys.exit(int(ExitCode.ENVIRONMENT) if any(r.action == "failed" for r in results) else 0)


@main.group()
def policy() -> None:
    """Validate and inspect policies."""


@policy.command("check")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the effective policy as JSON.")
def policy_check(ref: str, as_json: bool) -> None:
    """Validate a policy file (or preset name) and print its effective rules."""
    from agent_sandbox.config.policy import load_policy

    try:
        pol, source = load_policy(ref)
    except SandboxError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps({"source": source, "sha256": pol.digest(), "policy": pol.model_dump(mode="json")}))
        return
    eg, lim = pol.egress, pol.limits
    out.print(f"policy   {pol.name} ({source})  sha256 {pol.digest()[:16]}")
    out.print(f"model    {pol.agent.model}")
    out.print(
        f"limits   wall {lim.wall_seconds}s, idle {lim.idle_seconds}s, budget ${lim.budget_usd:.2f}, "
        f"{lim.max_turns} turns, {lim.cpus:g} cpus, memory {lim.memory}, {lim.pids} pids"
    )
    for line in _describe_egress(eg):
        out.print(line, markup=False)


def _describe_egress(eg: Any) -> list[str]:
    """What a policy's egress section means, in the words `sandbox policy check` prints."""
    from agent_sandbox.sidecar.egress import METADATA, parse_address_entry, parse_rule

    if eg.mode == "report":
        lines = [
            "egress   mode report: connections are allowed and logged; what enforce mode would refuse is "
            "logged as would_deny, with every reason, and the run's report ends with the entries to add; "
            "cloud metadata, loopback and unspecified addresses are refused all the same; "
            "the model gateway is always reachable"
        ]
    else:
        private = "allowed (but not loopback)" if eg.allow_private else "refused"
        lines = [f"egress   mode enforce; private addresses {private}; the model gateway is always reachable"]
    for kind, rules in (("deny", eg.deny), ("allow", eg.allow)):
        for text in rules:
            r = parse_rule(text)
            what = f"subdomains of {r.host}" if r.wildcard else r.host
            lines.append(f"  {kind:<5}  {text:<32} {what}, ports {', '.join(map(str, r.ports))}")
    if not eg.allow:
        lines.append(
            "  (no allow rules: "
            + ("enforce mode would refuse every host)" if eg.mode == "report" else "nothing but the model gateway)")
        )
    refused = "would be refused" if eg.mode == "report" else "are refused"
    if eg.allow_private:
        lines.append(
            "  addresses  allowed names may resolve to private, shared, link-local, unique-local, reserved "
            "and the host's own addresses; loopback (the sidecar itself) only through allow_addresses"
        )
    else:
        lines.append(
            f"  addresses  allowed names {refused} when they resolve to a loopback, private, link-local, "
            "unique-local, reserved or the host's own address, unless allow_addresses covers it"
        )
    for text in eg.allow_addresses:
        e = parse_address_entry(text)
        if e.single:
            note = f"the address {e.network.network_address}"
            if e.network.network_address in METADATA:
                note += " (a cloud metadata address, named exactly)"
        else:
            note = f"the {e.network.num_addresses} addresses of {e.network}"
            if any(m.version == e.network.version and m in e.network for m in METADATA):
                note += " (not the cloud metadata addresses among them)"
        lines.append(f"  allow_addresses  {text:<20} allowed names may resolve to {note}")
    metadata = ", ".join(sorted(map(str, METADATA), key=lambda a: (":" in a, a)))
    verb = refused.removeprefix("are ")
    lines.append(
        f"  metadata   {metadata}: {verb} unless an allow_addresses entry names exactly that address "
        "(never through a range or allow_private)"
    )
    for name, target in eg.hosts.items():
        lines.append(f"  host   {name} -> {target}")
    return lines


@main.group()
def images() -> None:
    """Build and inspect the sandbox's container images."""


@images.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when images with the current inputs exist.")
@click.option(
    "--policy",
    "policy_ref",
    default=None,
    help="Also build this policy's extension of the agent image (its `image:` section).",
)
def images_build(force: bool, policy_ref: str | None) -> None:
    """Build the base, agent and sidecar images (cached by a hash of their inputs)."""
    from agent_sandbox.backend.docker import connect_client
    from agent_sandbox.backend.images import build_all, ensure_policy_image
    from agent_sandbox.config.policy import load_policy

    def progress(line: str) -> None:
        err.print(line, markup=False)

    try:
        pol = load_policy(policy_ref)[0] if policy_ref else None
        client = connect_client()
        tags = build_all(client, progress, force=force)
        if pol is not None:
            tags = ensure_policy_image(client, tags, pol, progress)
    except SandboxError as exc:
        _fail(exc)
    out.print(f"agent    {tags.agent}  (Claude Code {tags.claude_code_version})")
    out.print(f"sidecar  {tags.sidecar}")


@main.group()
def daemon() -> None:
    """The warm daemon: `sandbox run` handed to a process that has everything imported (docs/cli.md)."""


def _daemon_status(status: dict[str, Any] | None, as_json: bool, what: str) -> None:
    from agent_sandbox.cli import daemon as warm

    if as_json:
        click.echo(warm.status_json(status))
    elif status is None:
        out.print("no daemon is running")
    else:
        out.print(f"{what}: {warm.describe(status)}", markup=False, highlight=False)


POOL_OPTION = click.option(
    "--pool",
    type=click.IntRange(0, 16),
    default=1,
    show_default=True,
    help="Runs begun ahead (networks and sidecar up) for runs to take over; 0: none.",
)


@daemon.command("start")
@POOL_OPTION
@click.option("--json", "as_json", is_flag=True)
def daemon_start(pool: int, as_json: bool) -> None:
    """Start the daemon for this state directory (once it answers), unless one runs."""
    from agent_sandbox.cli import daemon as warm
    from agent_sandbox.cli.launch import state_dir

    try:
        status, started = warm.start(state_dir(), pool)
    except (RuntimeError, OSError) as exc:
        _fail(EnvironmentNotReady(str(exc), hint=f"see {state_dir() / warm.LOG_NAME}"))
    _daemon_status(status, as_json, "started" if started else "already running")


@daemon.command("stop")
@click.option("--json", "as_json", is_flag=True)
def daemon_stop(as_json: bool) -> None:
    """Stop the daemon; runs it started go on to their end."""
    from agent_sandbox.cli import daemon as warm
    from agent_sandbox.cli.launch import state_dir

    status = warm.stop(state_dir())
    _daemon_status(status, as_json, "stopped")


@daemon.command("restart")
@POOL_OPTION
@click.option("--json", "as_json", is_flag=True)
def daemon_restart(pool: int, as_json: bool) -> None:
    """Stop the daemon and start it again (after the package changed, for one)."""
    from agent_sandbox.cli import daemon as warm
    from agent_sandbox.cli.launch import state_dir

    warm.stop(state_dir())
    try:
        status, _ = warm.start(state_dir(), pool)
    except (RuntimeError, OSError) as exc:
        _fail(EnvironmentNotReady(str(exc), hint=f"see {state_dir() / warm.LOG_NAME}"))
    _daemon_status(status, as_json, "started")


@daemon.command("status")
@click.option("--json", "as_json", is_flag=True)
def daemon_status(as_json: bool) -> None:
    """Whether a daemon runs for this state directory, and what it has done."""
    from agent_sandbox.cli import daemon as warm
    from agent_sandbox.cli.launch import state_dir

    _daemon_status(warm.ask(state_dir(), {"ping": True}), as_json, "running")


@images.command("ls")
@click.option("--json", "as_json", is_flag=True)
def images_ls(as_json: bool) -> None:
    """Show the image tags the current inputs call for and whether they exist."""
    from agent_sandbox.backend.docker import connect_client
    from agent_sandbox.backend.images import base_tag, expected_tags, image_exists

    try:
        client = connect_client()
        tags = expected_tags(client)
    except SandboxError as exc:
        _fail(exc)
    rows = []
    for role, ref in (("base", base_tag()), ("agent", tags.agent), ("sidecar", tags.sidecar)):
        rows.append({"role": role, "ref": ref, "present": image_exists(client, ref)})
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for r in rows:
            out.print(f"{r['role']:<8} {r['ref']:<40} {'built' if r['present'] else 'MISSING'}")
    sys.exit(0 if all(r["present"] for r in rows) else int(ExitCode.ENVIRONMENT))


if __name__ == "__main__":
    main()
