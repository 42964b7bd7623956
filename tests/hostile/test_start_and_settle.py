"""The new windows of a run's start and end, attacked end to end.

- Start: the agent's container starts held alongside the sidecar's; its go-ahead comes only after the sidecar
  listens (`listening`, its ports open: connections wait for the proxy and gateway under the run's rules) and
  the isolation of its namespace (nsenter or the helper). Its /etc/hosts is the run's read-only file naming the
  sidecar, itself and loopback alone. The finaliser, started ahead, has no go-ahead while the agent runs.
  Nothing of the agent's precedes either in the trail, and once running it has one route, which it cannot add
  to (no NET_ADMIN), no raw sockets, and nothing of the host or 192.0.2.1 to reach. The sidecar's control socket
  is nowhere in its reach.
- Settle: a model call the agent makes after its result (a SessionEnd hook planted in the repository's
  `.claude/settings.json`) is on the gateway's record by the settle, and the run is not `completed`. A call
  still in flight when the gateway settles keeps the result from being taken on trust (on the in-memory
  backend: the scripted model answers too fast to show it end to end).
- Signals: SIGTERM or SIGINT while the agent's container is held ends the run before any agent code ran.
- Kills: a SIGKILLed supervisor at each new phase (agent starting, right after the go-ahead, during the
  settle, during the background discard and the finaliser) leaves a run `sandbox gc` recovers completely:
  its state, its work on the branch when the agent made it, and nothing left (containers, networks,
  firewall rules, mounts, loop devices). SIGTERM during the background discard does the same on its own.
- gc: another state directory's gc that lists a run in the moment of its background discard, when only its
  firewall rules are left, leaves its finaliser alone (found by the SIGKILL tests side by side): rules alone are
  looked at twice, and then only rules are removed.
- Concurrency: four runs at once on a commit no tree is cached for yet all succeed, and leave nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.run import watch as watch_module

from ..conftest import audit_events, git, labelled, start_run, tool_results
from ..memory_backend import READY, MemoryBackend, Running, idle
from ..test_faults_e2e import finish, has_event, row, wait_for
from ..test_supervisor_logic import RESULT, _assistant, _call, _supervisor, agent_saying


def e2e(test: Any) -> Any:
    """Every test here but the one on the in-memory backend runs the real thing."""
    return pytest.mark.docker(pytest.mark.usefixtures("docker_ready")(test))


def firewall_rules(run_id: str) -> list[str]:
    """Lines of the host firewall naming this run (none where iptables is missing)."""
    found = []
    for tool in ("iptables", "ip6tables"):
        try:
            res = subprocess.run([tool, "-w", "10", "-S"], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            continue
        found += [line for line in res.stdout.splitlines() if run_id in line]
    return found


def nothing_left(state_dir: Path, run_id: str) -> None:
    """No container, network, firewall rule, mount or loop device of the run; its row no longer `running`."""
    assert labelled(run_id) == []
    assert firewall_rules(run_id) == []
    run_dir = state_dir / "runs" / run_id
    assert str(run_dir) not in Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(state_dir) not in loops, loops
    assert not (run_dir / "workspace").exists() and not list(run_dir.glob("*.img"))
    assert row(state_dir, run_id)["status"] != "running"


def the_run(state_dir: Path) -> str:
    (run_dir,) = list((state_dir / "runs").iterdir())
    return run_dir.name


def event_index(events: list[dict[str, Any]], pred: Any) -> int:
    return next(i for i, e in enumerate(events) if pred(e))


# --- the start: nothing of the agent's before its go-ahead, and one route after it ----------------------------

PROBE = r"""
echo "routes=[$(ip -4 route | tr '\n' ';')]"
echo "routes6=[$(ip -6 route 2>/dev/null | tr '\n' ';')]"
side=$(getent hosts sidecar | awk '{print $1}')
gw=${side%.*}.1
echo "sidecar=$side"
ip route add default via "$side" 2>&1 | head -1 | sed 's/^/add-default: /'
ip route add 192.0.2.0/24 dev eth0 2>&1 | head -1 | sed 's/^/add-subnet: /'
ip addr add 192.0.2.77/24 dev eth0 2>&1 | head -1 | sed 's/^/add-addr: /'
echo "routes-after=[$(ip -4 route | tr '\n' ';')]"
for target in 192.0.2.1/80 "$gw"/22 "$gw"/80 172.17.0.1/80; do
  if timeout 5 bash -c "exec 3<>/dev/tcp/${target%/*}/${target#*/}" 2>/dev/null; then
    echo "reached $target"
  else
    echo "unreached $target"
  fi
done
python3 - <<'EOF'
import socket
for name, args in (("raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                   ("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0))):
    try:
        socket.socket(*args)
        print(f"{name}-socket: opened")
    except OSError as exc:
        print(f"{name}-socket: refused errno={exc.errno}")
EOF
test -e /sandbox/model-out && echo "model-out: visible" || echo "model-out: absent"
mkdir /sandbox/model-out 2>/dev/null && echo "mkdir model-out: made" || echo "mkdir model-out: refused"
touch /sandbox/in/network-ready.forged 2>/dev/null && echo "in: writable" || echo "in: read-only"
echo "sockets=[$(find / -xdev \( -name 'control.sock' -o -name '*.sock' \) 2>/dev/null | tr '\n' ' ')]"
echo "unix=[$(grep -c control.sock /proc/net/unix)]"
grep -q model-out /proc/mounts && echo "mounts: model-out" || echo "mounts: clean"
echo "ls-sandbox=[$(ls /sandbox | tr '\n' ' ')]"
if { echo "192.0.2.1 sidecar" >>/etc/hosts; } 2>/dev/null; then echo "hosts-write=written"
else echo "hosts-write=refused"; fi
echo "hostname=$(hostname)"
echo "hosts-names=[$(awk '!/^#/ && NF { for (i = 2; i <= NF; i++) print $i }' /etc/hosts | sort -u | tr '\n' ' ')]"
grep -q " /etc/hosts .*\bro\b" /proc/mounts && echo "hosts-mount=ro" || echo "hosts-mount=other"
test -e /sandbox/in/finalise-ready && echo "finalise-ready=present" || echo "finalise-ready=absent"
"""


@e2e
@pytest.mark.parametrize("method", ["nsenter", "helper"])
def test_no_agent_line_before_the_go_ahead_and_one_route_after(method, make_repo, sandbox, write_script) -> None:
    if method == "nsenter" and os.geteuid() != 0:
        pytest.skip("isolation by nsenter needs root")
    repo = make_repo()
    script = write_script(
        "turns:\n  - bash: " + json.dumps(PROBE) + "\n    timeout_ms: 120000\n  - text: done\n", "probe.yaml"
    )
    env = {"SANDBOX_ISOLATION": method} if method == "helper" else None
    res = sandbox(
        "run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--json", timeout=240, env=env
    )
    assert res.code == 0, res.stderr
    s = res.json()
    events = audit_events(s["run_dir"])
    listening = event_index(events, lambda e: e["type"] == "listening")
    ready = event_index(events, lambda e: e["type"] == "ready")
    isolated = event_index(events, lambda e: e["type"] == "network_isolated")
    first_agent = event_index(events, lambda e: e.get("source") == "agent")
    assert listening < first_agent and isolated < first_agent, [(e["source"], e["type"]) for e in events]
    assert listening < ready
    # The start is recorded once the sidecar listened (the container was held until then).
    started = event_index(events, lambda e: e["type"] == "container_created" and e["payload"]["role"] == "agent")
    assert listening < started < first_agent

    (out,) = [r for r in tool_results(s["run_dir"]) if "routes=" in r]
    lines = dict(line.split("=", 1) if "=" in line else (line, "") for line in out.splitlines())
    side = lines["sidecar"]
    assert lines["routes"] == f"[{side} dev eth0 scope link ;]", out
    assert lines["routes6"] == "[]", out
    for what in ("add-default", "add-subnet", "add-addr"):
        assert f"{what}: " in out and "Operation not permitted" in out.split(f"{what}: ")[1].splitlines()[0], out
    assert lines["routes-after"] == lines["routes"], out
    assert "reached " not in out.replace("unreached ", ""), out
    assert "raw-socket: refused" in out and "packet-socket: refused" in out, out
    assert "model-out: absent" in out and "mkdir model-out: refused" in out, out
    assert "in: read-only" in out and "mounts: clean" in out, out
    assert "control.sock" not in lines["sockets"] and lines["unix"] == "[0]", out
    # Its /etc/hosts (the run's file, written once the sidecar had an address) names the sidecar, itself and
    # loopback, nothing else, and it cannot change it.
    assert lines["hosts-write"] == "refused" and lines["hosts-mount"] == "ro", out
    names = set(lines["hosts-names"].strip("[] ").split()) - {lines["hostname"]}
    assert names == {"localhost", "ip6-localhost", "ip6-loopback", "sidecar"}, out
    # The finaliser, started ahead and held, has no go-ahead while the agent runs.
    assert lines["finalise-ready"] == "absent", out
    assert labelled(s["id"]) == []


# --- the settle: a model call after the result -----------------------------------------------------------------

LATE_CALL = (
    "sleep 2; curl -s --noproxy '*' -m 10 -o /dev/null -w '%{http_code}' http://sidecar:8080/v1/messages"
    " -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01'"
    ' -d \'{"model":"claude-sonnet-4-5","max_tokens":16,"messages":[{"role":"user","content":"one more"}]}\''
    " > /workspace/late-call.txt"
)


@e2e
def test_model_call_after_the_result_is_seen_by_the_settle(make_repo, sandbox, write_script) -> None:
    """The repository plants a SessionEnd hook: Claude Code prints its result, then the hook (which it waits
    for) calls the gateway. The settle has that call on record, and the run is not completed."""
    settings = {"hooks": {"SessionEnd": [{"hooks": [{"type": "command", "command": LATE_CALL, "timeout": 30}]}]}}
    repo = make_repo(files={"a.py": "x = 1\n", ".claude/settings.json": json.dumps(settings)})
    script = write_script('turns:\n  - write: {path: w.txt, content: "work\\n"}\n  - text: done\n', "late.yaml")
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--json", timeout=240)
    s = res.json()
    # The hook's call went through (so the attack was real) ...
    assert git(repo, "show", f"{s['branch']}:late-call.txt") == "200"
    # ... and the run is not reported as a success the record does not back.
    assert (res.code, s["status"], s["reason"]) == (10, "failed", "error"), res.stderr
    assert "began after the result" in s["message"], s["message"]
    events = audit_events(s["run_dir"])
    types = [e["type"] for e in events]
    assert "settled" in types and types.index("settled") < types.index("result_verified")
    (verified,) = [e["payload"] for e in events if e["type"] == "result_verified"]
    assert verified["backed"] is False and verified["gateway_calls"] == 3
    assert labelled(s["id"]) == []


# A call still in flight when the gateway settles: its line comes after `settled` (a slow real upstream keeps
# streaming into the dead agent's socket; the scripted model answers too fast to show it end to end).


def _settling_sidecar(late: dict[str, Any]) -> Any:
    def behaviour(w: Running) -> int:
        w.say(READY)
        w.sleep(0.05)
        w.say(_call(2, 1, 0.01))  # the agent's one call, before its result
        fd = os.open(w.mount("/sandbox/model-out"), os.O_RDONLY | os.O_DIRECTORY)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            srv.bind(f"/proc/self/fd/{fd}/control.sock")
            srv.listen(1)
            srv.settimeout(0.1)
            while not w.stopped.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn:
                    token = conn.makefile().readline().strip()
                    # As the real gateway does when a call outlasts its 2 s wait: settled, with it in flight.
                    w.say({"event": "settled", "n": 3, "token": token, "inflight": 1, "calls": 2})
                    conn.sendall(b"ok\n")
                w.sleep(0.3)
                w.say(late)  # the in-flight call's line, once it ends: it began after the result
                break
        finally:
            srv.close()
            os.close(fd)
        return idle(w)

    return behaviour


def test_a_call_in_flight_at_the_settle_is_not_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_DISK_QUOTA", "sampled")
    monkeypatch.setattr(watch_module, "STOP_GRACE", 0.2)
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "--allow-empty", "-m", "base")
    late = {**_call(4, 2, 0.03), "cost_usd": 0.02, "duration_ms": 2500}
    backend = MemoryBackend({"sidecar": _settling_sidecar(late), "agent": agent_saying(_assistant("m1"), RESULT)})
    sup = _supervisor(tmp_path, repo, backend)
    summary = sup.run()
    events = audit_events(sup.run_dir)
    (settled,) = [e["payload"] for e in events if e["type"] == "settled"]
    assert settled["inflight"] == 1  # the scenario: the gateway said a call was still in flight
    # The record the result is judged on must include that call (or the result must not stand without it).
    assert summary.reason != "completed" or summary.model_calls == 2, summary.message


# --- kills at each new phase ---------------------------------------------------------------------------------

WORK = """
turns:
  - write: {path: done.txt, content: "finished work\\n"}
  - text: done
"""
# The same work, after a few seconds of the agent's: the finaliser started ahead waits, held, meanwhile.
SLOW_WORK = WORK.replace("turns:\n", 'turns:\n  - bash: "sleep 8"\n')


def agent_container_exists(state_dir: Path, role: str = "agent") -> bool:
    runs = state_dir / "runs"
    if not runs.exists() or not list(runs.iterdir()):
        return False
    name = f"sbx-{the_run(state_dir)}-{role}"
    res = subprocess.run(["docker", "ps", "-aq", "--filter", f"name=^{name}$"], capture_output=True, text=True)
    return bool(res.stdout.strip())


KILL_PHASES = {
    # The agent's container exists, held, while the sidecar gets ready (before `ready` if we are quick).
    "agent_starting": agent_container_exists,
    # The go-ahead is written right after this is recorded.
    "after_go_ahead": lambda d: has_event(d, lambda e: e["type"] == "network_isolated"),
    # The finaliser started ahead, held while the agent works (its go-ahead not given yet).
    "finaliser_held": lambda d: (
        agent_container_exists(d, "finalise")
        and not has_event(d, lambda e: e["type"] == "container_created" and e["payload"].get("role") == "finaliser")
    ),
    # The agent's result: the settle follows its end.
    "settle": lambda d: has_event(d, lambda e: e["type"] == "result"),
    # The background discard of agent, sidecar and networks runs while the finaliser starts.
    "discard": lambda d: has_event(
        d, lambda e: e["type"] == "container_created" and e["payload"].get("role") == "finaliser"
    ),
}


@e2e
# One after another: these gc's, side by side, hit the race of test_another_state_dirs_gc_leaves_a_finaliser_alone
# (one gc removes another's recovery finaliser). Other files' gc's can still race them until that is fixed.
@pytest.mark.xdist_group("start-and-settle-gc")
@pytest.mark.parametrize("phase", list(KILL_PHASES))
def test_sigkill_at_each_new_phase_is_recovered_by_gc(phase, make_repo, sandbox, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir,
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script(SLOW_WORK if phase == "finaliser_held" else WORK)),
        "--json",
    )
    try:
        wait_for(lambda: KILL_PHASES[phase](state_dir), 120, phase)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        finish(proc, 30)
    run_id = the_run(state_dir)
    events_at_kill = audit_events(state_dir / "runs" / run_id)
    released = any(e["type"] == "network_isolated" for e in events_at_kill)

    res = sandbox("gc", "--json", timeout=300)
    assert res.code == 0, res.stderr
    mine = [r for r in res.json() if r["run_id"] == run_id]
    assert [r["action"] for r in mine] == ["recovered"], json.dumps(mine, indent=1) + res.stderr
    nothing_left(state_dir, run_id)
    r = row(state_dir, run_id)
    assert (r["status"], r["reason"]) == ("killed", "interrupted"), r
    events = audit_events(state_dir / "runs" / run_id)
    assert events[-1]["type"] == "run_ended"
    if not released:
        # Killed before the go-ahead: the agent never ran, not even after the kill (nothing of its in the
        # trail, and no go-ahead written by the recovery).
        assert not [e for e in events if e.get("source") == "agent"]
        assert not (state_dir / "runs" / run_id / "in" / "network-ready").exists()
    if phase in ("settle", "discard"):
        # The agent had finished: its work is on the branch.
        assert git(repo, "show", f"sandbox/{run_id}:done.txt") == "finished work"
    verify = sandbox("audit", "verify", run_id)
    assert verify.code == 0, verify.stdout + verify.stderr


@e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_the_agent_is_held_never_runs_it(sig, make_repo, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(WORK)), "--json"
    )
    try:
        wait_for(lambda: agent_container_exists(state_dir), 120, "the agent's container")
    finally:
        proc.send_signal(sig)
    code, out, err = finish(proc)
    assert "Traceback" not in err, err
    s = json.loads(out)
    assert code == 130 and (s["status"], s["reason"]) == ("killed", "interrupted"), err
    events = audit_events(state_dir / "runs" / s["id"])
    if not any(e["type"] == "network_isolated" for e in events):
        # Stopped while held: nothing of the agent's ran, and no branch was made.
        assert not [e for e in events if e.get("source") == "agent"]
        assert s["branch"] is None and not git(repo, "branch", "--list", f"sandbox/{s['id']}")
    nothing_left(state_dir, s["id"])


@e2e
def test_sigterm_during_the_background_discard_keeps_the_work(make_repo, state_dir, write_script) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(WORK)), "--json"
    )
    try:
        wait_for(lambda: KILL_PHASES["discard"](state_dir), 120, "the finaliser")
    finally:
        proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert "Traceback" not in err, err
    s = json.loads(out)
    assert git(repo, "show", f"{s['branch']}:done.txt") == "finished work"
    assert code == 130 and (s["status"], s["reason"]) == ("killed", "interrupted"), err
    nothing_left(state_dir, s["id"])


# --- another state directory's gc during the background discard ---------------------------------------------
# The discard removes the run's containers, then its networks, then its firewall rules, while the finaliser
# starts. Between the last network and the rules, `list_runs` sees the run as firewall rules alone, which carry
# no state label: another state directory's gc takes that for a dead run of an earlier version and calls
# `remove_run`, which lists the run's containers afresh and removes them, the finaliser (labelled with its own
# state directory) included. Seen in this file's SIGKILL tests run side by side: a recovery's finaliser
# "wrote no result (exit 137)" and was gone (404), and the work stayed unimported. Here the finaliser's start
# is placed right after the gc's listing, the moment that race gives it, with real Docker and iptables.


@e2e
def test_another_state_dirs_gc_leaves_a_finaliser_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent_sandbox.backend.base import ROLE_LABEL, RUN_LABEL, STATE_LABEL
    from agent_sandbox.backend.docker import DockerBackend
    from agent_sandbox.run import orphans
    from agent_sandbox.store import RunStore

    backend = DockerBackend.connect()
    if backend.firewall.unavailable():
        pytest.skip(backend.firewall.unavailable() or "")
    run_id = f"race-{os.getpid()}-{tmp_path.name[-12:]}".replace("_", "-")
    name = f"sbx-{run_id}-finalise"
    gc_state = tmp_path / "gc-state"
    gc_state.mkdir()
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(gc_state))
    backend.firewall.add("sbxrace0", run_id)  # the run's rules; its bridge is already gone
    listed = backend.list_runs

    started: list[str] = []

    def listing() -> dict[str, dict[str, Any]]:
        runs = listed()
        if not started:
            # Right after gc's first look, the run's own supervisor starts its finaliser, labelled with its state
            # directory.
            labels = [f"{RUN_LABEL}={run_id}", f"{STATE_LABEL}=another-state", f"{ROLE_LABEL}=finaliser"]
            flags = [arg for label in labels for arg in ("--label", label)]
            cmd = ["docker", "run", "-d", "--name", name, *flags, "agent-sandbox/base:bookworm", "sleep", "120"]
            subprocess.run(cmd, check=True, capture_output=True)
            started.append(name)
        return runs

    monkeypatch.setattr(backend, "list_runs", listing)
    store = RunStore(gc_state / "runs.sqlite")
    try:
        out = orphans.collect(backend, store, images=None)
        mine = [c.model_dump() for c in out if c.run_id == run_id]
        alive = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
        assert alive.stdout.strip() == "true", mine
        assert [c["action"] for c in mine] == ["skipped"], mine
    finally:
        store.close()
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        backend.firewall.remove(run_id)
        assert labelled(run_id) == [] and firewall_rules(run_id) == []


# --- many at once ----------------------------------------------------------------------------------------------


@e2e
def test_four_runs_at_once_on_an_uncached_commit(make_repo, state_dir, write_script) -> None:
    repo = make_repo(files={f"pkg/m{i}.py": f"v = {i}\n" for i in range(50)})
    script = write_script(WORK)
    results: list[tuple[int, str, str]] = [(-1, "", "")] * 4

    def one(i: int) -> None:
        proc = start_run(
            state_dir, "run", "--repo", str(repo), "--task", f"t{i}", "--model-script", str(script), "--json"
        )
        results[i] = finish(proc, 240)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = []
    for code, out, err in results:
        assert code == 0, err
        s = json.loads(out)
        assert (s["status"], s["reason"]) == ("succeeded", "completed"), s["message"]
        assert git(repo, "show", f"{s['branch']}:done.txt") == "finished work"
        assert git(repo, "show", f"{s['branch']}:pkg/m7.py") == "v = 7"
        ids.append(s["id"])
    assert len(set(ids)) == 4
    for run_id in ids:
        nothing_left(state_dir, run_id)
        assert "Traceback" not in (state_dir / "runs" / run_id / "audit.jsonl").read_text()
