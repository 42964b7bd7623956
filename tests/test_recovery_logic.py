"""The pure logic behind "nothing lost, nothing left running": signal handling, run locks, the state
identity, resuming an audit trail, and gc's decisions on an in-memory backend. The end-to-end faults are in
test_faults_e2e.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.audit import log as audit
from agent_sandbox.audit.log import AuditLog
from agent_sandbox.audit.redact import Redactor
from agent_sandbox.errors import ExitCode
from agent_sandbox.interrupts import Interrupted, _Interrupts
from agent_sandbox.run import liveness
from agent_sandbox.run import orphans as gc
from agent_sandbox.store import RunStore
from tests.memory_backend import MemoryBackend

# --- signals ------------------------------------------------------------------------------------------------


def test_a_signal_before_the_run_stops_it_at_the_next_checkpoint() -> None:
    it = _Interrupts()
    it.checkpoint()  # nothing received: no-op
    it._handler(signal.SIGTERM, None)
    with pytest.raises(Interrupted) as exc:
        it.checkpoint()
    assert exc.value.exit_code == ExitCode.INTERRUPTED and "SIGTERM" in exc.value.message


def test_signals_go_to_the_target_and_never_raise() -> None:
    it = _Interrupts()
    got: list[str] = []
    with it.delivered_to(got.append):
        it._handler(signal.SIGINT, None)  # returns: nothing is thrown into whatever runs
        it._handler(signal.SIGHUP, None)
    assert got == ["SIGINT", "SIGHUP"] and it.received == ["SIGINT", "SIGHUP"]
    # After the block the target is gone; the signal still stops any new run.
    with pytest.raises(Interrupted):
        it.checkpoint()


def test_a_signal_that_came_before_registration_is_delivered_at_once() -> None:
    it = _Interrupts()
    it._handler(signal.SIGTERM, None)
    got: list[str] = []
    with it.delivered_to(got.append):
        assert got == ["SIGTERM"]


def test_a_real_sigterm_reaches_the_target_in_a_process() -> None:
    code = """
import os, signal, time
from agent_sandbox.interrupts import interrupts
interrupts.install()
got = []
with interrupts.delivered_to(got.append):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
print(got)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['SIGTERM', 'SIGINT']"
    assert "still finishing the run" in res.stderr  # the second signal is acknowledged, not acted on


# --- locks and identity -------------------------------------------------------------------------------------


def test_a_run_lock_tells_a_live_supervisor_from_a_dead_one(tmp_path: Path) -> None:
    assert not liveness.supervised(tmp_path)  # no lock file: nobody supervises it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
from pathlib import Path
from agent_sandbox.run.liveness import RunLock
RunLock(Path({str(tmp_path)!r})).acquire()
print("held", flush=True)
time.sleep(60)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert liveness.supervised(tmp_path)
        assert not liveness.RunLock(tmp_path).try_acquire()  # a recoverer cannot take it either
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL drops the lock with the process.
    assert not liveness.supervised(tmp_path)
    lock = liveness.RunLock(tmp_path)
    assert lock.try_acquire()
    # Held in this process, it is held for another open of the same file too (threads of a sweep).
    assert liveness.supervised(tmp_path)
    lock.release()


def test_the_state_identity_is_created_once_even_by_concurrent_first_runs(tmp_path: Path) -> None:
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(liveness.state_id(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids[0]) == 16
    assert liveness.state_id(tmp_path / "other") != ids[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".state-id")] == []


# --- the audit trail after a crash --------------------------------------------------------------------------


def test_a_resumed_trail_drops_a_half_line_and_keeps_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "r1", Redactor([]))
    log.write_untrusted("supervisor", "teardown", {"removed": []})
    log.write_untrusted("supervisor", "teardown", {"removed": ["container:x"]})
    log.close()
    with path.open("ab") as fh:
        fh.write(b'{"seq":3,"time":1,"run_id":"r1","sou')  # the supervisor died mid-write
    resumed, dropped = AuditLog.resume(path, "r1", Redactor([]))
    assert dropped == len(b'{"seq":3,"time":1,"run_id":"r1","sou')
    resumed.write_untrusted("supervisor", "recovery", {"by": "test", "why": "dead", "dropped_bytes": dropped})
    resumed.close()
    ok, n, msg = audit.verify(path, resumed.head)
    assert ok and n == 3, msg
    assert json.loads(path.read_text().splitlines()[-1])["type"] == "recovery"


def test_a_write_that_fails_stops_the_trail_without_breaking_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "r1", Redactor([]))
    log.write_untrusted("supervisor", "teardown", {"removed": []})
    head = log.head
    os.close(log._fd)
    log._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    with pytest.raises(OSError):
        log.write_untrusted("supervisor", "teardown", {"removed": []})
    with pytest.raises(OSError):
        log.write_untrusted("supervisor", "teardown", {"removed": []})  # stopped: nothing half-written follows
    log.close()
    assert log.head == head and log.broken
    assert audit.verify(path, head)[0]


# --- gc's decisions -----------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    s = RunStore(tmp_path / "state" / "runs.sqlite")
    yield s
    s.close()


def _row(store: RunStore, run_id: str, run_dir: Path, status: str = "running") -> None:
    store.run_started(
        {
            "id": run_id,
            "repo": "/r",
            "base_commit": "0" * 40,
            "branch": f"sandbox/{run_id}",
            "task": "t",
            "policy": "default",
            "policy_sha256": "x",
            "status": status,
            "started_at": 1.0,
            "run_dir": str(run_dir),
            "supervisor_pid": 1,
        }
    )


def test_gc_touches_only_its_own_state_directorys_runs(store: RunStore, tmp_path: Path) -> None:
    mine = liveness.state_id()
    backend = MemoryBackend(
        runs={
            "foreign": {"objects": ["container:a"], "supervisor": "1:1", "state": "someone-else"},
            "legacy-dead": {"objects": ["network:b"], "supervisor": "999999:1", "state": None},
            "legacy-alive": {"objects": ["network:c"], "supervisor": liveness_identity(), "state": None},
            "mine-orphan": {"objects": ["container:d"], "supervisor": "1:1", "state": mine},
        }
    )
    dry = {r.run_id: r for r in gc.collect(backend, store, None, dry_run=True)}
    assert backend.removed == []
    assert dry["foreign"].action == "skipped" and "another state directory" in dry["foreign"].detail
    assert dry["legacy-alive"].action == "skipped"
    assert (dry["legacy-dead"].action, dry["legacy-dead"].dry_run) == ("removed", True)
    assert (dry["mine-orphan"].action, dry["mine-orphan"].dry_run) == ("removed", True)  # no spec: nothing to pack

    done = {r.run_id: r for r in gc.collect(backend, store, None)}
    assert sorted(backend.removed) == ["legacy-dead", "mine-orphan"]
    assert done["foreign"].action == "skipped" and "foreign" in backend.runs


def test_gc_leaves_a_supervised_run_alone_and_marks_a_dead_unstarted_one(store: RunStore, tmp_path: Path) -> None:
    live_dir, dead_dir = tmp_path / "live", tmp_path / "dead"
    live_dir.mkdir()
    dead_dir.mkdir()
    _row(store, "live", live_dir)
    _row(store, "dead", dead_dir)
    lock = liveness.RunLock(live_dir)
    lock.acquire()
    try:
        done = {r.run_id: r for r in gc.collect(MemoryBackend(runs={}), store, None)}
    finally:
        lock.release()
    assert done["live"].action == "skipped" and store.get("live")["status"] == "running"
    assert done["dead"].action == "removed"  # died before writing its spec: nothing to import
    assert store.get("dead")["status"] == "failed"
    assert [r["id"] for r in store.unfinished()] == ["live"]


def liveness_identity() -> str:
    from agent_sandbox.run.liveness import supervisor_identity

    return supervisor_identity()
