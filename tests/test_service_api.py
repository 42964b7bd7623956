"""The task service's HTTP API in process, without Docker: the OpenAPI document generated from the models,
who may queue what, the run request a task becomes, the webhook's trigger rules and exactly-once handling,
the task states a run's outcome gives, the comments (against the fake GitHub) and the log lines. Running real
tasks is test_service_e2e.py's; here a stand-in returns the run's summary."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel

from agent_sandbox.errors import EnvironmentNotReady, ExitCode, UsageError
from agent_sandbox.fleet.service import (
    REQUEST_MODELS,
    RESPONSE_MODELS,
    ApiError,
    GitHubConfig,
    Health,
    Ignored,
    Task,
    TaskService,
    WebhookConfig,
    hash_token,
    load_config,
    openapi,
)
from agent_sandbox.run.request import RunRequest
from agent_sandbox.run.spec import EXIT_BY_REASON, STATUS_BY_REASON, RunSummary
from agent_sandbox.run.ticket import Ticket
from agent_sandbox.store import RunStore

from .conftest import REPO_ROOT, SANDBOX
from .fake_github import FakeGitHub
from .fake_github import fake_github_fixture as fake_github_fixture  # a fixture

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


def issue_event(
    action: str, labels: tuple[str, ...] = ("sandbox",), added: str | None = None, number: int = 7, **issue: Any
) -> dict[str, Any]:
    """An `issues` delivery's payload as GitHub sends it: `added` is the label a `labeled` event names."""
    event: dict[str, Any] = {
        "action": action,
        "repository": {"full_name": issue.pop("repo", "acme/widgets")},
        "issue": {
            "number": number,
            "title": "Make x two",
            "body": "policy: yolo",
            "state": "open",
            "labels": [{"name": n} for n in labels],
            **issue,
        },
    }
    if added is not None:
        event["label"] = {"name": added}
    return event


async def deliver(
    call: Call, kind: str, payload: dict[str, Any], delivery: str | None = None, secret: str = SECRET
) -> tuple[int, Any]:
    raw = json.dumps(payload).encode()
    headers = {"x-github-event": kind, "x-hub-signature-256": sign(raw, secret)}
    headers["x-github-delivery"] = delivery if delivery is not None else str(uuid.uuid4())
    return await call("POST", "/webhooks/github", raw=raw, headers=headers)


def test_a_labelled_issue_becomes_a_ticket_and_nothing_else(service: TaskService) -> None:
    body = json.dumps(issue_event("labeled", added="sandbox")).encode()

    async def scenario(call: Call) -> None:
        issues = {"x-github-event": "issues", "x-github-delivery": "d-sig"}
        for sig in ("sha256=" + "0" * 64, sign(body, "not-the-secret"), ""):
            expect(
                ApiError,
                401,
                await call("POST", "/webhooks/github", raw=body, headers={**issues, "x-hub-signature-256": sig}),
            )
        assert service.tasks.delivery("d-sig") is None, "an unsigned delivery is not remembered"
        task = expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox")))
        assert (task.source, task.principal, task.repo, task.subject) == (
            "webhook",
            "github",
            "widgets",
            "acme/widgets#7",
        )
        req = queued_request(service, task.id)
        assert req.policy == "default" and req.timeout == 60
        assert req.task_text() == ("Make x two\n\npolicy: yolo\n", "Make x two")

    against(service, scenario)


def test_only_adding_the_label_triggers_and_every_ignore_says_why(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        async def ignored(kind: str, payload: dict[str, Any], *says: str) -> str:
            why = expect(Ignored, 200, await deliver(call, kind, payload)).ignored
            for text in says:
                assert text in why, (payload.get("action"), why)
            return why

        # The issue carries the label in all of these: the reason must not claim otherwise.
        for action in ("opened", "edited", "reopened"):
            why = await ignored("issues", issue_event(action), f"{action!r}", "only adding the 'sandbox' label")
            assert "no 'sandbox' label" not in why
        await ignored("issues", issue_event("labeled", ("bug", "sandbox"), added="bug"), "label added is 'bug'")
        await ignored("issues", issue_event("unlabeled", ()), "'unlabeled'")
        await ignored("issues", issue_event("labeled", added="sandbox", state="closed"), "#7 is closed")
        await ignored(
            "issues", issue_event("labeled", added="sandbox", repo="acme/other"), "acme/other is not configured"
        )
        await ignored("ping", {"zen": "Keep it logically awesome."}, "ping events never start a task")
        assert service.tasks.recent() == [], "nothing was queued by ignored deliveries"

        raw = json.dumps(issue_event("labeled", added="sandbox")).encode()
        no_id = {"x-github-event": "issues", "x-hub-signature-256": sign(raw)}
        err = expect(ApiError, 400, await call("POST", "/webhooks/github", raw=raw, headers=no_id))
        assert "X-GitHub-Delivery" in err.error
        bad = b"not json"
        bad_headers = {"x-github-event": "issues", "x-github-delivery": "d-bad", "x-hub-signature-256": sign(bad)}
        expect(ApiError, 400, await call("POST", "/webhooks/github", raw=bad, headers=bad_headers))
        expect(ApiError, 400, await deliver(call, "issues", {"action": "labeled"}))

    against(service, scenario)


def test_deliveries_are_handled_once_and_an_issue_has_one_active_task(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        # opened with the label, then the `labeled` GitHub sends for it: one task.
        expect(Ignored, 200, await deliver(call, "issues", issue_event("opened"), "d-opened"))
        first = expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-1"))
        # The same delivery again (GitHub's retry, "Redeliver"): the task it made, nothing new.
        again = expect(Task, 200, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-1"))
        assert again.id == first.id
        redone = expect(Ignored, 200, await deliver(call, "issues", issue_event("opened"), "d-opened"))
        assert "d-opened was handled before" in redone.ignored and "'opened'" in redone.ignored
        # Label churn: another label added, or the label removed and added again while the task is active.
        expect(Ignored, 200, await deliver(call, "issues", issue_event("labeled", ("sandbox", "bug"), added="bug")))
        active = expect(Task, 200, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-2"))
        assert active.id == first.id and active.status == "queued"
        assert expect(Task, 200, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-2")).id == (
            first.id
        )
        # Another issue is another subject.
        other = expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox", number=8)))
        assert [t["id"] for t in service.tasks.recent()] == [other.id, first.id]
        # Once the task has ended, labelling the issue again asks for a new one.
        service.tasks.ended(first.id, "failed", None, None, "test")
        later = expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-3"))
        assert later.id != first.id and later.subject == "acme/widgets#7"

    against(service, scenario)


def test_deliveries_are_remembered_across_a_restart(service: TaskService, tmp_path: Path) -> None:
    made: list[str] = []

    async def before(call: Call) -> None:
        made.append(expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-1")).id)
        expect(Ignored, 200, await deliver(call, "issues", issue_event("edited"), "d-2"))

    against(service, before)
    service.store.close()
    restarted = TaskService(service.config, store=RunStore(tmp_path / "runs.sqlite"))

    async def after(call: Call) -> None:
        assert (
            expect(Task, 200, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-1")).id
            == (made[0])
        )
        assert "'edited'" in expect(Ignored, 200, await deliver(call, "issues", issue_event("edited"), "d-2")).ignored
        # A new delivery for the same issue while its task waits in the queue: the queued task.
        assert expect(Task, 200, await deliver(call, "issues", issue_event("labeled", added="sandbox"))).id == made[0]

    against(restarted, after)
    assert [t["id"] for t in restarted.tasks.recent()] == made


def test_one_access_line_per_request_and_one_line_per_decision(
    service: TaskService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent_sandbox.fleet.service")

    async def scenario(call: Call) -> None:
        expect(Task, 202, await call("POST", "/tasks", {"repo": "widgets", "task": "t"}, token=TOKEN))
        expect(ApiError, 401, await call("GET", "/tasks", token="wrong"))
        expect(Ignored, 200, await deliver(call, "issues", issue_event("edited"), "d-edit"))

    against(service, scenario)
    lines = [r.getMessage() for r in caplog.records if r.name == "agent_sandbox.fleet.service"]
    access = [line for line in lines if line.startswith("http ")]
    assert len(access) == 3, access
    assert re.fullmatch(r"http method=POST path=/tasks status=202 principal=ci duration_ms=[\d.]+", access[0])
    assert re.fullmatch(r"http method=GET path=/tasks status=401 principal=- duration_ms=[\d.]+", access[1])
    assert access[2].startswith("http method=POST path=/webhooks/github status=200 principal=github ")
    assert any(line.startswith("task_queued id=t-") and "principal=ci repo=widgets" in line for line in lines)
    assert any(line.startswith("webhook_ignored delivery=d-edit event=issues.edited reason=") for line in lines)


class FakeSupervisor:
    def __init__(self, run_id: str) -> None:
        self.spec = type("Spec", (), {"run_id": run_id})()


def summary_for(run_id: str, reason: str, run_dir: Path, **extra: Any) -> RunSummary:
    status = STATUS_BY_REASON[reason]
    return RunSummary(
        id=run_id,
        status=status,
        reason=reason,
        message=f"the run ended: {reason}",
        repo="/repo",
        branch=f"sandbox/{run_id}",
        base_commit="c" * 40,
        cost_usd=0.0123,
        duration_s=3.0,
        exit_code=int(EXIT_BY_REASON[reason]),
        run_dir=str(run_dir),
        **extra,
    )


def run_queue(service: TaskService, scenario: Callable[[Call], Awaitable[None]]) -> None:
    """Run a scenario with one worker taking tasks, then wait until the queue is empty and nothing runs."""

    async def with_worker(call: Call) -> None:
        worker = asyncio.create_task(service.worker())
        try:
            await scenario(call)
            for _ in range(200):
                if all(t["status"] in ("done", "failed") for t in service.tasks.recent()):
                    break
                await asyncio.sleep(0.05)
        finally:
            worker.cancel()
        service.comments.close()

    against(service, with_worker)


def test_a_task_is_done_only_when_its_run_succeeded(
    service: TaskService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent_sandbox.fleet.service")
    outcomes = {"fine": "completed", "checked": "check", "slow": "timeout"}

    def fake_run(req: RunRequest, on_start: Callable[[Any], None]) -> RunSummary:
        if req.task == "bad":
            raise UsageError("no such base ref")
        run_id = f"r-{req.task}"
        on_start(FakeSupervisor(run_id))
        return summary_for(run_id, outcomes[req.task or ""], tmp_path)

    service.run_task = fake_run
    ids: dict[str, str] = {}

    async def scenario(call: Call) -> None:
        for text in ("fine", "checked", "slow", "bad"):
            ids[text] = expect(
                Task, 202, await call("POST", "/tasks", {"repo": "widgets", "task": text}, token=TOKEN)
            ).id

    run_queue(service, scenario)
    got = {text: service.get(task_id) for text, task_id in ids.items()}
    assert got["fine"] and got["fine"].status == "done" and got["fine"].error is None
    assert got["fine"].summary and got["fine"].summary["status"] == "succeeded"
    assert got["checked"] and got["checked"].status == "failed" and got["checked"].summary
    assert got["checked"].error == "run r-checked failed (check): the run ended: check"
    assert got["slow"] and (got["slow"].status, got["slow"].run_id) == ("failed", "r-slow")
    assert got["slow"].error and "killed (timeout)" in got["slow"].error
    assert got["bad"] and (got["bad"].status, got["bad"].error, got["bad"].summary) == (
        "failed",
        "no such base ref",
        None,
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "agent_sandbox.fleet.service"]
    assert f"task_running id={ids['fine']} run_id=r-fine" in lines
    assert f"task_done id={ids['fine']} run_id=r-fine reason='completed'" in lines
    assert (
        f"task_failed id={ids['checked']} run_id=r-checked reason='run r-checked failed (check): the run ended: check'"
        in lines
    )
    assert f"task_failed id={ids['bad']} run_id=- reason='no such base ref'" in lines


def test_a_restart_gives_a_task_whose_run_ended_the_runs_outcome(service: TaskService, tmp_path: Path) -> None:
    """A run that finished while the service was stopping (its task still marked running): the task takes the
    run's summary and outcome, and nothing is reaped from the engine (recover() would need Docker to)."""
    for n, reason in enumerate(("completed", "check")):
        run_id, run_dir = f"r-{n}", tmp_path / f"run-{n}"
        run_dir.mkdir()
        summary = summary_for(run_id, reason, run_dir)
        (run_dir / "summary.json").write_text(summary.model_dump_json())
        service.store.run_started(
            {
                "id": run_id,
                "repo": "/repo",
                "base_commit": "c" * 40,
                "task": "t",
                "policy": "default",
                "policy_sha256": "0" * 64,
                "status": str(summary.status),
                "started_at": float(n),
                "run_dir": str(run_dir),
            }
        )
        service.tasks.add(f"t-{n}", "api", "ci", "widgets", "{}")
        assert service.tasks.claim() is not None
        service.tasks.started(f"t-{n}", run_id)
    assert service.recover() == ["t-0", "t-1"]
    done, failed = service.get("t-0"), service.get("t-1")
    assert done and done.status == "done" and done.summary and done.summary["id"] == "r-0"
    assert failed and failed.status == "failed" and failed.summary and failed.error
    assert "failed (check)" in failed.error


def test_a_port_in_use_is_an_environment_error(service: TaskService) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        service.config.port = held.getsockname()[1]
        service.tasks.add("t-run", "api", "ci", "widgets", "{}")
        service.tasks.claim()
        with pytest.raises(EnvironmentNotReady, match=r"cannot listen on 127\.0\.0\.1:\d+") as caught:
            asyncio.run(service.serve())
    assert caught.value.exit_code == ExitCode.ENVIRONMENT
    row = service.tasks.get("t-run")
    assert row and row["status"] == "running", "a service that cannot listen reaps nothing"


def test_sandbox_serve_on_a_port_in_use_exits_3_with_one_line(
    service: TaskService, tmp_path: Path, state_dir: Path
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run(
            [*SANDBOX, "serve", "--config", str(tmp_path / "service.yaml"), "--port", str(port)],
            capture_output=True,
            text=True,
            env={**os.environ, "SANDBOX_STATE_DIR": str(state_dir)},
            cwd=REPO_ROOT,
            timeout=60,
        )
    assert proc.returncode == 3, proc
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def with_github(service: TaskService, fake: FakeGitHub, monkeypatch: pytest.MonkeyPatch, **webhook: Any) -> TaskService:
    """The same service, with a token and the fake GitHub as its API."""
    monkeypatch.setenv("GITHUB_TOKEN", "t0ken")
    cfg = service.config.model_copy(
        update={
            "github": GitHubConfig(api_base=fake.url),
            "webhook": WebhookConfig(**webhook),
        }
    )
    return TaskService(cfg, store=service.store)


def test_an_issue_gets_one_comment_made_at_the_start_and_edited_at_the_end(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    issue = fake_github.add_issue("acme/widgets", labels=["sandbox"])
    svc = with_github(service, fake_github, monkeypatch)

    def fake_run(req: RunRequest, on_start: Callable[[Any], None]) -> RunSummary:
        on_start(FakeSupervisor("r-1"))
        time.sleep(0.3)  # the start comment is made while the run goes
        return summary_for("r-1", "completed", tmp_path, pr_url="https://github.example/acme/widgets/pull/9")

    svc.run_task = fake_run

    async def scenario(call: Call) -> None:
        expect(
            Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox", number=issue["number"]))
        )

    run_queue(svc, scenario)
    comments = fake_github.comments_on("acme/widgets", issue["number"])
    assert len(comments) == 1, comments
    body = comments[0]["body"]
    assert "is **done**" in body and "`r-1`" in body and "$0.0123" in body and "`sandbox/r-1`" in body
    assert "https://github.example/acme/widgets/pull/9" in body
    posted = fake_github.requests_to("POST", r"/repos/acme/widgets/issues/\d+/comments")
    edited = fake_github.requests_to("PATCH", r"/repos/acme/widgets/issues/comments/\d+")
    assert len(posted) == 1 and "is working on this" in posted[0].json["body"]
    assert len(edited) == 1 and edited[0].json["body"] == body


def test_a_late_labelled_delivery_is_judged_by_the_issue_as_it_is_now(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """GitHub does not deliver in order: a `labeled` delivery that arrives after the label was removed again, or
    after the issue was closed, starts nothing; one that still holds takes the issue's current text."""
    unlabelled = fake_github.add_issue("acme/widgets", labels=["bug"])  # the label came and went
    closed = fake_github.add_issue("acme/widgets", labels=["sandbox"])
    fake_github.repo("acme/widgets").issues[closed["number"]]["state"] = "closed"
    edited = fake_github.add_issue("acme/widgets", title="Make x three", body="now three", labels=["sandbox"])
    svc = with_github(service, fake_github, monkeypatch)
    tasks: list[RunRequest] = []

    def fake_run(req: RunRequest, on_start: Callable[[Any], None]) -> RunSummary:
        tasks.append(req)
        on_start(FakeSupervisor("r-1"))
        return summary_for("r-1", "completed", tmp_path)

    svc.run_task = fake_run

    async def scenario(call: Call) -> None:
        # Each payload still shows the label and an open issue, as it was when GitHub sent it.
        gone = issue_event("labeled", added="sandbox", number=unlabelled["number"])
        why = expect(Ignored, 200, await deliver(call, "issues", gone)).ignored
        assert f"'sandbox' label is no longer on issue #{unlabelled['number']}" in why
        late = issue_event("labeled", added="sandbox", number=closed["number"])
        why = expect(Ignored, 200, await deliver(call, "issues", late)).ignored
        assert f"issue #{closed['number']} is closed now" in why
        fresh = issue_event("labeled", added="sandbox", number=edited["number"])
        expect(Task, 202, await deliver(call, "issues", fresh))

    run_queue(svc, scenario)
    assert len(tasks) == 1 and tasks[0].ticket_text is not None
    assert "Make x three" in tasks[0].ticket_text and "now three" in tasks[0].ticket_text
    assert "Make x two" not in tasks[0].ticket_text, "the issue's current text, not the delivery's"


def test_a_failed_comment_never_fails_the_task_and_no_token_means_no_comments(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fake_run(req: RunRequest, on_start: Callable[[Any], None]) -> RunSummary:
        on_start(FakeSupervisor("r-1"))
        return summary_for("r-1", "completed", tmp_path)

    svc = with_github(service, fake_github, monkeypatch)  # no such issue on GitHub: every comment is a 404
    svc.run_task = fake_run

    async def scenario(call: Call) -> None:
        expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox", number=41)))

    run_queue(svc, scenario)
    assert [t["status"] for t in svc.tasks.recent()] == ["done"]
    assert fake_github.requests_to("GET", r"/repos/acme/widgets/issues/41/comments")

    monkeypatch.delenv("GITHUB_TOKEN")
    fake_github.requests.clear()
    quiet = TaskService(svc.config, store=svc.store)
    quiet.run_task = fake_run

    async def again(call: Call) -> None:
        expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox", number=42)))

    run_queue(quiet, again)
    assert fake_github.requests == []


def test_a_sandbox_comment_on_a_runs_pull_request_starts_one_follow_up(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = with_github(service, fake_github, monkeypatch, followup_users=["alice"])
    widgets = svc.config.repos["widgets"]
    svc.store.run_started(
        {
            "id": "r-first",
            "repo": str(Path(widgets.path).resolve()),
            "base_commit": "c" * 40,
            "branch": "sandbox/r-first",
            "task": "t",
            "policy": "strict",
            "policy_sha256": "0" * 64,
            "status": "succeeded",
            "started_at": 1.0,
            "run_dir": "/nowhere",
        }
    )
    pr = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="sandbox-bot")
    stranger = fake_github.add_pull("acme/widgets", head="feature/by-hand")
    issue = fake_github.add_issue("acme/widgets")

    def comment(body: str, user: str = "alice", number: int = pr["number"], action: str = "created") -> dict[str, Any]:
        on_pr = {"pull_request": {"url": "x"}} if number != issue["number"] else {}
        return {
            "action": action,
            "repository": {"full_name": "acme/widgets"},
            "issue": {"number": number, "title": "A PR", "state": "open", **on_pr},
            "comment": {"id": 1, "body": body, "user": {"login": user}},
        }

    async def scenario(call: Call) -> None:
        async def ignored(payload: dict[str, Any], says: str) -> None:
            why = expect(Ignored, 200, await deliver(call, "issue_comment", payload)).ignored
            assert says in why, why

        await ignored(comment("/sandbox make it 3", user="mallory"), "'mallory' is not in webhook.followup_users")
        await ignored(comment("looks good"), "not a `/sandbox <instruction>` command")
        await ignored(comment("/sandbox make it 3", action="edited"), "comment edited")
        await ignored(comment("/sandbox make it 3", number=issue["number"]), "is an issue, not a pull request")
        await ignored(comment("/sandbox make it 3", number=stranger["number"]), "feature/by-hand is not a run's branch")
        await ignored(comment("/sandbox   "), "the `/sandbox` command has no instruction")
        task = expect(Task, 202, await deliver(call, "issue_comment", comment("/sandbox make it 3"), "d-f"))
        assert task.subject == f"acme/widgets#{pr['number']}"
        req = queued_request(svc, task.id)
        assert (req.follow_up, req.task, req.policy) == ("r-first", "make it 3", "strict")
        # Redelivered, or asked again while it is queued: the same task.
        assert (
            expect(Task, 200, await deliver(call, "issue_comment", comment("/sandbox make it 3"), "d-f")).id == task.id
        )
        assert expect(Task, 200, await deliver(call, "issue_comment", comment("/sandbox and 4"))).id == task.id

    against(svc, scenario)
    assert len(svc.tasks.recent()) == 1
