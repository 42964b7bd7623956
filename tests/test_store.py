"""The run store's named queries: `sandbox ls`'s filters, and the task service's queue. No Docker needed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.store import RunStore, TaskStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "runs.sqlite")
    yield s
    s.close()


def _run(store: RunStore, run_id: str, repo: str, status: str, started_at: float) -> None:
    row: dict[str, Any] = {
        "id": run_id,
        "repo": repo,
        "base_commit": "c" * 40,
        "task": "t",
        "policy": "default",
        "policy_sha256": "0" * 64,
        "status": status,
        "started_at": started_at,
        "run_dir": f"/runs/{run_id}",
    }
    store.run_started(row)


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in rows]


def test_list_runs_filters_newest_first(store: RunStore) -> None:
    _run(store, "r1", "/a", "succeeded", 100)
    _run(store, "r2", "/b", "failed", 200)
    _run(store, "r3", "/a", "failed", 300)
    assert ids(store.list_runs()) == ["r3", "r2", "r1"]
    assert ids(store.list_runs(repo="/a")) == ["r3", "r1"]
    assert ids(store.list_runs(status="failed")) == ["r3", "r2"]
    assert ids(store.list_runs(since=200)) == ["r3", "r2"]
    assert ids(store.list_runs(repo="/a", status="failed", since=250)) == ["r3"]
    assert ids(store.list_runs(limit=1)) == ["r3"]
    assert store.list_runs(repo="/nowhere") == []


def test_the_task_queue_hands_out_each_task_once_in_order(store: RunStore) -> None:
    q = TaskStore(store)
    assert q.claim() is None
    for i in range(3):
        q.add(f"t{i}", "api", "ci", "widgets", f'{{"n": {i}}}')
    assert [t["status"] for t in q.recent()] == ["queued"] * 3
    assert q.claim() == ("t0", '{"n": 0}')
    q.started("t0", "run-0")
    assert [t["id"] for t in q.running()] == ["t0"] and q.get("t0")["run_id"] == "run-0"
    q.done("t0", "run-0", '{"status": "succeeded"}')
    done = q.get("t0")
    assert done["status"] == "done" and done["summary"] == '{"status": "succeeded"}' and done["ended_at"]
    assert q.claim() == ("t1", '{"n": 1}')
    q.failed("t1", "no such repository")
    assert (q.get("t1")["status"], q.get("t1")["error"]) == ("failed", "no such repository")
    assert q.running() == [] and q.get("nope") is None


def test_concurrent_claims_never_take_a_task_twice(store: RunStore) -> None:
    q = TaskStore(store)
    for i in range(40):
        q.add(f"t{i:02}", "api", "ci", "widgets", "{}")
    taken: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while (claimed := q.claim()) is not None:
            with lock:
                taken.append(claimed[0])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == [f"t{i:02}" for i in range(40)]


def test_deliveries_are_recorded_once_with_their_answer(store: RunStore) -> None:
    q = TaskStore(store)
    assert q.delivery("d-1") is None
    q.add("t1", "webhook", "github", "widgets", "{}", subject="acme/widgets#7", delivery=("d-1", "issues.labeled"))
    assert (q.delivery("d-1") or {})["task_id"] == "t1"
    assert q.record_delivery("d-2", "issues.edited", None, "edited never starts a task")
    assert not q.record_delivery("d-2", "issues.edited", None, "something else"), "a delivery is recorded once"
    assert (q.delivery("d-2") or {})["ignored"] == "edited never starts a task"
    reopened = TaskStore(RunStore(store.path))
    assert (reopened.delivery("d-1") or {})["task_id"] == "t1", "deliveries outlive the process"


def test_a_subject_has_at_most_one_active_task(store: RunStore) -> None:
    q = TaskStore(store)
    q.add("t1", "webhook", "github", "widgets", "{}", subject="acme/widgets#7")
    q.add("t2", "webhook", "github", "widgets", "{}", subject="acme/widgets#8")
    assert (q.active("acme/widgets#7") or {})["id"] == "t1"
    assert q.claim() == ("t1", "{}")
    assert (q.active("acme/widgets#7") or {})["status"] == "running"
    q.ended("t1", "failed", "r-1", '{"status": "killed"}', "run r-1 killed (timeout)")
    row = q.get("t1") or {}
    assert (row["status"], row["run_id"], row["summary"], row["error"]) == (
        "failed",
        "r-1",
        '{"status": "killed"}',
        "run r-1 killed (timeout)",
    )
    assert q.active("acme/widgets#7") is None and q.active("acme/widgets#9") is None


def test_the_latest_run_on_a_branch(store: RunStore) -> None:
    for run_id, branch, at in (("r1", "sandbox/x", 100), ("r2", "sandbox/x", 200), ("r3", "sandbox/y", 300)):
        _run(store, run_id, "/a", "succeeded", at)
        store.update(run_id, branch=branch)
    assert (store.latest_on_branch("/a", "sandbox/x") or {})["id"] == "r2"
    assert store.latest_on_branch("/b", "sandbox/x") is None and store.latest_on_branch("/a", "main") is None


def test_a_store_made_before_webhook_subjects_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "runs.sqlite")
    old.execute(
        "CREATE TABLE tasks (id TEXT PRIMARY KEY, status TEXT NOT NULL, source TEXT NOT NULL, principal TEXT NOT NULL,"
        " repo TEXT NOT NULL, request TEXT NOT NULL, run_id TEXT, summary TEXT, error TEXT, created_at REAL NOT NULL,"
        " started_at REAL, ended_at REAL)"
    )
    old.execute(
        "INSERT INTO tasks (id, status, source, principal, repo, request, created_at) VALUES"
        " ('t0', 'done', 'api', 'ci', 'widgets', '{}', 1)"
    )
    old.commit()
    old.close()
    q = TaskStore(RunStore(tmp_path / "runs.sqlite"))
    assert (q.get("t0") or {})["subject"] is None
    q.add("t1", "webhook", "github", "widgets", "{}", subject="acme/widgets#1")
    assert (q.active("acme/widgets#1") or {})["id"] == "t1"
