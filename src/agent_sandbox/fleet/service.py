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
import threading
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent_sandbox.errors import SandboxError, UsageError, validation_message
from agent_sandbox.fleet.views import read_events, resolve_run
from agent_sandbox.interrupts import interrupts
from agent_sandbox.run.runner import RunRequest, run_task
from agent_sandbox.store import RunStore

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024


class TokenConfig(BaseModel):
    """One client of the service."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Who it is, for the audit of who asked for what."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the bearer token (`sandbox serve hash-token` prints it); the token itself is not stored."""
    repos: list[str]
    """Names of the repositories it may start tasks on."""


class RepoConfig(BaseModel):
    """A repository the service may work on."""

    model_config = ConfigDict(extra="forbid")

    path: str
    """Its checkout on this host."""
    policy: str = "default"
    """The policy its tasks run under unless a request names another allowed one."""
    policies: list[str] = Field(default_factory=list)
    """Other policies a request may ask for."""
    push: bool = False
    """Push the branch for review."""
    open_pr: bool = False
    """Open a pull request (GITHUB_TOKEN)."""
    github: str | None = None
    """owner/name on GitHub: webhooks for this repository map here."""
    model_script: str | None = None
    """Play this scripted-model YAML instead of calling the real API (tests and demos)."""


class WebhookConfig(BaseModel):
    """GitHub issue webhooks."""

    model_config = ConfigDict(extra="forbid")

    secret_env: str = "SANDBOX_WEBHOOK_SECRET"
    """The environment variable holding the webhook secret (HMAC-SHA256, X-Hub-Signature-256)."""
    label: str = "sandbox"
    """An issue carrying this label becomes a task."""


class ServiceConfig(BaseModel):
    """The service's configuration file."""

    model_config = ConfigDict(extra="forbid")

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


class TaskIn(BaseModel):
    """POST /tasks."""

    model_config = ConfigDict(extra="forbid")

    repo: str
    """A repository name from the service's configuration."""
    task: str | None = None
    """What the agent should do."""
    ticket: dict[str, str] | None = None
    """Or a ticket: {"title": ..., "body": ...}; its text becomes the task, nothing else."""
    policy: str | None = None
    """A policy the repository allows; default its own."""

    @model_validator(mode="after")
    def _one(self) -> TaskIn:
        if (self.task is None) == (self.ticket is None):
            raise ValueError("give exactly one of task and ticket")
        return self


class Task(BaseModel):
    """A task as the service reports it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """Task id."""
    status: Literal["queued", "running", "done", "failed"]
    """Where it is."""
    source: str
    """api or webhook."""
    principal: str
    """Who asked: a token's name, or github."""
    repo: str
    """The repository's name."""
    run_id: str | None
    """The run, once started."""
    summary: dict[str, Any] | None
    """The run's summary, once finished."""
    error: str | None
    """Why it failed without a run summary."""
    created_at: float
    """Unix time."""
    started_at: float | None
    """Unix time."""
    ended_at: float | None
    """Unix time."""


def _task(row: Any) -> Task:
    d = dict(row)
    d.pop("request", None)
    d["summary"] = json.loads(d["summary"]) if d.get("summary") else None
    return Task.model_validate(d)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "agent-sandbox task service", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "TaskIn": {"type": "object", "required": ["repo"], "additionalProperties": False, "properties": {
                "repo": {"type": "string"}, "task": {"type": "string"}, "policy": {"type": "string"},
                "ticket": {"type": "object", "required": ["title"], "properties": {
                    "title": {"type": "string"}, "body": {"type": "string"}}}}},
            "Task": {"type": "object", "properties": {
                "id": {"type": "string"}, "status": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
                "source": {"type": "string"}, "principal": {"type": "string"}, "repo": {"type": "string"},
                "run_id": {"type": "string", "nullable": True}, "summary": {"type": "object", "nullable": True},
                "error": {"type": "string", "nullable": True}, "created_at": {"type": "number"},
                "started_at": {"type": "number", "nullable": True}, "ended_at": {"type": "number", "nullable": True}}},
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/tasks": {
            "post": {"summary": "Queue a task", "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/TaskIn"}}}},
                "responses": {"202": {"description": "queued", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Task"}}}},
                    "400": {"description": "bad request"}, "401": {"description": "no or bad token"},
                    "403": {"description": "repository or policy not allowed for this token"}}},
            "get": {"summary": "List tasks", "responses": {"200": {"description": "tasks", "content": {
                "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}}}},
                "401": {"description": "no or bad token"}}},
        },
        "/tasks/{id}": {"get": {"summary": "A task", "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the task", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Task"}}}}, "404": {"description": "no such task"}}}},
        "/tasks/{id}/events": {"get": {"summary": "The task's audit events as NDJSON, followed until the run ends",
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "events", "content": {"application/x-ndjson": {
                "schema": {"type": "string"}}}}, "404": {"description": "no such task"}}}},
        "/webhooks/github": {"post": {"summary": "A GitHub issues event; a labelled issue becomes a task",
            "security": [], "parameters": [
                {"name": "X-Hub-Signature-256", "in": "header", "required": True, "schema": {"type": "string"}},
                {"name": "X-GitHub-Event", "in": "header", "required": True, "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"202": {"description": "queued"}, "200": {"description": "ignored"},
                          "401": {"description": "bad signature"}}}},
        "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "ok"}}}},
        "/openapi.json": {"get": {"summary": "This description", "security": [],
                                  "responses": {"200": {"description": "OpenAPI 3"}}}},
    },
}


class TaskService:
    def __init__(self, config: ServiceConfig, store: RunStore | None = None) -> None:
        self.config = config
        self.store = store or RunStore()
        # One connection, used from the event loop and from the runs' threads: one statement at a time.
        self._db_lock = threading.Lock()
        self.wake = asyncio.Event()
        self.running: set[str] = set()
        self.workers: list[asyncio.Task[None]] = []
        self.closing = False  # a signal came: no further task is claimed
        self.in_flight = 0  # runs in progress, which a stopping service waits for

    # --- queue ---------------------------------------------------------------------------------------------

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._db_lock:
            return self.store.db.execute(sql, args).fetchall()

    def recover(self) -> list[str]:
        """Tasks left running by a service that died: their runs are recovered (work imported, everything
        removed, as `sandbox gc` does) and the tasks marked failed."""
        rows = self._exec("SELECT id, run_id FROM tasks WHERE status = 'running'")
        reaped = []
        if rows:
            from agent_sandbox.backend.docker import DockerBackend
            from agent_sandbox.backend.images import require_images
            from agent_sandbox.fleet.gc import collect

            try:
                backend = DockerBackend.connect()
                collect(backend, self.store, require_images(backend.client))
            except Exception as exc:  # the tasks are still marked; `sandbox gc` can finish the cleanup later
                log.warning("recover_gc_failed error=%r", exc)
        for row in rows:
            self._exec("UPDATE tasks SET status = 'failed', error = ?, ended_at = ? WHERE id = ?",
                       ("the service stopped while the task was running; its run was recovered by the service's "
                        "restart (`sandbox show` has its branch)", time.time(), row["id"]))
            reaped.append(row["id"])
            log.info("task_reaped id=%s run_id=%s", row["id"], row["run_id"])
        return reaped

    def enqueue(self, source: str, principal: str, repo: str, req: RunRequest) -> Task:
        task_id = "t-" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        self._exec("INSERT INTO tasks (id, status, source, principal, repo, request, created_at) "
                   "VALUES (?,?,?,?,?,?,?)", (task_id, "queued", source, principal, repo, req.model_dump_json(),
                                              time.time()))
        log.info("task_queued id=%s source=%s principal=%s repo=%s", task_id, source, principal, repo)
        self.wake.set()
        return self.get(task_id)  # type: ignore[return-value]

    def get(self, task_id: str) -> Task | None:
        rows = self._exec("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return _task(rows[0]) if rows else None

    def _claim(self) -> tuple[str, RunRequest] | None:
        with self._db_lock, self.store.db:
            self.store.db.execute("BEGIN IMMEDIATE")
            row = self.store.db.execute(
                "SELECT id, request FROM tasks WHERE status = 'queued' ORDER BY created_at LIMIT 1").fetchone()
            if row is None:
                return None
            self.store.db.execute("UPDATE tasks SET status = 'running', started_at = ? WHERE id = ?",
                                  (time.time(), row["id"]))
        return row["id"], RunRequest.model_validate_json(row["request"])

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
                self._exec("UPDATE tasks SET run_id = ? WHERE id = ?", (sup.spec.run_id, task_id))

            self.in_flight += 1
            try:
                summary = await loop.run_in_executor(None, functools.partial(run_task, req, on_start=started))
                self._exec("UPDATE tasks SET status = 'done', summary = ?, run_id = ?, ended_at = ? WHERE id = ?",
                           (summary.model_dump_json(), summary.id, time.time(), task_id))
            except SandboxError as exc:
                self._exec("UPDATE tasks SET status = 'failed', error = ?, ended_at = ? WHERE id = ?",
                           (exc.message, time.time(), task_id))
            except Exception as exc:  # a bug must not stop the queue
                log.exception("task_crashed id=%s", task_id)
                self._exec("UPDATE tasks SET status = 'failed', error = ?, ended_at = ? WHERE id = ?",
                           (f"{type(exc).__name__}: {exc}", time.time(), task_id))
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

    def _request_for(self, repo_name: str, task: str | None, ticket_text: str | None,
                     policy: str | None) -> RunRequest:
        repo = self.config.repos[repo_name]
        chosen = policy or repo.policy
        if chosen not in (repo.policy, *repo.policies):
            raise PermissionError(f"policy {chosen!r} is not allowed for repository {repo_name!r}")
        return RunRequest(repo=repo.path, task=task, ticket_text=ticket_text, policy=chosen, push=repo.push,
                          open_pr=repo.open_pr, model_script=repo.model_script)

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
        ticket_text = json.dumps(body.ticket) if body.ticket is not None else None
        try:
            req = self._request_for(body.repo, body.task, ticket_text, body.policy)
        except PermissionError as exc:
            return _error(403, str(exc))
        task = self.enqueue("api", who.name, body.repo, req)
        return web.json_response(task.model_dump(), status=202)

    async def list_tasks(self, request: web.Request) -> web.Response:
        who = self._principal(request)
        if who is None:
            return _error(401, "a valid bearer token is required")
        rows = self._exec("SELECT * FROM tasks ORDER BY created_at DESC LIMIT 200")
        return web.json_response([_task(r).model_dump() for r in rows if r["repo"] in who.repos])

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
            return web.json_response({"ignored": "not an issues event"})
        try:
            event = json.loads(raw)
            issue, full_name = event["issue"], event["repository"]["full_name"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "not an issues event payload")
        labels = {lbl.get("name") for lbl in issue.get("labels") or [] if isinstance(lbl, dict)}
        if event.get("action") not in ("opened", "labeled", "reopened") or cfg.label not in labels:
            return web.json_response({"ignored": f"no {cfg.label!r} label"})
        name = next((n for n, r in self.config.repos.items() if r.github == full_name), None)
        if name is None:
            return web.json_response({"ignored": f"repository {full_name} is not configured"})
        # The issue is untrusted text: it becomes the task, nothing in it selects anything.
        ticket = json.dumps({"title": str(issue.get("title") or ""), "body": str(issue.get("body") or "")})
        task = self.enqueue("webhook", "github", name, self._request_for(name, None, ticket, None))
        return web.json_response(task.model_dump(), status=202)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

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
            with interrupts.delivered_to(lambda _name: loop.call_soon_threadsafe(stopping.set)):
                await stopping.wait()
                self.closing = True
                while self.in_flight:
                    await asyncio.sleep(0.2)
        finally:
            for w in self.workers:
                w.cancel()
            await runner.cleanup()
