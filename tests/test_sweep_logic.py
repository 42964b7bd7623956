"""A sweep's decisions on the in-memory backend (tests/memory_backend.py): every repository gets its row, a
repository that fails does not stop the others, a rerun the same day skips what is done, and each run goes
through the real runner, supervisor and store. test_fleet_e2e.py runs sweeps against real containers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.errors import ExitCode
from agent_sandbox.fleet.sweep import load_summary, run_sweep
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
        w.sleep(1.2)  # longer than the 1 s wall clock one entry sets: that run is killed
        w.say({"type": "result", "subtype": "success", "is_error": False, "num_turns": 1, "result": "done"})
        return 0

    return {"sidecar": sidecar, "agent": agent}


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
