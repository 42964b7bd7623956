"""Attacks on the task service, in process and without Docker (the same harness as test_service_api.py): what
an outsider who can comment on or label issues, or reach the port, can make it do, and what an honest GitHub
(redeliveries, concurrent deliveries, API failures) can make it do wrong."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from agent_sandbox.fleet.service import ApiError, Ignored, Task, TaskService
from agent_sandbox.run.request import RunRequest
from agent_sandbox.run.spec import RunSummary

from .fake_github import FakeGitHub
from .fake_github import fake_github_fixture as fake_github_fixture  # a fixture
from .test_service_api import (
    OTHER,
    TOKEN,
    Call,
    FakeSupervisor,
    against,
    deliver,
    expect,
    issue_event,
    queued_request,
    run_queue,
    sign,
    summary_for,
    with_github,
)
from .test_service_api import service as service  # a fixture


def raw_post(call: Call, body: bytes, **headers: str) -> Any:
    return call("POST", "/webhooks/github", raw=body, headers=headers)


# --- signatures and delivery ids -----------------------------------------------------------------------------


def test_unsigned_wrongly_signed_or_resigned_deliveries_are_refused_and_not_remembered(service: TaskService) -> None:
    body = json.dumps(issue_event("labeled", added="sandbox")).encode()
    other = json.dumps(issue_event("labeled", added="sandbox", number=8)).encode()

    async def scenario(call: Call) -> None:
        base = {"x-github-event": "issues", "x-github-delivery": "d-x"}
        for sig in (
            None,  # no header
            "",
            sign(other),  # a valid signature over a different body
            sign(body).replace("sha256=", "sha1="),
            sign(body).upper(),
            sign(body)[:-1],
            sign(body) + "0",
            "sha256=" + "é" * 64,  # not ASCII: must be a 401, not a crash
        ):
            headers = {**base, **({"x-hub-signature-256": sig} if sig is not None else {})}
            expect(ApiError, 401, await raw_post(call, body, **headers))
        assert service.tasks.delivery("d-x") is None
        assert service.tasks.recent() == []
        # A body with a byte that is not UTF-8 in the signature header: also 401.
        status, _ = await raw_post(call, body, **base, **{"x-hub-signature-256": "sha256=\udcff"})
        assert status in (400, 401)

    against(service, scenario)


def test_a_signature_made_with_another_secret_or_no_secret_configured(
    service: TaskService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(call: Call) -> None:
        expect(ApiError, 401, await deliver(call, "issues", issue_event("labeled", added="sandbox"), secret="x"))
        monkeypatch.setenv("SANDBOX_WEBHOOK_SECRET", "")
        # An empty secret: webhooks are off (an HMAC with an empty key is no secret at all).
        expect(ApiError, 404, await deliver(call, "issues", issue_event("labeled", added="sandbox"), secret=""))
        assert service.tasks.recent() == []

    against(service, scenario)


def test_a_reused_delivery_id_with_another_body_or_event_queues_nothing_new(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        first = expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-1"))
        again = await deliver(call, "issues", issue_event("labeled", added="sandbox", number=8), "d-1")
        assert expect(Task, 200, again).id == first.id
        expect(Task, 200, await deliver(call, "issue_comment", {"action": "created"}, "d-1"))
        ignored = expect(Ignored, 200, await deliver(call, "ping", {"zen": "z"}, "d-2"))
        assert "ping" in ignored.ignored
        why = expect(
            Ignored, 200, await deliver(call, "issues", issue_event("labeled", added="sandbox", number=9), "d-2")
        )
        assert "d-2 was handled before" in why.ignored
        assert [t["id"] for t in service.tasks.recent()] == [first.id]

    against(service, scenario)


def test_a_huge_body_is_refused_before_anything_else(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        event = issue_event("labeled", added="sandbox")
        event["issue"]["body"] = "x" * (2 * 1024 * 1024)
        raw = json.dumps(event).encode()
        status, _ = await raw_post(
            call, raw, **{"x-github-event": "issues", "x-github-delivery": "d-big", "x-hub-signature-256": sign(raw)}
        )
        assert status == 413
        assert service.tasks.delivery("d-big") is None and service.tasks.recent() == []
        status, _ = await call("POST", "/tasks", raw=b"{" + b" " * (2 * 1024 * 1024) + b"}", token=TOKEN)
        assert status == 413

    against(service, scenario)


def test_a_malformed_signed_payload_is_a_400_never_a_crash(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        payloads: list[tuple[str, Any]] = [
            ("issues", {**issue_event("labeled"), "label": "sandbox"}),  # a string where an object goes
            ("issues", {**issue_event("labeled", added="sandbox"), "issue": ["x"]}),
            ("issues", {**issue_event("labeled", added="sandbox"), "repository": "acme/widgets"}),
            (
                "issue_comment",
                {
                    "action": "created",
                    "repository": {"full_name": "acme/widgets"},
                    "issue": {"number": 1},
                    "comment": "x",
                },
            ),
            (
                "issue_comment",
                {"action": "created", "repository": {"full_name": "acme/widgets"}, "issue": "x", "comment": {}},
            ),
        ]
        for kind, payload in payloads:
            got = await deliver(call, kind, payload)
            assert got[0] in (200, 400), (payload, got)
        for body in (b"[]", b"null", b"1", b"\xff\xfe"):
            h = {"x-github-event": "issues", "x-github-delivery": f"d-{body!r}", "x-hub-signature-256": sign(body)}
            expect(ApiError, 400, await raw_post(call, body, **h))
        assert service.tasks.recent() == []

    against(service, scenario)


# --- what triggers a task -------------------------------------------------------------------------------------


def test_repositories_not_configured_or_under_another_owner_are_ignored(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        for repo in ("mallory/widgets", "acme/widgets-fork", "acme/widget", "acme/widgets/", " acme/widgets", "acme"):
            why = expect(
                Ignored, 200, await deliver(call, "issues", issue_event("labeled", added="sandbox", repo=repo))
            )
            assert "is not configured" in why.ignored, (repo, why)
        assert service.tasks.recent() == []

    against(service, scenario)


def test_a_repository_named_in_another_case_is_the_same_repository_and_the_same_subject(service: TaskService) -> None:
    """GitHub's owner and repository names are case-insensitive (no one else can own ACME/Widgets): a delivery
    naming the configured repository in another case maps to it, and shares its one active task."""

    async def scenario(call: Call) -> None:
        first = expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox")))
        got = await deliver(call, "issues", issue_event("labeled", added="sandbox", repo="ACME/Widgets"))
        assert expect(Task, 200, got).id == first.id
        assert len(service.tasks.recent()) == 1

    against(service, scenario)


def test_labels_that_merely_look_like_the_label_never_trigger(service: TaskService) -> None:
    """Only adding exactly the configured label triggers: GitHub lets only people with triage access label an
    issue, and lookalikes (a Cyrillic a, a trailing space, a zero-width space) are other labels."""

    async def scenario(call: Call) -> None:
        for n, name in enumerate(("sаndbox", "sandbox ", " sandbox", "sand\u200bbox", "sandbox\n", "", None)):
            got = await deliver(call, "issues", issue_event("labeled", added=name, number=100 + n))
            assert "label added is" in expect(Ignored, 200, got).ignored
        # `labeled` by whoever GitHub lets label the issue (docs/service.md: adding the label is the trigger).
        event = {**issue_event("labeled", added="sandbox"), "sender": {"login": "anyone"}}
        expect(Task, 202, await deliver(call, "issues", event))

    against(service, scenario)


def test_many_concurrent_deliveries_for_one_issue_make_one_task(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        got = await asyncio.gather(
            *(deliver(call, "issues", issue_event("labeled", added="sandbox")) for _ in range(25)),
            *(deliver(call, "issues", issue_event("labeled", added="sandbox"), "d-same") for _ in range(10)),
        )
        assert sorted(status for status, _ in got).count(202) == 1, got
        assert {Task.model_validate(body).id for _, body in got} == {service.tasks.recent()[0]["id"]}
        assert len(service.tasks.recent()) == 1

    against(service, scenario)


# --- follow-ups ----------------------------------------------------------------------------------------------


def a_run_on(svc: TaskService, branch: str = "sandbox/r-first", run_id: str = "r-first") -> None:
    widgets = svc.config.repos["widgets"]
    svc.store.run_started(
        {
            "id": run_id,
            "repo": str(Path(widgets.path).resolve()),
            "base_commit": "c" * 40,
            "branch": branch,
            "task": "t",
            "policy": "strict",
            "policy_sha256": "0" * 64,
            "status": "succeeded",
            "started_at": 1.0,
            "run_dir": "/nowhere",
        }
    )


def comment(
    number: int, body: str = "/sandbox make it 3", user: str = "alice", action: str = "created"
) -> dict[str, Any]:
    return {
        "action": action,
        "repository": {"full_name": "acme/widgets"},
        "issue": {"number": number, "title": "A PR", "state": "open", "pull_request": {"url": "x"}},
        "comment": {"id": 1, "body": body, "user": {"login": user}},
        "sender": {"login": user},
    }


def as_fork(fake: FakeGitHub, number: int, owner: str = "mallory") -> None:
    """Make a pull request come from a fork, as GitHub describes it: head.repo is the fork, head.label owner:ref."""
    with fake._lock:
        pr = fake.repo("acme/widgets").pulls[number]
        pr["head"]["repo"] = {"full_name": f"{owner}/widgets", "fork": True}
        pr["head"]["label"] = f"{owner}:{pr['head']['ref']}"
        pr["base"]["repo"] = {"full_name": "acme/widgets"}


def test_a_follow_up_on_a_forks_branch_named_like_a_runs_branch_is_ignored(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork's pull request whose head branch is named sandbox/r-first is not the run's pull request: even an
    allowed user's /sandbox comment on it must not continue the run (nor comment there as if it were)."""
    svc = with_github(service, fake_github, monkeypatch, followup_users=["alice"])
    a_run_on(svc)
    fork = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="mallory")
    as_fork(fake_github, fork["number"])
    gone = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="mallory")
    with fake_github._lock:
        fake_github.repo("acme/widgets").pulls[gone["number"]]["head"]["repo"] = None  # the fork was deleted

    async def scenario(call: Call) -> None:
        for number in (fork["number"], gone["number"]):
            why = expect(Ignored, 200, await deliver(call, "issue_comment", comment(number))).ignored
            assert "fork" in why or "not this repository" in why, why

    against(svc, scenario)
    assert svc.tasks.recent() == []


def test_a_follow_up_on_the_runs_own_pull_request_still_works_with_head_repo(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = with_github(service, fake_github, monkeypatch, followup_users=["alice"])
    a_run_on(svc)
    pr = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="sandbox-bot")
    as_fork(fake_github, pr["number"], owner="acme")  # head.repo is the repository itself

    async def scenario(call: Call) -> None:
        task = expect(Task, 202, await deliver(call, "issue_comment", comment(pr["number"])))
        assert queued_request(svc, task.id).follow_up == "r-first"

    against(svc, scenario)


def test_a_pull_request_branch_crafted_to_look_like_a_runs_branch_is_not_one(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = with_github(service, fake_github, monkeypatch, followup_users=["alice"])
    a_run_on(svc)
    crafted = [
        "sandbox/r-first ",
        "Sandbox/r-first",
        "sandbox/r-first/x",
        "sandbox/r-%",
        "sandbox/r-_irst",
        "refs/heads/sandbox/r-first",
        "sandbox/r-first\u200b",
    ]
    prs = [fake_github.add_pull("acme/widgets", head=h) for h in crafted]

    async def scenario(call: Call) -> None:
        for pr in prs:
            why = expect(Ignored, 200, await deliver(call, "issue_comment", comment(pr["number"]))).ignored
            assert "is not a run's branch" in why, why

    against(svc, scenario)
    assert svc.tasks.recent() == []


def test_follow_up_users_are_matched_as_github_matches_logins(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logins are case-insensitive on GitHub (ALICE is alice, no one else can have it); lookalikes, a removed user
    and the sender of an edit are not allowed users."""
    svc = with_github(service, fake_github, monkeypatch, followup_users=["Alice"])
    a_run_on(svc)
    pr = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="sandbox-bot")

    async def scenario(call: Call) -> None:
        for user in ("bob", "аlice", "alice ", "alice\u200b", "", "alice[bot]"):
            why = expect(Ignored, 200, await deliver(call, "issue_comment", comment(pr["number"], user=user))).ignored
            assert "not in webhook.followup_users" in why, (user, why)
        for action in ("edited", "deleted"):
            why = expect(Ignored, 200, await deliver(call, "issue_comment", comment(pr["number"], action=action)))
            assert f"comment {action}" in why.ignored
        # Only an allowed user's comment reaches GitHub's API: outsiders cannot make the service call it.
        assert fake_github.requests_to("GET", r"/repos/acme/widgets/pulls/\d+") == []
        task = expect(Task, 202, await deliver(call, "issue_comment", comment(pr["number"], user="aLiCe")))
        assert queued_request(svc, task.id).follow_up == "r-first"

    against(svc, scenario)

    removed = with_github(service, fake_github, monkeypatch, followup_users=[])
    svc.tasks.ended(svc.tasks.recent()[0]["id"], "done", None, None, None)

    async def after(call: Call) -> None:
        why = expect(Ignored, 200, await deliver(call, "issue_comment", comment(pr["number"])))
        assert "not in webhook.followup_users" in why.ignored

    against(removed, after)


def test_a_github_failure_reading_the_pull_request_can_be_redelivered(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GitHub failing while the service reads the pull request's branch is not an answer to the delivery: it is
    not remembered, so GitHub's "Redeliver" makes the follow-up once GitHub is back."""
    svc = with_github(service, fake_github, monkeypatch, followup_users=["alice"])
    a_run_on(svc)
    pr = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="sandbox-bot")
    # The token expired (or lacks a permission): fixed, the operator redelivers.
    fake_github.fail_next(1, status=401, message="Bad credentials", path=r"/repos/acme/widgets/pulls/\d+")

    async def scenario(call: Call) -> None:
        status, body = await deliver(call, "issue_comment", comment(pr["number"]), "d-f")
        assert status == 502 and "Bad credentials" in body["error"], (status, body)
        assert svc.tasks.delivery("d-f") is None and svc.tasks.recent() == []
        task = expect(Task, 202, await deliver(call, "issue_comment", comment(pr["number"]), "d-f"))
        assert queued_request(svc, task.id).follow_up == "r-first"

    against(svc, scenario)


def test_a_follow_up_is_answered_while_every_default_thread_runs_a_task(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Runs take hours; reading a pull request must not wait for a thread that a run holds."""
    svc = with_github(service, fake_github, monkeypatch, followup_users=["alice"])
    a_run_on(svc)
    pr = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="sandbox-bot")
    release = threading.Event()

    def slow_run(req: RunRequest, on_start: Callable[[Any], None]) -> RunSummary:
        on_start(FakeSupervisor("r-slow"))
        release.wait(20)
        return summary_for("r-slow", "completed", tmp_path)

    svc.run_task = slow_run

    async def scenario(call: Call) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        try:
            expect(Task, 202, await call("POST", "/tasks", {"repo": "widgets", "task": "long"}, token=TOKEN))
            for _ in range(100):
                if svc.tasks.recent()[0]["status"] == "running":
                    break
                await asyncio.sleep(0.02)
            started = time.monotonic()
            got = await asyncio.wait_for(deliver(call, "issue_comment", comment(pr["number"])), 10)
            expect(Task, 202, got)
            assert time.monotonic() - started < 5
        finally:
            release.set()

    run_queue(svc, scenario)


# --- comments and the token ----------------------------------------------------------------------------------


def test_github_failures_while_commenting_never_fail_the_task(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    issue = fake_github.add_issue("acme/widgets", labels=["sandbox"])
    svc = with_github(service, fake_github, monkeypatch)
    fake_github.fail_next(20, status=422, message="Validation Failed", path=r"/repos/acme/widgets/issues/.*")

    def fake_run(req: RunRequest, on_start: Callable[[Any], None]) -> RunSummary:
        on_start(FakeSupervisor("r-1"))
        return summary_for("r-1", "completed", tmp_path)

    svc.run_task = fake_run

    async def scenario(call: Call) -> None:
        event = issue_event("labeled", added="sandbox", number=issue["number"])
        expect(Task, 202, await deliver(call, "issues", event))

    run_queue(svc, scenario)
    assert [t["status"] for t in svc.tasks.recent()] == ["done"]
    assert [r.status for r in fake_github.requests] and {r.status for r in fake_github.requests} == {422}


def test_the_token_goes_only_to_the_configured_api_and_never_into_a_comment_or_answer(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    issue = fake_github.add_issue("acme/widgets", labels=["sandbox"])
    svc = with_github(service, fake_github, monkeypatch)
    monkeypatch.setenv("SANDBOX_GITHUB_API", "http://127.0.0.1:1")  # the config's api_base wins

    def fake_run(req: RunRequest, on_start: Callable[[Any], None]) -> RunSummary:
        on_start(FakeSupervisor("r-1"))
        return summary_for("r-1", "completed", tmp_path, pr_url="https://evil.example/?t=${GITHUB_TOKEN}")

    svc.run_task = fake_run
    answers: list[Any] = []

    async def scenario(call: Call) -> None:
        event = issue_event("labeled", added="sandbox", number=issue["number"])
        event["issue"]["body"] = "${GITHUB_TOKEN} $GITHUB_TOKEN"
        answers.append(await deliver(call, "issues", event))
        answers.append(await call("GET", "/tasks", token=TOKEN))

    run_queue(svc, scenario)
    assert fake_github.requests, "comments were made"
    for rec in fake_github.requests:
        assert rec.headers.get("authorization", "").endswith("t0ken")
        assert "t0ken" not in json.dumps(rec.json)
    assert "t0ken" not in json.dumps(answers)
    assert "t0ken" not in json.dumps(svc.tasks.recent())


# --- the bearer-token API ------------------------------------------------------------------------------------


def test_a_token_sees_and_queues_only_on_its_repositories(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        mine = expect(Task, 202, await call("POST", "/tasks", {"repo": "widgets", "task": "t"}, token=TOKEN))
        hook = expect(Task, 202, await deliver(call, "issues", issue_event("labeled", added="sandbox")))
        for path in (f"/tasks/{mine.id}", f"/tasks/{hook.id}", f"/tasks/{mine.id}/events"):
            expect(ApiError, 404, await call("GET", path, token=OTHER))
        expect(ApiError, 403, await call("POST", "/tasks", {"repo": "widgets", "task": "t"}, token=OTHER))
        assert await call("GET", "/tasks", token=OTHER) == (200, [])
        for bad in ("Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer é"):
            expect(ApiError, 401, await call("GET", "/tasks", headers={"authorization": bad}))
        # A token's own tasks are listed even when other repositories' tasks flood the queue.
        theirs = expect(Task, 202, await call("POST", "/tasks", {"repo": "gadgets", "task": "t"}, token=OTHER))
        for _ in range(205):
            expect(Task, 202, await call("POST", "/tasks", {"repo": "widgets", "task": "t"}, token=TOKEN))
        listed = (await call("GET", "/tasks", token=OTHER))[1]
        assert [t["id"] for t in listed] == [theirs.id]

    against(service, scenario)


def test_a_bearer_token_that_is_not_utf8_is_a_401_not_a_crash(service: TaskService) -> None:
    async def scenario(call: Call) -> None:
        status, _ = await call("GET", "/tasks", headers={"authorization": "Bearer \udcff"})
        assert status == 401

    against(service, scenario)


# --- the deliveries table ------------------------------------------------------------------------------------


def test_the_deliveries_table_does_not_grow_without_bound(service: TaskService) -> None:
    """Every comment anyone makes on any issue is a signed delivery: remembering each forever is a disk an outsider
    fills. GitHub redelivers only recent deliveries, so old ones are forgotten (the tasks stay)."""
    old = time.time() - 60 * 86400
    for n in range(500):
        service.tasks.record_delivery(f"d-old-{n}", "issue_comment.created", None, "not a command")
    service.store.db.execute("UPDATE deliveries SET received_at = ?", (old,))

    async def scenario(call: Call) -> None:
        expect(Ignored, 200, await deliver(call, "ping", {"zen": "z"}, "d-new"))

    against(service, scenario)
    count = service.store.db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    assert count == 1, count
    assert service.tasks.delivery("d-new") is not None


def test_an_events_stream_whose_client_left_ends(service: TaskService, caplog: pytest.LogCaptureFixture) -> None:
    """Following a queued task's events, then hanging up, must not leave a handler polling the store until the
    task ends (hours later): a client that opens and drops streams would pile them up."""
    caplog.set_level(logging.INFO, logger="agent_sandbox.fleet.service")
    auth = {"authorization": f"Bearer {TOKEN}"}

    async def go() -> None:
        # As serve() runs it: aiohttp's AppRunner does not cancel a handler whose client left (TestServer does).
        runner = web.AppRunner(service.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with ClientSession() as session:
                resp = await session.post(f"{base}/tasks", json={"repo": "widgets", "task": "t"}, headers=auth)
                task_id = (await resp.json())["id"]
            for _ in range(3):
                async with ClientSession() as session:
                    stream = await session.get(f"{base}/tasks/{task_id}/events", headers=auth)
                    assert stream.status == 200
                    stream.close()
            ended: list[str] = []
            for _ in range(50):
                ended = [r.getMessage() for r in caplog.records if f"path=/tasks/{task_id}/events " in r.getMessage()]
                if len(ended) == 3:
                    break
                await asyncio.sleep(0.1)
            assert len(ended) == 3, "a stream whose client left is still being followed"
        finally:
            await runner.cleanup()

    asyncio.run(go())


def test_a_follow_up_on_a_closed_or_merged_pull_request_is_ignored(
    service: TaskService, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pull request that is done with gets no new work pushed onto its branch, whoever asks."""
    svc = with_github(service, fake_github, monkeypatch, followup_users=["alice"])
    a_run_on(svc)
    closed = fake_github.add_pull("acme/widgets", head="sandbox/r-first", user="sandbox-bot")
    as_fork(fake_github, closed["number"], owner="acme")
    fake_github.close_pull("acme/widgets", closed["number"])

    async def scenario(call: Call) -> None:
        why = expect(Ignored, 200, await deliver(call, "issue_comment", comment(closed["number"]))).ignored
        assert "is closed" in why, why

    against(svc, scenario)
    assert svc.tasks.recent() == []
