"""`sandbox serve`: a small HTTP service that takes tasks from people, CI jobs and webhooks.

aiohttp serves it (already the gateway's framework): a handful of JSON endpoints need no more. The queue
lives in the run store, so a restart loses nothing: tasks that were running when the service died are
reaped (their containers removed) and marked failed, and queued ones start again.

GitHub deliveries are handled exactly once: each delivery id is remembered in the store with its answer, only
adding the configured label (or an allowed user's `/sandbox` comment on a run's pull request) starts a task,
and an issue or pull request has at most one task queued or running. The handler decides synchronously after
its last await, on one event loop, so two deliveries never both pass the checks. Every request gets one access
line and every task transition one line on the `agent_sandbox.fleet.service` logger.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema

from agent_sandbox.errors import EnvironmentNotReady, SandboxError, UsageError, validation_message
from agent_sandbox.fleet.views import read_events, resolve_run
from agent_sandbox.git.github import GitHub, GitHubError, api_base_for
from agent_sandbox.interrupts import interrupts
from agent_sandbox.run.request import RunRequest, RunSettings
from agent_sandbox.run.runner import run_task
from agent_sandbox.run.spec import RunSummary
from agent_sandbox.run.ticket import Ticket
from agent_sandbox.store import RunStore, TaskStatus, TaskStore

log = logging.getLogger(__name__)

ISSUE_READ_WAIT = 5.0  # seconds a labelled issue's current state may take to read (retries included)
MAX_BODY = 1024 * 1024
PRINCIPAL = web.RequestKey("principal", str)
"""Who a request came from, for its access line: a token's name, or github for a signed delivery."""
COMMAND = "/sandbox "
DELIVERY_RETENTION_S = 30 * 86400
"""How long a delivery id is remembered: GitHub redelivers only the last few days' deliveries, and every comment
anyone makes on any issue is a delivery, so remembering them all forever is a disk an outsider fills."""
"""A pull request comment starting with this asks for a follow-up run; the rest is the instruction."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TokenConfig(_Model):
    """One client of the service."""

    name: str
    """Who it is, for the audit of who asked for what."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the bearer token (`sandbox serve hash-token` prints it); the token itself is not stored."""
    repos: list[str]
    """Names of the repositories it may start tasks on."""


class RepoConfig(RunSettings):
    """A repository the service may work on, and the run settings of its tasks (`policy` unless a request
    names another of `policies`; push, open_pr, limits, pre, check, ... as `sandbox run` takes them)."""

    path: str
    """Its checkout on this host (relative to the configuration file)."""
    policies: list[str] = Field(default_factory=list)
    """Other policies a request may ask for."""
    github: str | None = None
    """owner/name on GitHub: webhooks for this repository map here."""


class WebhookConfig(_Model):
    """GitHub webhooks: `issues` and `issue_comment` events."""

    secret_env: str = "SANDBOX_WEBHOOK_SECRET"
    """The environment variable holding the webhook secret (HMAC-SHA256, X-Hub-Signature-256)."""
    label: str = "sandbox"
    """Adding this label to an issue makes it a task (the `labeled` event naming it; nothing else does)."""
    followup_users: list[str] = Field(default_factory=list)
    """GitHub logins whose `/sandbox <instruction>` comment on a run's pull request starts a follow-up run on
    its branch; anyone else's comment is ignored."""


class GitHubConfig(_Model):
    """How the service talks back to GitHub: comments on the issues and pull requests its tasks come from."""

    token_env: str = "GITHUB_TOKEN"
    """The environment variable holding the token it comments with; unset or empty: no comments."""
    api_base: str | None = None
    """The REST API base; default $SANDBOX_GITHUB_API, else derived from each repository's remote
    (https://api.github.com, or https://HOST/api/v3 for GitHub Enterprise)."""


class ServiceConfig(_Model):
    """The service's configuration file."""

    bind: str = "127.0.0.1"
    """Address to listen on: localhost unless told otherwise."""
    port: int = Field(default=8765, ge=0, le=65535)
    """Port to listen on (0: any free port, printed at start)."""
    concurrency: int = Field(default=1, ge=1, le=32)
    """Tasks run at once."""
    tokens: list[TokenConfig] = Field(default_factory=list)
    """Clients and what they may use."""
    repos: dict[str, RepoConfig]
    """Repositories by name."""
    webhook: WebhookConfig | None = None
    """GitHub webhooks, if enabled."""
    github: GitHubConfig = Field(default_factory=GitHubConfig)
    """Comments on the issues and pull requests webhook tasks come from."""

    @model_validator(mode="after")
    def _refs(self) -> ServiceConfig:
        for t in self.tokens:
            for r in t.repos:
                if r not in self.repos:
                    raise ValueError(f"token {t.name!r} names unknown repository {r!r}")
        return self


def load_config(path: str) -> ServiceConfig:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
        cfg = ServiceConfig.model_validate(data)
    except OSError as exc:
        raise UsageError(f"cannot read service config {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{p}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise UsageError(validation_message(exc, str(p))) from None
    here = p.resolve().parent
    for name, r in cfg.repos.items():
        for attr in ("path", "model_script"):
            v = getattr(r, attr)
            if v and not Path(v).is_absolute():
                setattr(r, attr, str((here / v).resolve()))
        if not Path(r.path, ".git").exists() and not Path(r.path, "HEAD").is_file():
            raise UsageError(f"{p}: repos.{name}: {r.path} is not a git repository")
    return cfg


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TaskIn(_Model):
    """A task to queue (the body of `POST /tasks`): a task's text or a ticket, on a configured repository.
    Nothing in it selects anything the operator has not allowed."""

    repo: str
    """A repository name from the service's configuration."""
    task: str | None = None
    """What the agent should do."""
    ticket: Ticket | None = None
    """Or a ticket: its title and body become the task, nothing else."""
    policy: str | None = None
    """A policy the repository allows; default its own."""

    @model_validator(mode="after")
    def _one(self) -> TaskIn:
        if (self.task is None) == (self.ticket is None):
            raise ValueError("give exactly one of task and ticket")
        return self


class Task(_Model):
    """A task as the service reports it."""

    id: str
    """Task id."""
    status: TaskStatus
    """queued, running, done (its run succeeded) or failed (see error, and summary when the run got that
    far)."""
    source: str
    """api or webhook."""
    principal: str
    """Who asked: a token's name, or github."""
    repo: str
    """The repository's name."""
    run_id: str | None
    """The run, once started."""
    summary: dict[str, Any] | None
    """The run's summary, once finished: what `sandbox run --json` prints."""
    error: str | None
    """Why it failed: the run's status and reason, or what stopped it before or after its run."""
    subject: str | None = None
    """What a webhook task is about, owner/name#number (an issue, or the pull request of a follow-up)."""
    created_at: float
    """Unix time."""
    started_at: float | None
    """Unix time."""
    ended_at: float | None
    """Unix time."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Task:
        """A task from its row in the store's queue (the request it holds is the service's own business)."""
        d = {k: v for k, v in row.items() if k != "request"}
        d["summary"] = json.loads(d["summary"]) if d.get("summary") else None
        return cls.model_validate(d)


class ApiError(_Model):
    """A refused request."""

    error: str
    """Why, for people."""


class Ignored(_Model):
    """A webhook delivery that became no task."""

    ignored: str
    """Why, true of that delivery (a redelivery: why the first one was ignored)."""


class Health(_Model):
    """The service answers."""

    ok: bool
    """Always true."""


REQUEST_MODELS: tuple[type[BaseModel], ...] = (TaskIn,)
"""The HTTP API's request bodies (the GitHub webhook's is GitHub's)."""
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (Task, ApiError, Ignored, Health)
"""The HTTP API's JSON responses."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response(ApiError(error=message).model_dump(), status=status)


SCHEMA_REF = "#/components/schemas/{model}"
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
Content = type[BaseModel] | dict[str, Any] | None


def _content(body: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    return {"application/json": {"schema": {"$ref": SCHEMA_REF.format(model=body.__name__)}}}


def _responses(by_status: dict[int, tuple[str, Content]]) -> dict[str, Any]:
    """OpenAPI responses from status -> (description, the body's model, or its content, or None)."""
    return {
        str(status): {"description": text, **({"content": _content(body)} if body is not None else {})}
        for status, (text, body) in by_status.items()
    }


@functools.cache
def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`): the operations are written here, every
    schema is generated from the request and response models (and those they hold, such as Ticket), their
    descriptions from the models' docstrings."""
    _, defs = models_json_schema(
        [*((m, "validation") for m in REQUEST_MODELS), *((m, "serialization") for m in RESPONSE_MODELS)],
        ref_template=SCHEMA_REF,
    )
    unauthorised = ("no or bad token", ApiError)
    no_task = ("no such task", ApiError)
    tasks = {"application/json": {"schema": {"type": "array", "items": {"$ref": SCHEMA_REF.format(model="Task")}}}}
    events = {"application/x-ndjson": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "agent-sandbox task service", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": defs["$defs"]},
        "security": [{"bearer": []}],
        "paths": {
            "/tasks": {
                "post": {
                    "summary": "Queue a task",
                    "requestBody": {"required": True, "content": _content(TaskIn)},
                    "responses": _responses(
                        {
                            202: ("queued", Task),
                            400: ("bad request", ApiError),
                            401: unauthorised,
                            403: ("repository or policy not allowed for this token", ApiError),
                            404: ("unknown repository", ApiError),
                        }
                    ),
                },
                "get": {
                    "summary": "The latest tasks on the token's repositories",
                    "responses": _responses({200: ("tasks", tasks), 401: unauthorised}),
                },
            },
            "/tasks/{id}": {
                "get": {
                    "summary": "A task",
                    "parameters": [_ID],
                    "responses": _responses({200: ("the task", Task), 401: unauthorised, 404: no_task}),
                }
            },
            "/tasks/{id}/events": {
                "get": {
                    "summary": "The task's audit events as NDJSON, followed until the run ends",
                    "parameters": [_ID],
                    "responses": _responses(
                        {
                            200: ("events, one JSON object a line (docs/audit.md)", events),
                            401: unauthorised,
                            404: no_task,
                        }
                    ),
                }
            },
            "/webhooks/github": {
                "post": {
                    "summary": "A GitHub delivery: adding the label to an issue, or a /sandbox comment on a run's "
                    "pull request, becomes a task, once per delivery id and one active task per issue",
                    "security": [],
                    "parameters": [
                        {"name": "X-Hub-Signature-256", "in": "header", "required": True, "schema": {"type": "string"}},
                        {"name": "X-GitHub-Event", "in": "header", "required": True, "schema": {"type": "string"}},
                        {"name": "X-GitHub-Delivery", "in": "header", "required": True, "schema": {"type": "string"}},
                    ],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                    "responses": _responses(
                        {
                            202: ("queued", Task),
                            200: (
                                "ignored, or answered with the task it already made or the issue's active task",
                                {
                                    "application/json": {
                                        "schema": {
                                            "oneOf": [
                                                {"$ref": SCHEMA_REF.format(model="Ignored")},
                                                {"$ref": SCHEMA_REF.format(model="Task")},
                                            ]
                                        }
                                    }
                                },
                            ),
                            400: ("no delivery id, or not an event payload", ApiError),
                            401: ("bad signature", ApiError),
                            404: ("webhooks are not enabled", ApiError),
                        }
                    ),
                }
            },
            "/healthz": {
                "get": {"summary": "Liveness", "security": [], "responses": _responses({200: ("ok", Health)})}
            },
            "/openapi.json": {
                "get": {
                    "summary": "This description",
                    "security": [],
                    "responses": _responses(
                        {200: ("OpenAPI 3.1", {"application/json": {"schema": {"type": "object"}}})}
                    ),
                }
            },
        },
    }


class _GitHubDown(Exception):
    """GitHub could not be asked what a delivery needs to know: no answer to the delivery yet."""


def _head_repository(head: Any, full_name: str) -> str | None:
    """owner/name of the repository a pull request's head branch is in: head.repo (null when the fork was
    deleted), else the owner in head.label (owner:ref) with the base's name; None when neither says."""
    if not isinstance(head, dict):
        return None
    if "repo" in head:
        repo = head["repo"]
        return str(repo.get("full_name") or "") or None if isinstance(repo, dict) else None
    owner, sep, _ = str(head.get("label") or "").partition(":")
    return f"{owner}/{full_name.partition('/')[2]}" if sep and owner else None


@dataclass(frozen=True)
class Trigger:
    """A delivery that asks for a task."""

    repo: str
    """The configured repository's name."""
    subject: str
    """owner/name#number: the issue, or the pull request of a follow-up."""
    request: RunRequest
    """The run it asks for."""
    what: str
    """For the log: an issue, or a follow-up of which run."""


def task_outcome(summary: RunSummary) -> tuple[TaskStatus, str | None]:
    """A finished run's task: `done` only when the run did all it was asked (its exit code 0), else `failed`
    with the run's status and reason."""
    if summary.exit_code == 0:
        return "done", None
    why = f"run {summary.id} {summary.status} ({summary.reason})"
    detail = summary.push_error if summary.status == "succeeded" and summary.push_error else summary.message
    return "failed", f"{why}: {detail}" if detail else why


class Commenter:
    """Comments on the issues and pull requests that webhook tasks come from: one comment per task, made when
    its run starts and edited when it ends. Posted from a thread of its own, in order, so GitHub's latency
    or rate limits never hold up a run; a failed comment is logged and never fails the task."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.token = os.environ.get(config.github.token_env, "")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="github-comments")
        self._bases: dict[str, str] = {}

    def announce(self) -> None:
        """Say once, at start, when there will be no comments."""
        if not self.token:
            log.info("github_comments_disabled reason=%r", f"no token in ${self.config.github.token_env}")

    def _base(self, repo_name: str) -> str:
        if repo_name not in self._bases:
            remote: str | None = None
            try:
                from agent_sandbox.git.checkout import open_repo
                from agent_sandbox.git.handoff import remote_url

                repo = self.config.repos[repo_name]
                remote = remote_url(open_repo(repo.path), repo.remote)
            except (SandboxError, KeyError):
                remote = None
            self._bases[repo_name] = api_base_for(remote, self.config.github.api_base)
        return self._bases[repo_name]

    def client(self, repo_name: str, max_wait_s: float = 30.0) -> GitHub | None:
        # Bounded waits: a comment is worth little once the run it reports on has moved on.
        if not self.token:
            return None
        return GitHub(self.token, self._base(repo_name), max_wait_s=max_wait_s, timeout_s=min(30.0, max_wait_s))

    def post(self, repo_name: str, subject: str | None, task_id: str, body: str) -> None:
        if subject is None or not self.token:
            return
        self.pool.submit(self._post, repo_name, subject, task_id, body)

    def _post(self, repo_name: str, subject: str, task_id: str, body: str) -> None:
        slug, _, number = subject.rpartition("#")
        try:
            gh = self.client(repo_name)
            if gh is not None:
                url = gh.upsert_comment(slug, int(number), f"task-{task_id}", body)
                log.info("task_commented id=%s subject=%s url=%s", task_id, subject, url)
        except (GitHubError, ValueError) as exc:
            log.warning("task_comment_failed id=%s subject=%s error=%s", task_id, subject, exc)
        except Exception:  # a bug here must not stop the comments that follow
            log.exception("task_comment_crashed id=%s subject=%s", task_id, subject)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def started_comment(task_id: str, run_id: str) -> str:
    return (
        f"**agent-sandbox** is working on this: task `{task_id}`, run `{run_id}`. This comment is updated when it ends."
    )


def ended_comment(task_id: str, summary: RunSummary | None, error: str | None) -> str:
    if summary is None:
        return f"**agent-sandbox**: task `{task_id}` failed before its run ended: {error}"
    status = "done" if error is None else "failed"
    lines = [
        f"**agent-sandbox**: task `{task_id}` is **{status}**: run `{summary.id}` {summary.status} ({summary.reason}).",
        "",
        f"- cost: ${summary.cost_usd:.4f}, {summary.turns} turns, {summary.duration_s:.0f}s",
        f"- branch: `{summary.branch}`" if summary.branch else "- branch: none (nothing changed)",
    ]
    if summary.pr_url:
        lines.append(f"- pull request: {summary.pr_url}")
    if error:
        lines.append(f"- why: {error}")
    return "\n".join(lines) + "\n"


class TaskService:
    def __init__(self, config: ServiceConfig, store: RunStore | None = None) -> None:
        self.config = config
        self.store = store or RunStore()
        self.tasks = TaskStore(self.store)
        self.wake = asyncio.Event()
        self.running: set[str] = set()
        self.workers: list[asyncio.Task[None]] = []
        self.closing = False  # a signal came: no further task is claimed
        self.in_flight = 0  # runs in progress, which a stopping service waits for
        self.comments = Commenter(config)
        # Runs take their own threads: one held for hours must never keep the webhook from reading GitHub.
        self.run_pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="task-run")
        self._deliveries_pruned_at = 0.0
        # The run itself; tests that drive the worker without Docker put a stand-in here.
        self.run_task: Callable[..., RunSummary] = run_task

    # --- queue ---------------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Tasks left running by a service that stopped: a run that had ended (during a shutdown) gives its
        task the run's outcome; the others are recovered (work imported, everything removed, as `sandbox gc`
        does) and their tasks marked failed, with the recovered run's summary."""
        rows = self.tasks.running()
        reaped = []
        ended = {row["id"]: self._summary_of(row["run_id"], finished_only=True) for row in rows}
        if any(s is None for s in ended.values()):
            from agent_sandbox.backend import connect
            from agent_sandbox.config.settings import load_settings
            from agent_sandbox.run.orphans import collect

            try:
                backend = connect(load_settings().backend)
                collect(backend, self.store, backend.images())
            except Exception as exc:  # the tasks are still marked; `sandbox gc` can finish the cleanup later
                log.warning("recover_gc_failed error=%r", exc)
        for row in rows:
            summary = ended[row["id"]]
            if summary is not None:
                log.info("task_recovered id=%s run_id=%s reason=%r", row["id"], summary.id, "its run ended at shutdown")
                self._finish(row["id"], row["repo"], row.get("subject"), summary, None)
            else:
                why = (
                    "the service stopped while the task was running; its run was recovered by the service's "
                    "restart (`sandbox show` has its branch)"
                    if row["run_id"]
                    else "the service stopped while the task was starting; its run never started"
                )
                log.info("task_reaped id=%s run_id=%s", row["id"], row["run_id"] or "-")
                self._finish(row["id"], row["repo"], row.get("subject"), self._summary_of(row["run_id"]), why)
            reaped.append(row["id"])
        return reaped

    def _summary_of(self, run_id: str | None, finished_only: bool = False) -> RunSummary | None:
        """The run's summary.json, if it has one; with finished_only, only when the store has the run ended (a
        run whose supervisor died before recording its end is recovered instead)."""
        if not run_id:
            return None
        run = self.store.get(run_id)
        if run is None or (finished_only and run["status"] == "running"):
            return None
        try:
            return RunSummary.model_validate_json((Path(run["run_dir"]) / "summary.json").read_text())
        except (OSError, ValidationError):
            return None

    def _finish(
        self, task_id: str, repo: str, subject: str | None, summary: RunSummary | None, error: str | None
    ) -> None:
        """End a task: `done` when its run did all it was asked, else `failed` with why (the run's reason, or
        the error given: what stopped it before or after its run)."""
        status: TaskStatus = "failed"
        if summary is not None:
            status, why = task_outcome(summary)
            error = error or why
            status = "failed" if error else status
        self.tasks.ended(
            task_id,
            status,
            summary.id if summary else None,
            summary.model_dump_json() if summary else None,
            error,
        )
        log.info(
            "task_%s id=%s run_id=%s reason=%r",
            status,
            task_id,
            summary.id if summary else "-",
            error or (str(summary.reason) if summary else ""),
        )
        self.comments.post(repo, subject, task_id, ended_comment(task_id, summary, error))

    def enqueue(
        self,
        source: str,
        principal: str,
        repo: str,
        req: RunRequest,
        subject: str | None = None,
        delivery: tuple[str, str] | None = None,
    ) -> Task:
        task_id = "t-" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        self.tasks.add(task_id, source, principal, repo, req.model_dump_json(), subject=subject, delivery=delivery)
        log.info(
            "task_queued id=%s source=%s principal=%s repo=%s subject=%s delivery=%s",
            task_id,
            source,
            principal,
            repo,
            subject or "-",
            delivery[0] if delivery else "-",
        )
        self.wake.set()
        return self.get(task_id)  # type: ignore[return-value]

    def get(self, task_id: str) -> Task | None:
        row = self.tasks.get(task_id)
        return Task.from_row(row) if row else None

    def _claim(self) -> tuple[str, RunRequest] | None:
        claimed = self.tasks.claim()
        if claimed is None:
            return None
        task_id, request = claimed
        return task_id, RunRequest.model_validate_json(request)

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            claimed = None if self.closing else self._claim()
            if claimed is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            task_id, req = claimed
            row = self.tasks.get(task_id) or {}
            repo, subject = str(row.get("repo", "")), row.get("subject")

            def started(sup: Any, task_id: str = task_id, repo: str = repo, subject: str | None = subject) -> None:
                self.tasks.started(task_id, sup.spec.run_id)
                log.info("task_running id=%s run_id=%s", task_id, sup.spec.run_id)
                self.comments.post(repo, subject, task_id, started_comment(task_id, sup.spec.run_id))

            self.in_flight += 1
            try:
                summary = await loop.run_in_executor(
                    self.run_pool, functools.partial(self.run_task, req, on_start=started)
                )
                self._finish(task_id, repo, subject, summary, None)
            except SandboxError as exc:
                self._finish(task_id, repo, subject, None, exc.message)
            except Exception as exc:  # a bug must not stop the queue
                log.exception("task_crashed id=%s", task_id)
                self._finish(task_id, repo, subject, None, f"{type(exc).__name__}: {exc}")
            finally:
                self.in_flight -= 1

    # --- HTTP ----------------------------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> TokenConfig | None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        # A header's bytes that are not UTF-8 come as surrogates: they hash (to no token's digest), never crash.
        digest = hashlib.sha256(auth[7:].strip().encode("utf-8", "surrogateescape")).hexdigest()
        for t in self.config.tokens:
            if hmac.compare_digest(t.sha256, digest):
                request[PRINCIPAL] = t.name
                return t
        return None

    def _request_for(
        self, repo_name: str, task: str | None, ticket: Ticket | None, policy: str | None, **extra: Any
    ) -> RunRequest:
        """The run for a task: the repository's settings; the request picks only the text and, among those the
        repository allows, the policy."""
        repo = self.config.repos[repo_name]
        chosen = policy or repo.policy
        if chosen not in (repo.policy, *repo.policies):
            raise PermissionError(f"policy {chosen!r} is not allowed for repository {repo_name!r}")
        return repo.request(
            repo=repo.path,
            task=task,
            policy=chosen,
            ticket_text=ticket.model_dump_json() if ticket is not None else None,
            **extra,
        )

    async def post_task(self, request: web.Request) -> web.Response:
        who = self._principal(request)
        if who is None:
            return _error(401, "a valid bearer token is required")
        try:
            body = TaskIn.model_validate_json(await request.read())
        except ValidationError as exc:
            return _error(400, exc.errors()[0]["msg"])
        if body.repo not in self.config.repos:
            return _error(404 if body.repo not in who.repos else 400, f"unknown repository {body.repo!r}")
        if body.repo not in who.repos:
            return _error(403, f"token {who.name!r} may not use repository {body.repo!r}")
        try:
            req = self._request_for(body.repo, body.task, body.ticket, body.policy)
        except PermissionError as exc:
            return _error(403, str(exc))
        task = self.enqueue("api", who.name, body.repo, req)
        return web.json_response(task.model_dump(), status=202)

    async def list_tasks(self, request: web.Request) -> web.Response:
        who = self._principal(request)
        if who is None:
            return _error(401, "a valid bearer token is required")
        rows = self.tasks.recent(200, repos=who.repos)  # the token's latest, however busy other repositories are
        return web.json_response([Task.from_row(r).model_dump() for r in rows])

    def _visible(self, request: web.Request) -> Task | web.Response:
        who = self._principal(request)
        if who is None:
            return _error(401, "a valid bearer token is required")
        task = self.get(request.match_info["id"])
        if task is None or task.repo not in who.repos:
            return _error(404, "no such task")
        return task

    async def get_task(self, request: web.Request) -> web.Response:
        task = self._visible(request)
        return task if isinstance(task, web.Response) else web.json_response(task.model_dump())

    async def task_events(self, request: web.Request) -> web.StreamResponse:
        task = self._visible(request)
        if isinstance(task, web.Response):
            return task
        resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
        await resp.prepare(request)
        sent = 0
        while True:
            if request.transport is None or request.transport.is_closing():
                return resp  # the client left: stop following (serve()'s runner does not cancel the handler)
            current = self.get(task.id)
            assert current is not None
            if current.run_id:
                try:
                    events = read_events(resolve_run(current.run_id))
                except (SandboxError, OSError):
                    events = []
                for e in events[sent:]:
                    await resp.write((json.dumps(e, separators=(",", ":")) + "\n").encode())
                sent = max(sent, len(events))
            if current.status in ("done", "failed"):
                break
            await asyncio.sleep(0.25)
        await resp.write_eof()
        return resp

    async def github_webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        cfg = self.config.webhook
        secret = os.environ.get(cfg.secret_env, "") if cfg else ""
        if cfg is None or not secret:
            return _error(404, "webhooks are not enabled")
        expected = b"sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest().encode()
        given = request.headers.get("x-hub-signature-256", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(expected, given):  # bytes: a header that is not ASCII is a mismatch, not a crash
            return _error(401, "bad signature")
        request[PRINCIPAL] = "github"
        self._forget_old_deliveries()
        delivery = request.headers.get("x-github-delivery", "").strip()
        if not delivery:
            return _error(400, "no X-GitHub-Delivery header")
        if (seen := self._redelivered(delivery)) is not None:
            return seen
        try:
            event = json.loads(raw)
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(event, dict):
            return _error(400, "the body is not a JSON object")
        name = request.headers.get("x-github-event", "")
        kind = f"{name}.{event.get('action')}"
        try:
            decision = await self._decide(cfg, name, event)
        except _GitHubDown as exc:
            # Not an answer to the delivery: nothing is remembered, so GitHub's "Redeliver" tries it again.
            log.warning("webhook_github_failed delivery=%s event=%s error=%s", delivery, kind, exc)
            return _error(502, str(exc))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return _error(400, f"not a GitHub {name} event payload: {type(exc).__name__}: {exc}")
        # Decided after the last await: from here to the answer nothing else runs, so the checks hold.
        if (seen := self._redelivered(delivery)) is not None:  # the same delivery came while we asked GitHub
            return seen
        if isinstance(decision, str):
            self.tasks.record_delivery(delivery, kind, None, decision)
            log.info("webhook_ignored delivery=%s event=%s reason=%r", delivery, kind, decision)
            return web.json_response(Ignored(ignored=decision).model_dump())
        active = self.tasks.active(decision.subject)
        if active is not None:
            self.tasks.record_delivery(delivery, kind, active["id"], None)
            log.info(
                "webhook_active delivery=%s event=%s subject=%s task=%s status=%s",
                delivery,
                kind,
                decision.subject,
                active["id"],
                active["status"],
            )
            return web.json_response(Task.from_row(active).model_dump())
        task = self.enqueue(
            "webhook", "github", decision.repo, decision.request, subject=decision.subject, delivery=(delivery, kind)
        )
        log.info("webhook_task delivery=%s event=%s task=%s what=%r", delivery, kind, task.id, decision.what)
        return web.json_response(task.model_dump(), status=202)

    def _redelivered(self, delivery: str) -> web.Response | None:
        """The answer to a delivery seen before (GitHub's retry, its "Redeliver" button, after a restart too):
        the task it made or was answered with, or why it was ignored; nothing is queued again."""
        seen = self.tasks.delivery(delivery)
        if seen is None:
            return None
        task = self.get(seen["task_id"]) if seen["task_id"] else None
        log.info("webhook_redelivered delivery=%s task=%s", delivery, task.id if task else "-")
        if task is not None:
            return web.json_response(task.model_dump())
        why = seen["ignored"] or "it made no task"
        return web.json_response(Ignored(ignored=f"delivery {delivery} was handled before: {why}").model_dump())

    def _forget_old_deliveries(self) -> None:
        """Forget deliveries older than DELIVERY_RETENTION_S (at most once an hour): GitHub no longer redelivers
        them, and the tasks they made stay."""
        now = time.time()
        if now - self._deliveries_pruned_at < 3600:
            return
        self._deliveries_pruned_at = now
        forgotten = self.tasks.forget_deliveries(now - DELIVERY_RETENTION_S)
        if forgotten:
            log.info("webhook_deliveries_forgotten count=%d", forgotten)

    def _repo_named(self, full_name: str) -> tuple[str, str] | None:
        """The configured repository a delivery's owner/name is, and its owner/name as configured: GitHub's names
        are case-insensitive (ACME/Widgets is acme/widgets, no one else can own it)."""
        wanted = full_name.casefold()
        return next(
            ((n, r.github) for n, r in self.config.repos.items() if r.github and r.github.casefold() == wanted), None
        )

    async def _decide(self, cfg: WebhookConfig, name: str, event: dict[str, Any]) -> Trigger | str:
        """The task a delivery asks for, or why it asks for none (true of this delivery: people read it)."""
        action = event.get("action")
        if name == "issues":
            issue, full_name = event["issue"], str(event["repository"]["full_name"])
            number = int(issue["number"])
            named = self._repo_named(full_name)
            if named is None:
                return f"repository {full_name} is not configured"
            repo, full_name = named
            if action != "labeled":
                return (
                    f"issues event {action!r}: only adding the {cfg.label!r} label starts a task "
                    "(opened, reopened and edited never do; GitHub sends `labeled` for a label set at creation)"
                )
            added = (event.get("label") or {}).get("name")
            if added != cfg.label:
                return f"the label added is {added!r}, not {cfg.label!r}"
            if issue.get("state") == "closed":
                return f"issue #{number} is closed"
            current = await self._issue_now(repo, full_name, number)
            if current is not None:
                # GitHub does not promise deliveries in order: one sent when the label was added may arrive after
                # it was removed again, or after the issue was closed. The issue as it is now decides.
                if current.get("state") == "closed":
                    return f"issue #{number} is closed now (the delivery is older than that)"
                labels = {str(x.get("name")) for x in current.get("labels") or [] if isinstance(x, dict)}
                if cfg.label not in labels:
                    return f"the {cfg.label!r} label is no longer on issue #{number} (the delivery is older than that)"
                issue = {**issue, **{k: current[k] for k in ("title", "body") if k in current}}
            # The issue is untrusted text: it becomes the task, nothing in it selects anything.
            ticket = Ticket(title=str(issue.get("title") or ""), body=str(issue.get("body") or ""))
            req = self._request_for(repo, None, ticket, None)
            return Trigger(repo, f"{full_name}#{number}", req, f"issue #{number}")
        if name == "issue_comment":
            return await self._follow_up(cfg, event)
        return f"{name or 'unnamed'} events never start a task (only issues and issue_comment do)"

    async def _issue_now(self, repo: str, full_name: str, number: int) -> dict[str, Any] | None:
        """The issue as GitHub has it now, or None without a token or when GitHub does not say in time: the
        delivery's own copy then stands, as it always did. Briefly: GitHub waits 10 s for the answer."""
        gh = self.comments.client(repo, max_wait_s=ISSUE_READ_WAIT)
        if gh is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            current = await loop.run_in_executor(None, gh.request, "GET", f"/repos/{full_name}/issues/{number}")
        except GitHubError as exc:
            log.warning("issue_not_read repo=%s issue=%d error=%s; the delivery's copy stands", full_name, number, exc)
            return None
        return current if isinstance(current, dict) else None

    async def _follow_up(self, cfg: WebhookConfig, event: dict[str, Any]) -> Trigger | str:
        """A `/sandbox <instruction>` comment on a run's pull request, by an allowed user: a follow-up run on the
        branch, with the earlier run's conversation."""
        action = event.get("action")
        issue, comment, full_name = event["issue"], event["comment"], str(event["repository"]["full_name"])
        number = int(issue["number"])
        if action != "created":
            return f"comment {action}: only a new comment can be a command"
        body = str(comment.get("body") or "")
        if not body.startswith(COMMAND):
            return f"the comment is not a `{COMMAND}<instruction>` command"
        if not issue.get("pull_request"):
            return f"#{number} is an issue, not a pull request: follow-ups are asked for on a run's pull request"
        user = str((comment.get("user") or {}).get("login") or "")
        # GitHub logins are case-insensitive and unique: Alice is alice. Nothing else is folded.
        if not user or user.casefold() not in {u.casefold() for u in cfg.followup_users}:
            return f"user {user!r} is not in webhook.followup_users"
        named = self._repo_named(full_name)
        if named is None:
            return f"repository {full_name} is not configured"
        name, full_name = named
        if "follow_up" not in RunRequest.model_fields:
            return "this version of the service cannot run follow-ups"
        instruction = body[len(COMMAND) :].strip()
        if not instruction:
            return f"the `{COMMAND.strip()}` command has no instruction"
        gh = self.comments.client(name)
        if gh is None:
            return f"no GitHub token (${self.config.github.token_env}) to read pull request #{number}'s branch"
        loop = asyncio.get_running_loop()
        try:
            pr = await loop.run_in_executor(None, gh.request, "GET", f"/repos/{full_name}/pulls/{number}")
        except GitHubError as exc:
            raise _GitHubDown(f"pull request #{number}'s branch could not be read from GitHub: {exc}") from None
        try:
            head = pr["head"]
            branch = str(head["ref"])
        except (KeyError, TypeError) as exc:
            return f"pull request #{number}'s branch could not be read from GitHub: {exc}"
        if pr.get("state") != "open" or pr.get("merged"):
            # A merged or closed pull request is done with: a follow-up there would push work nobody reviews.
            ended = "merged" if pr.get("merged") else "closed"
            return f"pull request #{number} is {ended}: follow-ups run only on open ones"
        # A fork's branch is not the run's branch, whatever it is named: only this repository's own branches.
        source = _head_repository(head, full_name)
        if source is None or source.casefold() != full_name.casefold():
            return (
                f"pull request #{number} comes from a fork ({source or 'a deleted repository'}), not from "
                f"{full_name}: follow-ups run only on a run's branch in the repository itself"
            )
        from agent_sandbox.git.checkout import open_repo

        repo = self.config.repos[name]
        try:
            top = str(open_repo(repo.path).path)  # as the run store has it: the resolved top of the checkout
        except SandboxError as exc:
            return f"repository {name} cannot be opened: {exc.message}"
        run = self.store.latest_on_branch(top, branch)
        if run is None:
            return f"pull request #{number}'s branch {branch} is not a run's branch"
        # Under the earlier run's policy when the repository still allows it, else the repository's own.
        policy = run["policy"] if run["policy"] in (repo.policy, *repo.policies) else None
        req = self._request_for(name, instruction, None, policy, follow_up=run["id"])
        return Trigger(name, f"{full_name}#{number}", req, f"follow-up of run {run['id']} on {branch}")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi())

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(Health(ok=True).model_dump())

    @web.middleware
    async def _access(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """One access line per request: method, path, status, principal (a token's name, github for a signed
        delivery, - for nobody) and duration."""
        started = time.monotonic()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPRequestEntityTooLarge:
            status = 413
            return _error(413, f"the body is larger than {MAX_BODY} bytes")
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            log.info(
                "http method=%s path=%s status=%d principal=%s duration_ms=%.1f",
                request.method,
                request.raw_path,
                status,
                request.get(PRINCIPAL, "-"),
                (time.monotonic() - started) * 1000,
            )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._access])
        app.router.add_post("/tasks", self.post_task)
        app.router.add_get("/tasks", self.list_tasks)
        app.router.add_get("/tasks/{id}", self.get_task)
        app.router.add_get("/tasks/{id}/events", self.task_events)
        app.router.add_post("/webhooks/github", self.github_webhook)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def serve(self, ready: Any = None) -> None:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.bind, self.config.port)
        # Listening comes first: a second service started on the same port must leave, not reap the first
        # one's running tasks.
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise EnvironmentNotReady(f"cannot listen on {self.config.bind}:{self.config.port}: {why}") from None
        port = runner.addresses[0][1] if runner.addresses else self.config.port
        self.comments.announce()
        reaped = self.recover()
        if ready:
            ready(port, reaped)
        self.workers = [asyncio.create_task(self.worker()) for _ in range(self.config.concurrency)]
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        try:
            # A signal (interrupts.py) stops the service: the runs in progress get it too, stop their agents,
            # import their work and tear down; the service waits for them, then exits. No new task starts.
            def stop(_name: str) -> None:
                loop.call_soon_threadsafe(stopping.set)

            with interrupts.delivered_to(stop):
                await stopping.wait()
                self.closing = True
                while self.in_flight:
                    await asyncio.sleep(0.2)
        finally:
            for w in self.workers:
                w.cancel()
            await runner.cleanup()
            await loop.run_in_executor(None, self.comments.close)
            self.run_pool.shutdown(wait=False)
