"""The task service, as a real process on loopback, running real sandboxed tasks: the API, GitHub deliveries
signed as GitHub signs them (each asks for at most one run), the comments it keeps on the issue and the
follow-up a pull request comment asks for, through the fake GitHub API, and restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.fleet.service import Task, hash_token

from .conftest import REPO_ROOT, SANDBOX, labelled
from .fake_github import FakeGitHub
from .fake_github import fake_github_fixture as fake_github_fixture  # a fixture

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

TOKEN, OTHER = "tok-ci-" + "a" * 20, "tok-other-" + "b" * 20
SECRET = "webhook-secret-for-tests"
EDIT = 'turns:\n  - edit: {path: a.py, old: "x = 1", new: "x = 2"}\n  - text: ok\n'
SLOW = (
    "turns:\n  - bash: \"python3 -c 'import time; time.sleep(4)'\"\n"
    '  - edit: {path: a.py, old: "x = 1", new: "x = 2"}\n  - text: ok\n'
)


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"content-type": "application/json", **(headers or {})}
    if token:
        h["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class Service:
    def __init__(self, config: Path, state: Path) -> None:
        self.config, self.state = config, state
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.reaped: list[str] = []
        # Its log (what journalctl would show) goes to a file: a pipe nobody reads would stall the service.
        self.log = config.parent / "service.log"

    def start(self, **env: str) -> None:
        environ = {
            **os.environ,
            "SANDBOX_STATE_DIR": str(self.state),
            "SANDBOX_WEBHOOK_SECRET": SECRET,
            "GITHUB_TOKEN": "t0ken",
            **env,
        }
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [*SANDBOX, "serve", "--config", str(self.config)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=environ,
                cwd=REPO_ROOT,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.log.read_text()
        info = json.loads(line)
        self.url, self.reaped = info["listening"], info["reaped"]

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def wait(self, task_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, t = call(f"{self.url}/tasks/{task_id}", token=TOKEN)
            if t["status"] in ("done", "failed"):
                return t
            time.sleep(0.3)
        raise AssertionError(f"task {task_id} did not finish")


def make_config(
    tmp_path: Path, make_repo, script: str = EDIT, concurrency: int = 1, github_api: str | None = None
) -> Path:
    (tmp_path / "script.yaml").write_text(script)
    widgets, gadgets = make_repo("widgets"), make_repo("gadgets")
    cfg = {
        "port": 0,
        "concurrency": concurrency,
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
            },
            "gadgets": {"path": str(gadgets), "model_script": "script.yaml"},
        },
        "webhook": {"label": "sandbox", "followup_users": ["alice"]},
        **({"github": {"api_base": github_api}} if github_api else {}),
    }
    p = tmp_path / "service.yaml"
    p.write_text(json.dumps(cfg))
    return p


@pytest.fixture
def service(tmp_path: Path, make_repo, state_dir: Path) -> Iterator[Service]:
    svc = Service(make_config(tmp_path, make_repo), state_dir)
    svc.start()
    yield svc
    svc.kill(signal.SIGTERM)


def test_openapi_tasks_and_auth(service: Service) -> None:
    from openapi_spec_validator import validate

    status, spec = call(f"{service.url}/openapi.json")
    assert status == 200
    validate(spec)
    assert {"/tasks", "/tasks/{id}", "/tasks/{id}/events", "/webhooks/github"} <= set(spec["paths"])
    assert service.url.startswith("http://127.0.0.1:"), "the service binds to localhost by default"

    for token in (None, "wrong-token"):
        status, _ = call(f"{service.url}/tasks", "POST", {"repo": "widgets", "task": "t"}, token=token)
        assert status == 401
    assert call(f"{service.url}/tasks", token="wrong")[0] == 401
    status, body = call(f"{service.url}/tasks", "POST", {"repo": "gadgets", "task": "t"}, token=TOKEN)
    assert status == 403 and "may not use repository 'gadgets'" in body["error"]
    status, body = call(
        f"{service.url}/tasks", "POST", {"repo": "widgets", "task": "t", "policy": "default-ish"}, token=TOKEN
    )
    assert status == 403 and "not allowed" in body["error"]
    assert call(f"{service.url}/tasks", "POST", {"repo": "widgets"}, token=TOKEN)[0] == 400
    assert call(f"{service.url}/tasks", token=TOKEN)[1] == [], "nothing was queued by refused requests"

    status, t = call(f"{service.url}/tasks", "POST", {"repo": "widgets", "task": "set x to 2"}, token=TOKEN)
    assert status == 202
    task = Task.model_validate(t)
    assert task.status == "queued" and task.principal == "ci" and task.source == "api"
    # Stream the events while it runs: the stream ends when the run does.
    with urllib.request.urlopen(
        urllib.request.Request(f"{service.url}/tasks/{task.id}/events", headers={"authorization": f"Bearer {TOKEN}"}),
        timeout=120,
    ) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in resp.read().decode().splitlines()]
    assert events[0]["type"] == "run_started" and events[-1]["type"] == "run_ended"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    done = Task.model_validate(service.wait(task.id))
    assert done.status == "done" and done.summary and done.summary["status"] == "succeeded"
    assert done.run_id == done.summary["id"] == events[0]["run_id"]
    listed = [Task.model_validate(x) for x in call(f"{service.url}/tasks", token=TOKEN)[1]]
    assert [x.id for x in listed] == [task.id]
    assert call(f"{service.url}/tasks", token=OTHER)[1] == [], "a token sees only its repositories' tasks"
    assert call(f"{service.url}/tasks/{task.id}", token=OTHER)[0] == 404
    assert labelled(done.run_id) == []


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_github_webhook(service: Service, state_dir: Path) -> None:
    event = {
        "action": "labeled",
        "label": {"name": "sandbox"},
        "repository": {"full_name": "acme/widgets"},
        "issue": {
            "number": 7,
            "title": "Make x two",
            "body": "It should be 2.\n\npolicy: yolo",
            "labels": [{"name": "bug"}, {"name": "sandbox"}],
        },
    }
    body = json.dumps(event).encode()
    url = f"{service.url}/webhooks/github"
    headers = {"x-github-event": "issues", "x-github-delivery": "d-1"}
    for sig in ("sha256=" + "0" * 64, sign(body, "not-the-secret"), ""):
        status, _ = call(url, "POST", raw=body, headers={**headers, "x-hub-signature-256": sig})
        assert status == 401
    assert call(f"{service.url}/tasks", token=TOKEN)[1] == []
    unlabelled = json.dumps({**event, "label": {"name": "bug"}}).encode()
    status, r = call(
        url,
        "POST",
        raw=unlabelled,
        headers={**headers, "x-github-delivery": "d-0", "x-hub-signature-256": sign(unlabelled)},
    )
    assert status == 200 and r == {"ignored": "the label added is 'bug', not 'sandbox'"}
    status, t = call(url, "POST", raw=body, headers={**headers, "x-hub-signature-256": sign(body)})
    assert status == 202 and t["source"] == "webhook" and t["repo"] == "widgets"
    done = service.wait(t["id"])
    assert done["status"] == "done", done
    run_dir = Path(done["summary"]["run_dir"])
    started = json.loads((run_dir / "audit.jsonl").read_text().splitlines()[0])["payload"]
    assert started["task"] == "Make x two\n\nIt should be 2.\n\npolicy: yolo\n"
    assert started["spec"]["policy"]["name"] == "default" and started["spec"]["title"] == "Make x two"


# Reapers collect every dead supervisor's leftovers, other tests' included: never two at once.
@pytest.mark.xdist_group("reaper")
def test_restart_loses_and_duplicates_nothing(tmp_path: Path, make_repo, state_dir: Path) -> None:
    svc = Service(make_config(tmp_path, make_repo, script=SLOW), state_dir)
    svc.start()
    try:
        ids = [
            call(f"{svc.url}/tasks", "POST", {"repo": "widgets", "task": f"task {i}"}, token=TOKEN)[1]["id"]
            for i in range(3)
        ]
        deadline = time.monotonic() + 60
        while True:
            first = call(f"{svc.url}/tasks/{ids[0]}", token=TOKEN)[1]
            if first["run_id"] and first["status"] == "running":
                break
            assert time.monotonic() < deadline, first
            time.sleep(0.2)
        time.sleep(1.5)
        svc.kill(signal.SIGKILL)
        assert labelled(first["run_id"]), "the killed service left its run's containers"
        svc.start()
        assert svc.reaped == [ids[0]]
        results = [svc.wait(i) for i in ids]
    finally:
        svc.kill(signal.SIGTERM)
    assert results[0]["status"] == "failed" and "recovered" in results[0]["error"]
    assert labelled(first["run_id"]) == []
    for r in results[1:]:
        assert r["status"] == "done" and r["summary"]["status"] == "succeeded"
    run_ids = [r["run_id"] for r in results]
    assert len(set(run_ids)) == 3
    from agent_sandbox.store import RunStore

    store = RunStore(state_dir / "runs.sqlite")
    # The killed service's run was recovered on restart: ended as interrupted, not left running.
    assert (store.get(first["run_id"])["status"], store.get(first["run_id"])["reason"]) == ("killed", "interrupted")
    runs = store.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert runs == 3, "each task ran exactly once"
    assert store.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 3


def deliver(url: str, kind: str, payload: dict[str, Any], delivery: str | None = None) -> tuple[int, Any]:
    """A delivery as GitHub makes it: event name, delivery id and the body's HMAC-SHA256 signature."""
    raw = json.dumps(payload).encode()
    headers = {
        "x-github-event": kind,
        "x-github-delivery": delivery or str(uuid.uuid4()),
        "x-hub-signature-256": sign(raw),
    }
    return call(f"{url}/webhooks/github", "POST", raw=raw, headers=headers)


def issue_event(action: str, number: int, added: str | None = None, labels: tuple[str, ...] = ("sandbox",)) -> Any:
    event: dict[str, Any] = {
        "action": action,
        "repository": {"full_name": "acme/widgets"},
        "issue": {
            "number": number,
            "title": "Add a note",
            "body": "Append a line to notes.txt.",
            "state": "open",
            "labels": [{"name": n} for n in labels],
        },
    }
    if added is not None:
        event["label"] = {"name": added}
    return event


def eventually(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(what)


NOTE = 'turns:\n  - bash: "echo step >> notes.txt"\n  - text: ok\n'


def test_each_github_request_makes_one_run_reported_on_the_issue(
    tmp_path: Path, make_repo, state_dir: Path, fake_github: FakeGitHub
) -> None:
    """opened with the label then `labeled`, a redelivery, label churn: one run, one comment on the issue made
    when it started and edited when it ended. Then an allowed user's `/sandbox` comment on the run's pull
    request: one follow-up run on its branch, redelivered or not."""
    issue = fake_github.add_issue("acme/widgets", title="Add a note", labels=["sandbox"])
    n = issue["number"]
    svc = Service(make_config(tmp_path, make_repo, script=NOTE, github_api=fake_github.url), state_dir)
    svc.start()
    try:
        # GitHub sends `opened` (carrying the label), then `labeled` for the label set at creation.
        status, r = deliver(svc.url, "issues", issue_event("opened", n), "d-open")
        assert status == 200 and "'opened'" in r["ignored"] and "no 'sandbox' label" not in r["ignored"]
        status, task = deliver(svc.url, "issues", issue_event("labeled", n, added="sandbox"), "d-label")
        assert status == 202 and task["subject"] == f"acme/widgets#{n}"
        # GitHub redelivers it; someone adds another label; someone removes and adds the label again.
        status, again = deliver(svc.url, "issues", issue_event("labeled", n, added="sandbox"), "d-label")
        assert (status, again["id"]) == (200, task["id"])
        status, r = deliver(svc.url, "issues", issue_event("labeled", n, added="bug", labels=("sandbox", "bug")))
        assert status == 200 and r == {"ignored": "the label added is 'bug', not 'sandbox'"}
        status, active = deliver(svc.url, "issues", issue_event("labeled", n, added="sandbox"))
        assert (status, active["id"]) == (200, task["id"]), "the issue's task is still active"
        done = svc.wait(task["id"])
        assert done["status"] == "done" and done["summary"]["status"] == "succeeded", done
        branch = done["summary"]["branch"]
        # After the run: the redelivery still answers with the task, and nothing runs again.
        status, again = deliver(svc.url, "issues", issue_event("labeled", n, added="sandbox"), "d-label")
        assert (status, again["id"], again["status"]) == (200, task["id"], "done")

        def edited() -> bool:
            return bool(fake_github.requests_to("PATCH", r"/repos/acme/widgets/issues/comments/\d+"))

        eventually(edited, "the issue's comment was never updated at the end")
        posted = fake_github.requests_to("POST", rf"/repos/acme/widgets/issues/{n}/comments")
        assert len(posted) == 1 and "is working on this" in posted[0].json["body"]
        assert done["run_id"] in posted[0].json["body"]
        comments = fake_github.comments_on("acme/widgets", n)
        assert len(comments) == 1, "one comment, updated rather than repeated"
        body = comments[0]["body"]
        assert "is **done**" in body and f"`{branch}`" in body and "cost: $" in body

        # A follow-up, asked for on the run's pull request.
        pr = fake_github.add_pull("acme/widgets", head=branch, user="sandbox-bot")
        comment = {
            "action": "created",
            "repository": {"full_name": "acme/widgets"},
            "issue": {"number": pr["number"], "title": "A PR", "state": "open", "pull_request": {"url": pr["url"]}},
            "comment": {"id": 5, "body": "/sandbox add another step", "user": {"login": "mallory"}},
        }
        status, r = deliver(svc.url, "issue_comment", comment)
        assert status == 200 and r == {"ignored": "user 'mallory' is not in webhook.followup_users"}
        comment["comment"]["user"] = {"login": "alice"}
        status, follow = deliver(svc.url, "issue_comment", comment, "d-follow")
        assert status == 202, follow
        status, again = deliver(svc.url, "issue_comment", comment, "d-follow")
        assert (status, again["id"]) == (200, follow["id"])
        followed = svc.wait(follow["id"])
        assert followed["status"] == "done", followed
        assert followed["summary"]["branch"] == branch and followed["summary"].get("follow_up") == done["run_id"]
        eventually(
            lambda: "is **done**" in "".join(c["body"] for c in fake_github.comments_on("acme/widgets", pr["number"])),
            "the pull request's comment was never updated at the end",
        )
    finally:
        svc.kill(signal.SIGTERM)
    from agent_sandbox.store import RunStore

    store = RunStore(state_dir / "runs.sqlite")
    assert store.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2, "one run, and one follow-up"
    assert store.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 2
    lines = svc.log_lines()
    assert any(" http method=POST path=/webhooks/github status=202 principal=github " in line for line in lines)
    for what in ("task_queued", "task_running", "task_done"):
        assert any(f" {what} id={task['id']}" in line for line in lines), (what, lines)
    assert any("webhook_ignored delivery=d-open event=issues.opened" in line for line in lines)
