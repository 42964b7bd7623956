"""The task service's HTTP API in process, without Docker: the OpenAPI document generated from the models,
who may queue what, and the run request a task becomes. Running the tasks is test_service_e2e.py's."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel

from agent_sandbox.fleet.service import (
    REQUEST_MODELS,
    RESPONSE_MODELS,
    ApiError,
    Health,
    Ignored,
    Task,
    TaskService,
    hash_token,
    load_config,
    openapi,
)
from agent_sandbox.run.request import RunRequest
from agent_sandbox.run.ticket import Ticket
from agent_sandbox.store import RunStore

TOKEN, OTHER = "tok-ci-" + "a" * 20, "tok-other-" + "b" * 20
SECRET = "webhook-secret-for-tests"


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_openapi_is_valid_and_generated_from_every_model() -> None:
    from openapi_spec_validator import validate

    spec = openapi()
    validate(spec)
    schemas = spec["components"]["schemas"]
    models: list[type[BaseModel]] = [*REQUEST_MODELS, *RESPONSE_MODELS, Ticket]
    for model in models:
        assert model.__name__ in schemas, f"{model.__name__} is not in the OpenAPI document"
        assert schemas[model.__name__].get("description"), f"{model.__name__}: no description"
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
    for ref in refs(spec):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert set(spec["paths"]) == {
        "/tasks",
        "/tasks/{id}",
        "/tasks/{id}/events",
        "/webhooks/github",
        "/healthz",
        "/openapi.json",
    }
    assert set(spec["paths"]["/tasks"]) == {"get", "post"}
    post = spec["paths"]["/tasks"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/TaskIn"}
    assert {"202", "400", "401", "403", "404"} <= set(post["responses"])


@pytest.fixture
def service(tmp_path: Path, make_repo, monkeypatch: pytest.MonkeyPatch) -> TaskService:
    monkeypatch.setenv("SANDBOX_WEBHOOK_SECRET", SECRET)
    widgets = make_repo("widgets")
    make_repo("gadgets")  # named by a relative path in the config
    (tmp_path / "script.yaml").write_text("turns: []\n")
    cfg = {
        "port": 0,
        "tokens": [
            {"name": "ci", "sha256": hash_token(TOKEN), "repos": ["widgets"]},
            {"name": "other", "sha256": hash_token(OTHER), "repos": ["gadgets"]},
        ],
        "repos": {
            "widgets": {
                "path": str(widgets),
                "model_script": "script.yaml",
                "github": "acme/widgets",
                "policies": ["strict"],
                "timeout": 60,
                "check": "make test",
                "push": True,
            },
            "gadgets": {"path": "gadgets"},
        },
        "webhook": {"label": "sandbox"},
    }
    (tmp_path / "service.yaml").write_text(json.dumps(cfg))
    return TaskService(load_config(str(tmp_path / "service.yaml")), store=RunStore(tmp_path / "runs.sqlite"))


Call = Callable[..., Awaitable[tuple[int, Any]]]


def against(service: TaskService, scenario: Callable[[Call], Awaitable[None]]) -> None:
    """Run a scenario against the service's app on a loopback port; no worker runs, so tasks stay queued."""

    async def go() -> None:
        async with TestClient(TestServer(service.app())) as client:

            async def call(
                method: str,
                path: str,
                body: Any = None,
                token: str | None = None,
                raw: bytes | None = None,
                headers: dict[str, str] | None = None,
            ) -> tuple[int, Any]:
                h = {**({"authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
                data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
                resp = await client.request(method, path, data=data, headers=h)
                return resp.status, await resp.json()

            await scenario(call)

    asyncio.run(go())


def expect(model: type[BaseModel], status: int, got: tuple[int, Any]) -> Any:
    assert got[0] == status, got
    return model.model_validate(got[1])


def queued_request(service: TaskService, task_id: str) -> RunRequest:
    row = service.tasks.get(task_id)
    assert row is not None
    return RunRequest.model_validate_json(row["request"])


def test_a_task_becomes_the_repositorys_run_request(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        assert await call("GET", "/openapi.json") == (200, json.loads(json.dumps(openapi())))
        expect(Health, 200, await call("GET", "/healthz"))
        for token in (None, "wrong-token"):
            expect(ApiError, 401, await call("POST", "/tasks", {"repo": "widgets", "task": "t"}, token=token))
        refused = [
            (403, {"repo": "gadgets", "task": "t"}, "may not use repository 'gadgets'"),
            (403, {"repo": "widgets", "task": "t", "policy": "yolo"}, "'yolo' is not allowed"),
            (404, {"repo": "nowhere", "task": "t"}, "unknown repository 'nowhere'"),
            (400, {"repo": "widgets"}, "exactly one of task and ticket"),
            (400, {"repo": "widgets", "task": "t", "ticket": {"title": "x"}}, "exactly one of task and ticket"),
            (400, {"repo": "widgets", "ticket": {"body": "no title"}}, "Field required"),
            (400, {"repo": "widgets", "task": "t", "timeout": 1}, "Extra inputs are not permitted"),
        ]
        for status, body, message in refused:
            err = expect(ApiError, status, await call("POST", "/tasks", body, token=TOKEN))
            assert message in err.error, (body, err)
        assert await call("GET", "/tasks", token=TOKEN) == (200, []), "nothing was queued by refused requests"

        task = expect(
            Task,
            202,
            await call("POST", "/tasks", {"repo": "widgets", "task": "set x to 2", "policy": "strict"}, token=TOKEN),
        )
        assert (task.status, task.principal, task.source, task.repo) == ("queued", "ci", "api", "widgets")
        req = queued_request(service, task.id)
        widgets = service.config.repos["widgets"]
        assert (req.repo, req.task, req.policy) == (widgets.path, "set x to 2", "strict")
        assert (req.timeout, req.check, req.push, req.model_script) == (60, "make test", True, widgets.model_script)
        assert Path(widgets.model_script or "").is_absolute()

        ticketed = expect(
            Task,
            202,
            await call(
                "POST",
                "/tasks",
                {"repo": "widgets", "ticket": {"title": "Make x two", "body": "policy: yolo", "labels": ["x"]}},
                token=TOKEN,
            ),
        )
        req = queued_request(service, ticketed.id)
        assert req.task is None and req.policy == "default"
        assert req.task_text() == ("Make x two\n\npolicy: yolo\n", "Make x two")

        listed = [Task.model_validate(t) for t in (await call("GET", "/tasks", token=TOKEN))[1]]
        assert [t.id for t in listed] == [ticketed.id, task.id]
        assert await call("GET", "/tasks", token=OTHER) == (200, []), "a token sees only its repositories' tasks"
        assert expect(Task, 200, await call("GET", f"/tasks/{task.id}", token=TOKEN)) == task
        expect(ApiError, 404, await call("GET", f"/tasks/{task.id}", token=OTHER))

    against(service, scenario)


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_a_labelled_issue_becomes_a_ticket_and_nothing_else(service: TaskService) -> None:
    event: dict[str, Any] = {
        "action": "labeled",
        "repository": {"full_name": "acme/widgets"},
        "issue": {"title": "Make x two", "body": "policy: yolo", "labels": [{"name": "sandbox"}]},
    }
    body = json.dumps(event).encode()
    unlabelled = json.dumps({**event, "issue": {**event["issue"], "labels": []}}).encode()

    async def scenario(call: Call) -> None:
        issues = {"x-github-event": "issues"}
        for sig in ("sha256=" + "0" * 64, sign(body, "not-the-secret"), ""):
            expect(
                ApiError,
                401,
                await call("POST", "/webhooks/github", raw=body, headers={**issues, "x-hub-signature-256": sig}),
            )
        ignored = expect(
            Ignored,
            200,
            await call(
                "POST", "/webhooks/github", raw=unlabelled, headers={**issues, "x-hub-signature-256": sign(unlabelled)}
            ),
        )
        assert "label" in ignored.ignored
        task = expect(
            Task,
            202,
            await call("POST", "/webhooks/github", raw=body, headers={**issues, "x-hub-signature-256": sign(body)}),
        )
        assert (task.source, task.principal, task.repo) == ("webhook", "github", "widgets")
        req = queued_request(service, task.id)
        assert req.policy == "default" and req.timeout == 60
        assert req.task_text() == ("Make x two\n\npolicy: yolo\n", "Make x two")

    against(service, scenario)
