"""The task service, as a real process on loopback, running real sandboxed tasks."""

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.fleet.service import Task, hash_token

from .conftest import REPO_ROOT, SANDBOX, labelled

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

    def start(self) -> None:
        env = {**os.environ, "SANDBOX_STATE_DIR": str(self.state), "SANDBOX_WEBHOOK_SECRET": SECRET}
        self.proc = subprocess.Popen(
            [*SANDBOX, "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "no output"
        info = json.loads(line)
        self.url, self.reaped = info["listening"], info["reaped"]

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


def make_config(tmp_path: Path, make_repo, script: str = EDIT, concurrency: int = 1) -> Path:
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
        "webhook": {"label": "sandbox"},
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
    for sig in ("sha256=" + "0" * 64, sign(body, "not-the-secret"), ""):
        status, _ = call(url, "POST", raw=body, headers={"x-github-event": "issues", "x-hub-signature-256": sig})
        assert status == 401
    assert call(f"{service.url}/tasks", token=TOKEN)[1] == []
    unlabelled = json.dumps({**event, "issue": {**event["issue"], "labels": [{"name": "bug"}]}}).encode()
    status, r = call(
        url, "POST", raw=unlabelled, headers={"x-github-event": "issues", "x-hub-signature-256": sign(unlabelled)}
    )
    assert status == 200 and "ignored" in r
    status, t = call(url, "POST", raw=body, headers={"x-github-event": "issues", "x-hub-signature-256": sign(body)})
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
