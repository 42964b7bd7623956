"""A sweep's decisions on the in-memory backend (tests/memory_backend.py): every repository gets its row, a
repository that fails does not stop the others, a rerun the same day skips what is done and spends only what
is left of the day's budget, the order rotates from day to day, a failed push is a failed row, and each run
goes through the real runner, supervisor and store. test_fleet_e2e.py runs sweeps against real containers."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.errors import ExitCode
from agent_sandbox.fleet.sweep import SweepBudgetSpent, _one_at_a_time, load_summary, run_sweep
from agent_sandbox.run import watch as watch_module
from agent_sandbox.store import RunStore
from tests.memory_backend import READY, MemoryBackend, Running, idle

MODEL = "claude-sonnet-4-5"


def completing() -> dict[str, Callable[[Running], int | None]]:
    """A run whose agent finishes, backed by one model call through the gateway (and changes nothing)."""

    def sidecar(w: Running) -> int:
        w.say(READY)
        w.sleep(0.05)
        w.say(
            {
                "event": "model_call",
                "n": 2,
                "call": 1,
                "path": "/v1/messages",
                "status": 200,
                "stream": True,
                "model": MODEL,
                "usage": {"input_tokens": 10, "output_tokens": 5},
                "cost_usd": 0.01,
                "spent_usd": 0.01,
                "budget_usd": 5.0,
                "duration_ms": 3,
                "stop_reason": "end_turn",
            }
        )
        return idle(w)

    def agent(w: Running) -> int:
        # Longer than the 1 s wall clock one entry sets (its containers' deadline says so): that run is killed;
        # the others answer at once.
        short_wall = int(w.workload.env["SANDBOX_DEADLINE_SECONDS"]) < 200
        w.sleep(1.2 if short_wall else 0.15)
        w.say({"type": "result", "subtype": "success", "is_error": False, "num_turns": 1, "result": "done"})
        return 0

    return {"sidecar": sidecar, "agent": agent}


def _model_call(cost: float) -> dict[str, Any]:
    return {
        "event": "model_call",
        "n": 2,
        "call": 1,
        "path": "/v1/messages",
        "status": 200,
        "stream": True,
        "model": MODEL,
        "usage": {"input_tokens": 10, "output_tokens": 5},
        "cost_usd": cost,
        "spent_usd": cost,
        "budget_usd": 5.0,
        "duration_ms": 3,
        "stop_reason": "end_turn",
    }


def _ask(f: Any, request: dict[str, Any]) -> dict[str, Any]:
    f.write(json.dumps(request).encode() + b"\n")
    f.flush()
    answer: dict[str, Any] = json.loads(f.readline())
    return answer


def paid(
    cost: float, finaliser: Callable[[Running], int | None] | None = None
) -> dict[str, Callable[[Running], int | None]]:
    """A run whose agent finishes after one model call of `cost`, which its sidecar books in the sweep's shared
    ledger as the real gateway does (reserve, then settle, over the socket mounted at /sandbox/budget)."""

    def sidecar(w: Running) -> int:
        w.say(READY)
        w.sleep(0.05)
        broker = next((m.source for m in w.workload.mounts if m.target == "/sandbox/budget"), None)
        if broker is not None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(Path(broker) / "broker.sock"))
                f = sock.makefile("rwb")
                assert _ask(f, {"op": "reserve", "id": 1, "usd": cost, "wait": 5})["ok"]
                assert _ask(f, {"op": "settle", "id": 1, "usd": cost})["ok"]
        w.say(_model_call(cost))
        return idle(w)

    def agent(w: Running) -> int:
        w.sleep(0.15)
        w.say({"type": "result", "subtype": "success", "is_error": False, "num_turns": 1, "result": "done"})
        return 0

    return {"sidecar": sidecar, "agent": agent, **({"finaliser": finaliser} if finaliser else {})}


def _agents(backend: MemoryBackend) -> int:
    return [w.role for w in backend.started].count("agent")


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_DISK_QUOTA", "sampled")
    monkeypatch.setenv("SANDBOX_CONFIG", str(tmp_path / "no-config.yaml"))
    monkeypatch.setattr(watch_module, "STOP_GRACE", 0.2)


def _manifest(tmp_path: Path, repos: list[dict[str, Any]], **extra: Any) -> str:
    (tmp_path / "script.yaml").write_text("turns: []\n")
    m = tmp_path / "sweep.json"
    m.write_text(
        json.dumps(
            {
                "name": "nightly",
                "task": "bump the dependencies",
                "model_script": "script.yaml",
                "concurrency": 3,
                "repos": repos,
                **extra,
            }
        )
    )
    return str(m)


def test_every_repository_gets_its_row_and_a_failure_stays_in_its_own(tmp_path: Path, make_repo: Any) -> None:
    a, b, c = make_repo("a"), make_repo("b"), make_repo("c")
    manifest = _manifest(
        tmp_path, [{"path": str(a)}, {"path": str(b), "timeout": 1}, {"path": str(c), "task": "another"}]
    )
    backend = MemoryBackend(completing())
    s = run_sweep(manifest, backend=backend)
    rows = {(r.repo, i): r for i, r in enumerate(s.rows)}
    statuses = [r.status for r in s.rows]
    assert statuses == ["no_changes", "killed", "no_changes"], [r.message for r in s.rows]
    assert rows[(str(b), 1)].reason == "timeout"
    assert s.exit_code == int(ExitCode.SWEEP_INCOMPLETE)
    # Three real runs went through the runner and the supervisor: in the store, torn down, nothing running.
    assert [w.role for w in backend.started].count("agent") == 3
    assert all(h.torn_down for h in backend.handles.values())
    store = RunStore()
    try:
        ended = [store.get(r.run_id) for r in s.rows if r.run_id]
    finally:
        store.close()
    assert [row["status"] for row in ended if row] == ["succeeded", "killed", "succeeded"]
    assert load_summary("nightly") is not None


def test_a_rerun_the_same_day_skips_what_is_done(tmp_path: Path, make_repo: Any) -> None:
    a, b = make_repo("a"), make_repo("b")
    manifest = _manifest(tmp_path, [{"path": str(a)}, {"path": str(b), "timeout": 1}])
    first = run_sweep(manifest, backend=MemoryBackend(completing()))
    assert [r.status for r in first.rows] == ["no_changes", "killed"]
    again = MemoryBackend(completing())
    second = run_sweep(manifest, backend=again)
    assert second.rows[0].earlier and not second.rows[1].earlier
    assert [w.role for w in again.started].count("agent") == 1, "only the killed repository ran again"
    forced = MemoryBackend(completing())
    run_sweep(manifest, force=True, backend=forced)
    assert [w.role for w in forced.started].count("agent") == 2


DAY = dt.date(2026, 11, 24)


def test_a_rerun_the_same_day_continues_under_what_is_left_of_the_days_budget(tmp_path: Path, make_repo: Any) -> None:
    a, b, c = make_repo("a"), make_repo("b"), make_repo("c")
    repos = [{"path": str(x)} for x in (a, b, c)]
    first = run_sweep(
        _manifest(tmp_path, repos, concurrency=1, budget_usd=0.02), backend=MemoryBackend(paid(0.01)), day=DAY
    )
    assert [r.status for r in first.rows] == ["no_changes", "killed", "skipped"], [r.message for r in first.rows]
    assert first.rows[1].reason == "budget" and first.rows[2].reason == "budget"
    assert first.spent_usd == pytest.approx(0.02) and first.day_spent_usd == pytest.approx(0.02)
    # The operator allows a cent more for the day: the rerun spends only that, first on the repository that had
    # no turn yet; the one stopped earlier keeps its row.
    again = MemoryBackend(paid(0.01))
    manifest = _manifest(tmp_path, repos, concurrency=1, budget_usd=0.03)
    second = run_sweep(manifest, backend=again, day=DAY)
    assert second.order == [str(c), str(b), str(a)]
    assert _agents(again) == 1
    assert [(r.status, r.earlier) for r in second.rows] == [("no_changes", True), ("killed", True), ("killed", False)]
    assert second.spent_usd == pytest.approx(0.01) and second.day_spent_usd == pytest.approx(0.03)
    assert "day's sweep budget of $0.03 was spent" in (second.stopped or "")
    assert second.exit_code == int(ExitCode.SWEEP_INCOMPLETE)
    # The day's budget is spent: the next invocation starts nothing, says why, and leaves the summary as it was.
    spent = MemoryBackend(paid(0.01))
    with pytest.raises(SweepBudgetSpent) as exc:
        run_sweep(manifest, backend=spent, day=DAY)
    assert exc.value.exit_code == ExitCode.BUDGET == 13
    assert "budget of $0.03 for 2026-11-24 (UTC) is spent ($0.0300); nothing started" in exc.value.message
    assert spent.started == []
    assert load_summary("nightly", DAY.isoformat()) == second


def test_the_order_rotates_so_that_a_budget_for_one_run_a_day_reaches_every_repository(
    tmp_path: Path, make_repo: Any
) -> None:
    paths = [str(make_repo(n)) for n in "abc"]
    manifest = _manifest(tmp_path, [{"path": p} for p in paths], concurrency=1, budget_usd=0.01)
    turns = []
    for i in range(3):
        backend = MemoryBackend(paid(0.01))
        s = run_sweep(manifest, backend=backend, day=DAY + dt.timedelta(days=i))
        assert _agents(backend) == 1
        ran = [r.repo for r in s.rows if r.run_id]
        assert ran == [s.order[0]] == [s.rotation_start]
        turns += ran
    assert turns == paths, "each day starts with the first repository that got no turn the day before"


def packing(repo: Path, branch: str) -> Callable[[Running], int]:
    """A finaliser that packs one commit onto the branch, as the real one packs the agent's work."""

    def finaliser(w: Running) -> int:
        out = w.mount("/sandbox/out")
        with tempfile.TemporaryDirectory() as work:

            def git(*args: str) -> str:
                return subprocess.run(["git", "-C", work, *args], check=True, capture_output=True, text=True).stdout

            git("clone", "-q", str(repo), ".")
            Path(work, "a.py").write_text("x = 2\n")
            git("-c", "user.name=agent", "-c", "user.email=agent@example.invalid", "commit", "-qam", "bump")
            git("checkout", "-q", "-b", branch)
            git("bundle", "create", "-q", str(out / "work.bundle"), branch)
            head = git("rev-parse", "HEAD").strip()
        (out / "result.json").write_text(json.dumps({"status": "packed", "head": head}))
        return 0

    return finaliser


def test_a_run_whose_push_failed_is_a_failed_row(tmp_path: Path, make_repo: Any) -> None:
    repo = make_repo("a")
    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin", str(tmp_path / "gone.git")], check=True)
    manifest = _manifest(tmp_path, [{"path": str(repo), "push": True}])
    backend = MemoryBackend(paid(0.01, finaliser=packing(repo, f"sandbox/nightly/{DAY.isoformat()}")))
    s = run_sweep(manifest, backend=backend, day=DAY)
    row = s.rows[0]
    assert (row.status, row.reason, row.pushed, row.files_changed) == ("failed", "push", False, 1), row.message
    assert "retry with `sandbox push" in row.message
    assert s.exit_code == int(ExitCode.SWEEP_INCOMPLETE)


def test_a_second_invocation_of_a_sweep_waits_for_the_first_to_end() -> None:
    events: list[str] = []

    def second() -> None:
        with _one_at_a_time("nightly", None):
            events.append("second starts")

    with _one_at_a_time("nightly", None):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.4)
        events.append("first ends")
    t.join(5)
    assert events == ["first ends", "second starts"]
