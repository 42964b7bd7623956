"""Faults against a real run: signals at every phase, double signals, a SIGKILLed supervisor, a killed sidecar
or agent, a full state disk. Each test checks the branch's content, the run's final status and that nothing
is left behind (containers, networks, mounts, rows stuck at `running`). The dockerd restart is in
test_engine_restart.py, run serially.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.store import RunStore

from .conftest import SANDBOX, audit_events, git, labelled, start_run
from .test_limits_e2e import SLEEPER

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

WORKER = """
turns:
  - write: {path: done.txt, content: "finished work\\n"}
  - text: done
"""


def row(state_dir: Path, run_id: str) -> dict[str, Any]:
    store = RunStore(state_dir / "runs.sqlite")
    try:
        r = store.get(run_id)
    finally:
        store.close()
    assert r is not None
    return r


def only_run_id(state_dir: Path) -> str:
    (run_dir,) = list((state_dir / "runs").iterdir())
    return run_dir.name


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def has_event(state_dir: Path, pred: Any) -> bool:
    runs = state_dir / "runs"
    for audit in runs.glob("*/audit.jsonl") if runs.exists() else []:
        for line in audit.read_text().splitlines():
            try:
                if pred(json.loads(line)):
                    return True
            except ValueError:
                continue
    return False


def bash_started(state_dir: Path) -> bool:
    return has_event(state_dir, lambda e: e["type"] == "tool_call" and e["payload"].get("name") == "Bash")


def no_leftovers(state_dir: Path, run_id: str) -> None:
    assert labelled(run_id) == []
    run_dir = state_dir / "runs" / run_id
    assert str(run_dir) not in Path("/proc/mounts").read_text()
    assert not (run_dir / "workspace").exists() and not list(run_dir.glob("*.img"))
    assert row(state_dir, run_id)["status"] != "running"


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


# --- signals ------------------------------------------------------------------------------------------------

PHASES = {
    # A moment after the process starts: before it has created anything (or just as it does).
    "startup": lambda d: time.sleep(0.6) or True,
    "checkout": lambda d: has_event(d, lambda e: e["type"] == "checkout_prepared"),
    "networks": lambda d: has_event(d, lambda e: e["type"] == "network_created"),
    "sidecar": lambda d: has_event(d, lambda e: e["type"] == "container_created"),
    "agent": lambda d: has_event(d, lambda e: e["type"] == "network_isolated"),
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("phase", list(PHASES))
def test_signal_while_starting_ends_cleanly(phase, sig, make_repo, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    wait_for(lambda: PHASES[phase](state_dir), 90, phase)
    proc.send_signal(sig)
    code, out, err = finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and "Aborted!" not in err, err
    runs = list((state_dir / "runs").iterdir()) if (state_dir / "runs").exists() else []
    if not runs:
        assert "nothing was created" in err
        return
    run_id = runs[0].name
    s = json.loads(out)
    assert (s["status"], s["reason"]) == ("killed", "interrupted")
    no_leftovers(state_dir, run_id)


@pytest.mark.parametrize(
    "first,second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGHUP)]
)
def test_double_signal_mid_run_keeps_the_work(first, second, make_repo, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    wait_for(lambda: bash_started(state_dir), 90, "the Bash call")
    proc.send_signal(first)
    time.sleep(0.2)
    proc.send_signal(second)
    code, out, err = finish(proc)
    assert code == 130, err
    s = json.loads(out)
    assert (s["status"], s["reason"]) == ("killed", "interrupted")
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    assert "still finishing the run" in err
    r = row(state_dir, s["id"])
    assert (r["status"], r["reason"], r["branch"]) == ("killed", "interrupted", s["branch"])
    no_leftovers(state_dir, s["id"])


@pytest.mark.parametrize("signals", [1, 3])
def test_signals_during_collect_keep_the_work(signals, make_repo, state_dir, write_script) -> None:
    """The agent finishes; the signals land while the finaliser packs, the host imports and teardown runs."""
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(WORKER)), "--json"
    )

    def finaliser_started() -> bool:
        return has_event(
            state_dir, lambda e: e["type"] == "container_created" and e["payload"].get("role") == "finaliser"
        )

    wait_for(finaliser_started, 120, "the finaliser")
    for _ in range(signals):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.15)
    code, out, err = finish(proc)
    assert "Traceback" not in err, err
    s = json.loads(out)
    # Packed and imported whatever the signals interrupted: the branch holds the finished work.
    assert git(repo, "show", f"{s['branch']}:done.txt") == "finished work"
    assert code == 130 and (s["status"], s["reason"]) == ("killed", "interrupted"), err
    assert "its work is on the branch" in s["message"]
    no_leftovers(state_dir, s["id"])


def test_signal_during_check_imports_unchecked_work(make_repo, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir,
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script(WORKER)),
        "--check",
        "sleep 300",
        "--json",
    )
    wait_for(
        lambda: has_event(
            state_dir, lambda e: e["type"] == "container_created" and e["payload"].get("role") == "check"
        ),
        120,
        "the check",
    )
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 130, err
    s = json.loads(out)
    assert git(repo, "show", f"{s['branch']}:done.txt") == "finished work"
    assert s["reason"] == "interrupted" and "unchecked" in s["message"]
    no_leftovers(state_dir, s["id"])


# --- a supervisor that dies ---------------------------------------------------------------------------------

# The Bash call outlasts the sidecar's heartbeat timeout (30 s): the model call after it finds the supervisor
# gone and is refused, which ends Claude Code, and with it the agent's container.
ORPHAN = """
turns:
  - write: {path: partial.txt, content: "work before the kill\\n"}
  - bash: "python3 -c 'import time; time.sleep(45)'; echo woke"
    timeout_ms: 120000
  - write: {path: after.txt, content: "written unsupervised\\n"}
  - text: never reached
"""


def container_running(name: str) -> bool:
    res = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
    return res.stdout.strip() == "true"


def test_sigkilled_supervisor_is_stopped_by_the_sidecar_and_recovered(
    make_repo, state_dir, sandbox, tmp_path, write_script
) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(ORPHAN)), "--json"
    )
    wait_for(lambda: bash_started(state_dir), 90, "the Bash call")
    run_id = only_run_id(state_dir)
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc, 30)
    assert row(state_dir, run_id)["status"] == "running"

    listed = sandbox("ls", "--json")
    assert [r["status"] for r in listed.json() if r["id"] == run_id] == ["orphaned"]
    # `logs -f` does not hang on a run nobody supervises: it ends, saying so.
    res = sandbox("logs", "-f", run_id, timeout=30)
    assert res.code == 130 and "supervisor is gone" in res.stderr

    # Another state directory's gc leaves the run alone, and --dry-run changes nothing.
    other = sandbox("gc", "--json", env={"SANDBOX_STATE_DIR": str(tmp_path / "other-state")})
    assert other.code == 0, other.stderr
    assert [r["action"] for r in other.json() if r["run_id"] == run_id] == ["skipped"]
    dry = sandbox("gc", "--dry-run", "--json")
    assert [(r["action"], r["dry_run"]) for r in dry.json() if r["run_id"] == run_id] == [("recovered", True)]
    assert labelled(run_id) and row(state_dir, run_id)["status"] == "running"

    # The backstop: without the supervisor's heartbeat the sidecar refuses the next model call, and the
    # agent's container ends by itself, before any gc.
    agent = f"sbx-{run_id}-agent"
    wait_for(lambda: not container_running(agent), 150, "the agent to stop without its supervisor")
    assert not (repo / ".git" / "refs" / "heads" / "sandbox" / run_id).exists()

    res = sandbox("gc", "--json", timeout=300)
    assert res.code == 0, res.stderr
    (mine,) = [r for r in res.json() if r["run_id"] == run_id]
    assert mine["action"] == "recovered" and mine["branch"] == f"sandbox/{run_id}", mine
    assert git(repo, "show", f"sandbox/{run_id}:partial.txt") == "work before the kill"
    # The model call made after the supervisor died is on record, from the sidecar's own log, and was refused.
    events = audit_events(state_dir / "runs" / run_id)
    types = [e["type"] for e in events]
    assert "recovery" in types and types[-1] == "run_ended"
    after = events[types.index("recovery") :]
    assert any(e["type"] == "model_call_refused" and e["payload"].get("reason") == "supervisor_lost" for e in after)
    # So the agent never got to write after.txt.
    assert "after.txt" not in git(repo, "ls-tree", "--name-only", f"sandbox/{run_id}")
    summary = json.loads((state_dir / "runs" / run_id / "summary.json").read_text())
    assert (summary["status"], summary["reason"], summary["exit_code"]) == ("killed", "interrupted", 130)
    r = row(state_dir, run_id)
    assert (r["status"], r["reason"], r["branch"]) == ("killed", "interrupted", f"sandbox/{run_id}")
    verify = sandbox("audit", "verify", run_id)
    assert verify.code == 0, verify.stdout + verify.stderr
    # `logs -f` of the recovered run ends at once with the run's exit code.
    assert sandbox("logs", "-f", run_id, timeout=30).code == 130
    no_leftovers(state_dir, run_id)


def test_next_run_recovers_a_dead_one_first(make_repo, state_dir, sandbox, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    wait_for(lambda: bash_started(state_dir), 90, "the Bash call")
    dead = only_run_id(state_dir)
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc, 30)
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(WORKER)), "--json")
    assert res.code == 0, res.stderr
    assert f"{dead}: recovered" in res.stderr
    assert git(repo, "show", f"sandbox/{dead}:partial.txt") == "work before the stop"
    assert (row(state_dir, dead)["status"], row(state_dir, dead)["reason"]) == ("killed", "interrupted")
    no_leftovers(state_dir, dead)
    no_leftovers(state_dir, res.json()["id"])


# --- the run's own containers die ---------------------------------------------------------------------------


@pytest.mark.parametrize("role,message", [("sidecar", "the sidecar stopped"), ("agent", "without a result")])
def test_killed_container_ends_the_run_with_the_work(role, message, make_repo, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    wait_for(lambda: bash_started(state_dir), 90, "the Bash call")
    run_id = only_run_id(state_dir)
    subprocess.run(["docker", "kill", f"sbx-{run_id}-{role}"], check=True, capture_output=True)
    code, out, err = finish(proc)
    s = json.loads(out)
    assert (code, s["status"], s["reason"]) == (10, "failed", "error"), err
    assert message in s["message"]
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    no_leftovers(state_dir, run_id)


# --- a full state disk --------------------------------------------------------------------------------------

FILLED = """
turns:
  - write: {path: partial.txt, content: "work before the disk filled\\n"}
  - bash: "python3 -c 'import time; time.sleep(8)'; echo woke"
    timeout_ms: 60000
  - bash: "echo more"
  - text: done
"""


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Any:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "small-state"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_state_disk_keeps_the_work_for_gc(make_repo, small_state_dir, write_script) -> None:
    state = small_state_dir
    repo = make_repo()
    env = {"SANDBOX_DISK_QUOTA": "sampled"}
    proc = start_run(
        state, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(FILLED)), "--json", env=env
    )
    wait_for(lambda: bash_started(state), 90, "the Bash call")
    run_id = only_run_id(state)
    filler = state / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)  # to ENOSPC
    code, out, err = finish(proc)
    assert "Traceback" not in err, err
    s = json.loads(out)
    assert code == 3, err
    assert "full" in s["message"] and s["kept"], s["message"]
    # Nothing of the work is lost: the workspace stays, with the agent's file.
    assert (Path(s["kept"]) / "partial.txt").read_text() == "work before the disk filled\n"
    assert labelled(run_id) == []

    filler.unlink()
    gc = subprocess.run(
        [*SANDBOX, "gc", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SANDBOX_STATE_DIR": str(state), **env},
    )
    assert gc.returncode == 0, gc.stderr
    (mine,) = [r for r in json.loads(gc.stdout) if r["run_id"] == run_id]
    assert mine["action"] == "recovered", mine
    assert git(repo, "show", f"sandbox/{run_id}:partial.txt") == "work before the disk filled"
    r = row(state, run_id)
    assert r["status"] != "running" and r["recover"] is None and r["branch"] == f"sandbox/{run_id}"
    no_leftovers(state, run_id)


def test_full_state_disk_before_a_run_refuses_it_cleanly(make_repo, small_state_dir, write_script) -> None:
    state = small_state_dir
    subprocess.run(["dd", "if=/dev/zero", f"of={state / 'filler'}", "bs=1M"], capture_output=True)  # to ENOSPC
    proc = start_run(
        state,
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "t",
        "--model-script",
        str(write_script(WORKER)),
        "--json",
        env={"SANDBOX_DISK_QUOTA": "sampled"},
    )
    code, out, err = finish(proc)
    assert out == ""
    assert code == 3 and "Traceback" not in err, err
    assert "filesystem" in err and "free" in err
    # Nothing was created: no run directory, no store (not even an empty one), nothing on the engine.
    assert not (state / "runs").exists() and not (state / "runs.sqlite").exists()
