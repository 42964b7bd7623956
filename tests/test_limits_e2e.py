"""Kill switches held from outside the agent, resource caps, and teardown on every path."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from agent_sandbox.run import quota

from .conftest import audit_events, git, labelled, start_run, tool_results, transcript, wait_for_event

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

SLEEPER = """
turns:
  - write: {path: partial.txt, content: "work before the stop\\n"}
  # Claude Code refuses a standalone `sleep 600`; a long-running command is what matters here.
  - bash: "python3 -c 'import time; time.sleep(600)'"
    timeout_ms: 600000
  - text: never reached
"""


def test_wall_clock_limit_kills_and_keeps_partial_work(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--timeout",
        "10",
        "--model-script",
        str(write_script(SLEEPER)),
        "--json",
    )
    assert res.code == 11, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("killed", "timeout")
    assert s["duration_s"] < 20
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    msg = git(repo, "log", "-1", "--format=%s", s["branch"])
    assert f"run {s['id']} was stopped (timeout)" in msg
    events = audit_events(s["run_dir"])
    hits = [e["payload"] for e in events if e["type"] == "limit_hit"]
    assert hits == [{"limit": "timeout", "reason": "timeout", "message": "wall-clock limit of 10s reached"}]
    # The finaliser was started ahead, held while the agent worked: the reason reached it with its go-ahead.
    (fin,) = [e["payload"] for e in events if e["type"] == "container_created" and e["payload"]["role"] == "finaliser"]
    assert "SANDBOX_GO_AHEAD" in fin["security"]["env_names"]
    assert "SANDBOX_END_REASON" not in fin["security"]["env_names"]
    assert labelled(s["id"]) == []


def test_silent_agent_ends_idle(make_repo, sandbox, write_script) -> None:
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "t",
        "--idle-timeout",
        "5",
        "--model-script",
        str(write_script(SLEEPER)),
        "--json",
    )
    assert res.code == 12, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("killed", "idle") and s["duration_s"] < 20
    assert labelled(s["id"]) == []


def test_budget_stops_the_run_and_the_gateway_refuses(make_repo, sandbox, write_script) -> None:
    # Sonnet input costs $3 per million tokens: 120k tokens is $0.36 a call, over $1 on the third call.
    script = write_script("""
turns:
  - write: {path: partial.txt, content: "spent\\n"}
  - bash: "echo two"
  - bash: "echo three"
  - bash: "echo four"
  - text: never reached
usage: {input_tokens: 120000, output_tokens: 0}
""")
    repo = make_repo()
    res = sandbox(
        "run", "--repo", str(repo), "--task", "t", "--budget-usd", "1", "--model-script", str(script), "--json"
    )
    assert res.code == 13, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("killed", "budget")
    events = audit_events(s["run_dir"])
    calls = [e["payload"] for e in events if e["type"] == "model_call"]
    assert [c["cost_usd"] for c in calls] == [0.36, 0.36, 0.36]
    assert [c["spent_usd"] for c in calls] == [0.36, 0.72, 1.08]
    refused = [e["payload"] for e in events if e["type"] == "model_call_refused"]
    assert refused and refused[0]["reason"] == "budget"
    # The fourth call never reached the model: the gateway answered it with 403.
    assert len([t for t in transcript(s["run_dir"]) if t.get("path") == "/v1/messages"]) == 3
    assert s["cost_usd"] == 1.08 and s["tokens"]["input"] == 360000
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "spent"
    assert labelled(s["id"]) == []


def test_turn_limit(make_repo, sandbox, write_script) -> None:
    script = write_script("turns:\n" + "".join(f"  - bash: 'echo {i}'\n" for i in range(6)) + "  - text: done\n")
    res = sandbox(
        "run", "--repo", str(make_repo()), "--task", "t", "--max-turns", "2", "--model-script", str(script), "--json"
    )
    assert res.code == 14, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("killed", "turns")
    assert len(tool_results(s["run_dir"])) <= 2
    assert labelled(s["id"]) == []


def test_fork_bomb_stops_at_the_pids_limit(make_repo, sandbox, write_script, tmp_path) -> None:
    # The bomb forks until the pids limit stops it, writes how far it got into the workspace (the finaliser
    # commits it even if the bomb took Claude Code down with it), then reaps its children.
    fork = (
        'python3 -c "import os,signal\nkids=[]\ntry:\n    while True:\n        pid=os.fork()\n'
        "        if pid==0:\n            signal.pause()\n        kids.append(pid)\nexcept OSError as e:\n"
        "    open('bomb.txt','w').write('fork failed after %d %s' % (len(kids), e.strerror))\n"
        'for k in kids:\n    os.kill(k, 9)\nfor k in kids:\n    os.waitpid(k, 0)"; cat bomb.txt'
    )
    script = write_script(f"turns:\n  - bash: {json.dumps(fork)}\n  - bash: 'echo still here'\n  - text: done\n")
    pol = tmp_path / "tight.yaml"
    pol.write_text("limits: {pids: 256}\n")
    repo = make_repo()
    res = sandbox(
        "run", "--repo", str(repo), "--task", "t", "--policy", str(pol), "--model-script", str(script), "--json"
    )
    s = res.json()
    bomb = git(repo, "show", f"{s['branch']}:bomb.txt")
    assert bomb.startswith("fork failed after") and bomb.endswith("Resource temporarily unavailable")
    assert int(bomb.split()[3]) < 256
    # Claude Code may or may not survive a bomb in its own container; the supervisor always does.
    assert (res.code, s["reason"]) in ((0, "completed"), (10, "error"))
    assert labelled(s["id"]) == []


def test_memory_bomb_is_oom_killed_and_reported(make_repo, sandbox, write_script, tmp_path) -> None:
    memory = 'python3 -c "a=[]\nwhile True: a.append(bytearray(32*1024*1024))"; echo exit=$?'
    script = write_script(f"turns:\n  - bash: {json.dumps(memory)}\n  - bash: 'echo still here'\n  - text: done\n")
    pol = tmp_path / "tight.yaml"
    pol.write_text("limits: {memory: 1g}\n")
    res = sandbox(
        "run", "--repo", str(make_repo()), "--task", "t", "--policy", str(pol), "--model-script", str(script), "--json"
    )
    s = res.json()
    out = tool_results(s["run_dir"])
    assert "exit=137" in out[0]
    assert out[1] == "still here"
    # An OOM kill anywhere in the container is reported: reason error, with the flag.
    assert (res.code, s["reason"], s["oom_killed"]) == (10, "error", True)
    ended = next(e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "run_ended")
    assert ended["oom_killed"] is True
    usage = next(e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "resource_usage")
    assert usage["peak_memory_bytes"] <= 2**30
    assert labelled(s["id"]) == []


def test_agent_runs_unprivileged(make_repo, sandbox, write_script) -> None:
    script = write_script("""
turns:
  - bash: "id; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status"
  - bash: "touch /usr/evil 2>&1; echo rc=$?; touch /etc/evil 2>&1; echo rc=$?; ls /var/run/docker.sock 2>&1"
  - bash: "touch /tmp/ok ~/ok /workspace/ok.txt && echo writable"
  - text: done
""")
    res = sandbox("run", "--repo", str(make_repo()), "--task", "t", "--model-script", str(script), "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    ident, usr, writable = tool_results(s["run_dir"])
    assert ident.startswith("uid=1000(agent) gid=1000(agent)")
    for cap in ("CapEff", "CapPrm", "CapBnd"):
        assert f"{cap}:\t0000000000000000" in ident
    assert "NoNewPrivs:\t1" in ident
    assert usr.count("Read-only file system") == 2 and usr.count("rc=1") == 2
    assert "No such file or directory" in usr
    assert writable == "writable"
    created = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "container_created"]
    agent = next(c["security"] for c in created if c["role"] == "agent")
    assert agent["cap_drop"] == ["ALL"] and agent["no_new_privileges"] and agent["read_only_root"]
    assert agent["user"] == "1000:1000" and agent["pids_limit"] == 512 and agent["memory_bytes"] == 4 * 1024**3
    assert not any("docker.sock" in m["source"] for m in agent["mounts"])


def test_sigint_tears_down_with_a_distinct_code(make_repo, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    try:
        run_id, _ = wait_for_event(state_dir, "tool_call")
        wait_until_bash(state_dir, run_id)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    s = json.loads(stdout)
    assert (s["status"], s["reason"]) == ("killed", "interrupted")
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    assert labelled(run_id) == []


def wait_until_bash(state_dir, run_id: str) -> None:
    """Wait for the sleeping Bash call (the second tool call) to have started."""
    import time

    audit = state_dir / "runs" / run_id / "audit.jsonl"
    for _ in range(300):
        if any(json.loads(x).get("payload", {}).get("name") == "Bash" for x in audit.read_text().splitlines()):
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise AssertionError("the agent never started its Bash call")


# Reapers collect every dead supervisor's leftovers, other tests' included: never two at once.
@pytest.mark.xdist_group("reaper")
def test_killed_supervisor_is_cleaned_up_by_gc(make_repo, state_dir, sandbox, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    try:
        run_id, _ = wait_for_event(state_dir, "tool_call")
        wait_until_bash(state_dir, run_id)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert labelled(run_id), "a killed supervisor leaves its containers behind: that is what gc is for"
    run_dir = state_dir / "runs" / run_id
    if quota.unavailable() is None:
        assert str(run_dir / "workspace") in Path("/proc/mounts").read_text()
    res = sandbox("gc", "--json")
    assert res.code == 0, res.stderr
    mine = [r for r in res.json() if r["run_id"] == run_id]
    assert mine and mine[0]["action"] == "recovered", mine
    assert any(o.endswith("-agent") for o in mine[0]["objects"])
    assert labelled(run_id) == []
    # The work is packed and imported, then the workspace's quota filesystem (as root with loop devices) is
    # unmounted and its image removed.
    assert git(repo, "show", f"sandbox/{run_id}:partial.txt") == "work before the stop"
    assert str(run_dir) not in Path("/proc/mounts").read_text() and not list(run_dir.glob("*.img"))
    from agent_sandbox.store import RunStore

    row = RunStore(state_dir / "runs.sqlite").get(run_id)
    assert row is not None and (row["status"], row["reason"]) == ("killed", "interrupted")
    # gc never recovers another state directory's runs (other tests' runs, live or not): it skips them.
    assert all(
        r["action"] == "skipped"
        for r in res.json()
        if r["run_id"] != run_id and r["objects"] and not all(o.startswith("firewall:") for o in r["objects"])
    )


def test_daily_budget_stops_a_run_then_refuses_the_next(make_repo, state_dir, sandbox, write_script) -> None:
    script = write_script("""
turns:
  - bash: "echo one"
  - bash: "echo two"
  - text: done
usage: {input_tokens: 20000, output_tokens: 0}
""")
    env = {"SANDBOX_DAILY_BUDGET_USD": "0.05"}
    repo = make_repo()
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--json", env=env)
    assert res.code == 13, res.stderr
    s = res.json()
    assert s["reason"] == "budget" and s["cost_usd"] == 0.06
    hits = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "limit_hit"]
    assert hits[0]["limit"] == "daily_budget" and "daily budget of $0.05" in hits[0]["message"]
    runs_before = sorted(p.name for p in (state_dir / "runs").iterdir())
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), env=env)
    assert res.code == 13
    assert "daily model budget of $0.05 is spent ($0.0600 today, UTC)" in res.stderr
    assert sorted(p.name for p in (state_dir / "runs").iterdir()) == runs_before


def test_workspace_growth_over_the_disk_limit_ends_the_run(make_repo, sandbox, write_script, tmp_path) -> None:
    """The fallback where no filesystem quota can be had (no root, no loop devices): the growth is measured.
    (Where the quota can be had, writes fail at the limit: tests/hostile/test_disk_quota.py.)"""
    script = write_script("""
turns:
  - write: {path: .gitignore, content: "big.bin\\n"}
  - bash: "python3 -c \\"open('big.bin','wb').write(b'0'*(96*1024*1024)); import time; time.sleep(60)\\""
    timeout_ms: 120000
  - text: never reached
""")
    pol = tmp_path / "disk.yaml"
    pol.write_text("limits: {disk: 64m}\n")
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "t",
        "--policy",
        str(pol),
        "--model-script",
        str(script),
        "--json",
        env={"SANDBOX_DISK_QUOTA": "sampled"},
    )
    assert res.code == 10, res.stderr
    s = res.json()
    assert s["reason"] == "error" and "over the disk limit of 64m" in s["message"]
    (q,) = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "disk_quota"]
    assert q == {"mode": "sampled", "bytes": 64 * 1024**2, "detail": "SANDBOX_DISK_QUOTA=sampled"}
    hits = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "limit_hit"]
    assert hits[0]["limit"] == "disk"
    assert s["files_changed"] == [".gitignore"]
    assert labelled(s["id"]) == []
