"""`sandbox serve`: a small HTTP service that takes tasks from people, CI jobs and webhooks.

aiohttp serves it (already the gateway's framework): a handful of JSON endpoints need no more. The queue
lives in the run store, so a restart loses nothing: tasks that were running when the service died are
reaped (their containers removed) and marked failed, and queued ones start again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema

from agent_sandbox.errors import SandboxError, UsageError, validation_message
from agent_sandbox.fleet.views import read_events, resolve_run
from agent_sandbox.interrupts import interrupts
from agent_sandbox.run.request import RunRequest, RunSettings
from agent_sandbox.run.runner import run_task
from agent_sandbox.run.ticket import Ticket
from agent_sandbox.store import RunStore, TaskStatus, TaskStore

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024


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
    """GitHub issue webhooks."""

    secret_env: str = "SANDBOX_WEBHOOK_SECRET"
    """The environment variable holding the webhook secret (HMAC-SHA256, X-Hub-Signature-256)."""
    label: str = "sandbox"
    """An issue carrying this label becomes a task."""


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
    """queued, running, done (the run ended, however it went: see summary) or failed (no run summary: see
    error)."""
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
    """Why it failed without a run summary."""
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
    """A webhook event that became no task."""

    ignored: str
    """Why."""


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
                    "summary": "A GitHub issues event; a labelled issue becomes a task",
                    "security": [],
                    "parameters": [
                        {"name": "X-Hub-Signature-256", "in": "header", "required": True, "schema": {"type": "string"}},
                        {"name": "X-GitHub-Event", "in": "header", "required": True, "schema": {"type": "string"}},
                    ],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                    "responses": _responses(
                        {
                            202: ("queued", Task),
                            200: ("ignored", Ignored),
                            400: ("not an issues event payload", ApiError),
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

    # --- queue ---------------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Tasks left running by a service that died: their runs are recovered (work imported, everything
        removed, as `sandbox gc` does) and the tasks marked failed."""
        rows = self.tasks.running()
        reaped = []
        if rows:
            from agent_sandbox.backend import connect
            from agent_sandbox.config.settings import load_settings
            from agent_sandbox.run.orphans import collect

            try:
                backend = connect(load_settings().backend)
                collect(backend, self.store, backend.images())
            except Exception as exc:  # the tasks are still marked; `sandbox gc` can finish the cleanup later
                log.warning("recover_gc_failed error=%r", exc)
        for row in rows:
            self.tasks.failed(
                row["id"],
                "the service stopped while the task was running; its run was recovered "
                "by the service's restart (`sandbox show` has its branch)",
            )
            reaped.append(row["id"])
            log.info("task_reaped id=%s run_id=%s", row["id"], row["run_id"])
        return reaped

    def enqueue(self, source: str, principal: str, repo: str, req: RunRequest) -> Task:
        task_id = "t-" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        self.tasks.add(task_id, source, principal, repo, req.model_dump_json())
        log.info("task_queued id=%s source=%s principal=%s repo=%s", task_id, source, principal, repo)
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

            def started(sup: Any, task_id: str = task_id) -> None:
                self.tasks.started(task_id, sup.spec.run_id)

            self.in_flight += 1
            try:
                summary = await loop.run_in_executor(None, functools.partial(run_task, req, on_start=started))
                self.tasks.done(task_id, summary.id, summary.model_dump_json())
            except SandboxError as exc:
                self.tasks.failed(task_id, exc.message)
            except Exception as exc:  # a bug must not stop the queue
                log.exception("task_crashed id=%s", task_id)
                self.tasks.failed(task_id, f"{type(exc).__name__}: {exc}")
            finally:
                self.in_flight -= 1

    # --- HTTP ----------------------------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> TokenConfig | None:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        digest = hash_token(auth[7:].strip())
        for t in self.config.tokens:
            if hmac.compare_digest(t.sha256, digest):
                return t
        return None

    def _request_for(self, repo_name: str, task: str | None, ticket: Ticket | None, policy: str | None) -> RunRequest:
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
        rows = self.tasks.recent(200)
        return web.json_response([Task.from_row(r).model_dump() for r in rows if r["repo"] in who.repos])

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
        import os

        raw = await request.read()
        cfg = self.config.webhook
        secret = os.environ.get(cfg.secret_env, "") if cfg else ""
        if cfg is None or not secret:
            return _error(404, "webhooks are not enabled")
        expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("x-hub-signature-256", "")):
            return _error(401, "bad signature")
        if request.headers.get("x-github-event") != "issues":
            return web.json_response(Ignored(ignored="not an issues event").model_dump())
        try:
            event = json.loads(raw)
            issue, full_name = event["issue"], event["repository"]["full_name"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "not an issues event payload")
        labels = {lbl.get("name") for lbl in issue.get("labels") or [] if isinstance(lbl, dict)}
        if event.get("action") not in ("opened", "labeled", "reopened") or cfg.label not in labels:
            return web.json_response(Ignored(ignored=f"no {cfg.label!r} label").model_dump())
        name = next((n for n, r in self.config.repos.items() if r.github == full_name), None)
        if name is None:
            return web.json_response(Ignored(ignored=f"repository {full_name} is not configured").model_dump())
        # The issue is untrusted text: it becomes the task, nothing in it selects anything.
        ticket = Ticket(title=str(issue.get("title") or ""), body=str(issue.get("body") or ""))
        task = self.enqueue("webhook", "github", name, self._request_for(name, None, ticket, None))
        return web.json_response(task.model_dump(), status=202)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi())

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(Health(ok=True).model_dump())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/tasks", self.post_task)
        app.router.add_get("/tasks", self.list_tasks)
        app.router.add_get("/tasks/{id}", self.get_task)
        app.router.add_get("/tasks/{id}/events", self.task_events)
        app.router.add_post("/webhooks/github", self.github_webhook)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def serve(self, ready: Any = None) -> None:
        reaped = self.recover()
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.bind, self.config.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else self.config.port
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
