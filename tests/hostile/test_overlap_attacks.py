"""The overlapped start and end of a run (issue 15), attacked by a hostile agent.

- The race with the sidecar's start: the agent's go-ahead comes on the sidecar's `listening` line, before its
  proxy and gateway serve (`ready`). A hook the repository plants (`SessionStart` in `.claude/settings.json`)
  runs before Claude Code's first model call; a model script large enough to keep the sidecar loading it for a
  few seconds holds the window open. In it the agent asks the proxy for TEST-NET, the metadata address, the
  scripted model on the sidecar's loopback (unmetered), the gateway by loopback, the host side of its bridge
  and docker0, goes for the scripted model's port directly and for an unmetered gateway path. Every request
  waits in the backlog and meets the run's rules: all denied, none reaches the scripted model. A flood of 6,000
  connections held open from before `ready` neither stops the run's own model calls nor the run.
- /etc/hosts (the run's file, mounted read-only), in the agent's container and in the check's (which runs the
  branch's code): append, truncate, replace by rename (mv, os.rename), bind mount, unmount, a user namespace,
  chmod, and the same against its source as seen in /sandbox/in, and writing the go-ahead files: all refused;
  `sidecar` resolves as before, and the host's files are as the supervisor wrote them.
- The finaliser started ahead, held: files named like its go-ahead planted wherever the agent can write
  (holding another end reason), Python modules and programs planted in its working directory; the agent
  watches the workspace's object store for early packing while it works on. Nothing ran early or at all,
  the end reason is the run's, and what the agent wrote after the finaliser started is packed.
- End reasons reaching a held finaliser: idle, budget, turns (timeout: tests/test_limits_e2e.py) and a
  SIGTERM of the supervisor while the finaliser is being started ahead or held: the work lands under
  "was stopped (<reason>)".
- SIGKILL of the supervisor while the finaliser is being started ahead, and right after its go-ahead: `sandbox
  gc` recovers the run and leaves nothing.
- A sidecar that dies after `listening`, before `ready` (its model script unreadable to its user): the run
  ends with "the sidecar did not become ready" and the sidecar's own error, and leaves nothing.

Two bugs found here (at 52a2f93), each kept as the test that showed it: a held finaliser that ends before its
go-ahead (killed; also a dockerd restart, or its hold running out under a supervisor stalled past wall + 185 s)
was released all the same and never replaced, so the run failed with "the finaliser wrote no result" and its
work waited for gc; and a finaliser removed in the middle of `git bundle create` (by gc after a SIGKILL at the
go-ahead) left out/work.bundle.lock, on which gc's own finaliser failed until gc ran again.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..conftest import audit_events, git, start_run, tool_results, transcript
from ..test_faults_e2e import finish, row
from .test_start_and_settle import agent_container_exists, e2e, nothing_left, the_run

# Turns the scripted model never reaches (they follow the final answer): loading them keeps the sidecar busy
# between `listening` and `ready` for a few seconds, the window a hostile agent's first code runs in.
FILLER = 50000


def gc_alone(sandbox: Callable[..., Any]) -> Any:
    """`sandbox gc --json`, one at a time across this file's workers, xdist groups or not: side by side, one
    state directory's gc can remove another's recovery finaliser (see test_start_and_settle)."""
    with open(Path(tempfile.gettempdir()) / "agent-sandbox-overlap-gc.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return sandbox("gc", "--json", timeout=300)


def slow_sidecar_script(turns: str) -> str:
    """`turns` (YAML list items) with filler after them: the sidecar takes a while to become ready."""
    return "turns:\n" + turns + '  - bash: "true"\n' * FILLER


def hook_settings(command: str) -> str:
    """A repository's `.claude/settings.json` that runs `command` as Claude Code starts."""
    hook = {"type": "command", "command": command, "timeout": 60}
    return json.dumps({"hooks": {"SessionStart": [{"hooks": [hook]}]}})


def event_time(events: list[dict[str, Any]], type_: str) -> float:
    (found,) = [e["time"] for e in events if e["type"] == type_]
    return float(found)


def last_subject(repo: Path, branch: str) -> str:
    return git(repo, "log", "-1", "--format=%s", branch)


def finaliser_created(events: list[dict[str, Any]]) -> dict[str, Any]:
    (fin,) = [e["payload"] for e in events if e["type"] == "container_created" and e["payload"]["role"] == "finaliser"]
    return fin


def started_ahead(events: list[dict[str, Any]]) -> bool:
    """The finaliser on record is the one started ahead, held (its reason came with its go-ahead)."""
    env = finaliser_created(events)["security"]["env_names"]
    return "SANDBOX_GO_AHEAD" in env and "SANDBOX_END_REASON" not in env


PARTIAL = '  - write: {path: partial.txt, content: "work before the stop\\n"}\n'
SLEEP_4 = "  - bash: \"python3 -c 'import time; time.sleep(4)'\"\n"


# --- the race with the sidecar's start -------------------------------------------------------------------------

RACE = r"""
import ipaddress, json, socket, subprocess, threading, time
own = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
bridge = str(ipaddress.ip_interface(own.split()[3]).network[1])


def connect_(host, port):
    return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def get_(url, host):
    return f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


PROXIED = {
    "testnet-connect": connect_("192.0.2.1", 443),
    "testnet-get": get_("http://192.0.2.1/", "192.0.2.1"),
    "metadata": get_("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    "scripted-model": connect_("127.0.0.1", 8099),
    "scripted-model-localhost": connect_("localhost", 8099),
    "scripted-model-sidecar": connect_("sidecar", 8099),
    "gateway-loopback": get_("http://127.0.0.1:8080/v1/models", "127.0.0.1:8080"),
    "bridge-gateway": connect_(bridge, 22),
    "docker0": connect_("172.17.0.1", 80),
}
body = json.dumps({"prompt": "unmetered", "model": "claude-2", "max_tokens_to_sample": 5}).encode()
DIRECT = {
    "direct-scripted-model": (8099, get_("/v1/models", "sidecar")),
    "direct-unmetered": (8080, b"POST /v1/complete HTTP/1.1\r\nHost: sidecar:8080\r\ncontent-type: application/json\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body),
}
out = {}


def attempt(label, port, payload):
    rec = out[label] = {"t": time.time()}
    try:
        s = socket.create_connection(("sidecar", port), timeout=10)
        rec["connected"] = time.time()
        s.settimeout(30)
        s.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 8192:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        rec["answered"] = time.time()
        rec["answer"] = data[:400].decode("latin-1")
        s.close()
    except OSError as exc:
        rec["error"] = type(exc).__name__


threads = [threading.Thread(target=attempt, args=(k, 3128, v)) for k, v in PROXIED.items()]
threads += [threading.Thread(target=attempt, args=(k, *v)) for k, v in DIRECT.items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
json.dump({"proxied": sorted(PROXIED), "tries": out}, open("/workspace/race.json", "w"))
"""


@e2e
def test_requests_made_before_the_proxy_serves_meet_the_rules(make_repo, sandbox, write_script) -> None:
    repo = make_repo(files={"race.py": RACE, ".claude/settings.json": hook_settings("python3 -I /workspace/race.py")})
    script = write_script(slow_sidecar_script('  - bash: "cat /workspace/race.json"\n  - text: done\n'))
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--json", timeout=240)
    assert res.code == 0, res.stderr
    s = res.json()
    events = audit_events(s["run_dir"])
    (out,) = [r for r in tool_results(s["run_dir"]) if r.startswith("{")]
    race = json.loads(out)
    tries = race["tries"]
    # The attack was real: the agent's connections were open before the proxy and gateway served.
    ready = event_time(events, "ready")
    first = min(t["connected"] for t in tries.values() if "connected" in t)
    assert first < ready, (first, ready, out)
    # Every request through the proxy was refused by the run's rules, once the proxy served it.
    for label in race["proxied"]:
        answer = tries[label].get("answer", "")
        assert answer.startswith("HTTP/1.1 403"), (label, tries[label])
        assert "x-sandbox-egress: denied" in answer.lower(), (label, tries[label])
    decisions = [e["payload"] for e in events if e["type"] == "egress"]
    assert len(decisions) == len(race["proxied"]) and {d["decision"] for d in decisions} == {"deny"}, decisions
    # The scripted model's port is the sidecar's loopback alone; the gateway forwards its own paths alone.
    assert tries["direct-scripted-model"].get("error") == "ConnectionRefusedError", tries["direct-scripted-model"]
    unmetered = tries["direct-unmetered"].get("answer", "")
    assert unmetered.startswith("HTTP/1.1 4") and not unmetered.startswith("HTTP/1.1 200"), unmetered
    # Nothing reached the scripted model but the agent's own calls through the gateway, and every call is on the
    # gateway's record.
    calls = [e for e in events if e["type"] == "model_call"]
    paths = {t.get("path") for t in transcript(s["run_dir"])}
    assert paths <= {"/v1/messages", "/v1/messages/count_tokens"}, paths
    assert len([t for t in transcript(s["run_dir"]) if t.get("path") == "/v1/messages"]) == len(calls)
    assert (s["status"], s["reason"]) == ("succeeded", "completed")
    nothing_left(Path(s["run_dir"]).parent.parent, s["id"])


FLOOD = r"""
import json, resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ip = socket.gethostbyname("sidecar")
socks, errors = [], {}
t0 = time.time()
for port in (8080, 3128):
    for _ in range(int(sys.argv[1])):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect_ex((ip, port))
            socks.append(s)
        except OSError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            s.close()
with open("/workspace/flood.json", "w") as f:
    json.dump({"t0": t0, "t1": time.time(), "opened": len(socks), "errors": errors}, f)
time.sleep(float(sys.argv[2]))
"""


@e2e
def test_a_connection_flood_before_the_proxy_serves_does_not_stop_the_run(make_repo, sandbox, write_script) -> None:
    """Far more connections than the ports' backlogs (512) hold, to both, opened before `ready` by a process the
    agent leaves running, held open for the whole run: the run's model calls still go through, the run ends as
    it should, within its limits, and leaves nothing."""
    hook = "setsid python3 -I /workspace/flood.py 3000 60 </dev/null >/dev/null 2>&1 & sleep 1"
    repo = make_repo(files={"flood.py": FLOOD, ".claude/settings.json": hook_settings(hook)})
    turns = '  - bash: "cat /workspace/flood.json"\n  - write: {path: done.txt, content: "done\\n"}\n  - text: done\n'
    script = write_script(slow_sidecar_script(turns))
    t0 = time.monotonic()
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--timeout", "60", "--json")
    took = time.monotonic() - t0
    assert res.code == 0, res.stderr
    s = res.json()
    events = audit_events(s["run_dir"])
    (out,) = [r for r in tool_results(s["run_dir"]) if r.startswith("{")]
    flood = json.loads(out)
    assert flood["opened"] == 6000 and flood["t1"] < event_time(events, "ready"), (flood, out)
    assert (s["status"], s["reason"]) == ("succeeded", "completed"), s["message"]
    assert git(repo, "show", f"{s['branch']}:done.txt") == "done"
    assert took < 60, took
    nothing_left(Path(s["run_dir"]).parent.parent, s["id"])


# --- /etc/hosts ---------------------------------------------------------------------------------------------------

HOSTS = r"""
src=/sandbox/in/$1.hosts  # the run's file behind this container's /etc/hosts (agent.hosts, check.hosts)
before=$(md5sum </etc/hosts)
echo "sidecar-before=$(getent hosts sidecar | awk '{print $1}')"
printf '192.0.2.1\tsidecar\n' >/tmp/h
try() { label=$1; shift; if out=$("$@" 2>&1); then echo "$label=DONE $out"; else echo "$label=refused"; fi; }
try append sh -c 'echo "192.0.2.1 sidecar" >>/etc/hosts'
try truncate python3 -I -c 'import os; os.truncate("/etc/hosts", 0)'
try mv mv -f /tmp/h /etc/hosts
printf '192.0.2.1\tsidecar\n' >/tmp/h
try rename python3 -I -c 'import os; os.rename("/tmp/h", "/etc/hosts")'
try bind mount --bind /tmp/h /etc/hosts
try umount umount /etc/hosts
try userns unshare -Urm sh -c 'mount --bind /tmp/h /etc/hosts'
try chmod chmod 666 /etc/hosts
try src-append sh -c "echo '192.0.2.1 sidecar' >>$src"
try src-link ln -sf /tmp/h "$src"
try src-rename python3 -I -c "import os; os.rename('/tmp/h', '$src')"
try go-ahead touch /sandbox/in/finalise-ready /sandbox/in/check-ready
echo "sidecar-after=$(getent hosts sidecar | awk '{print $1}')"
[ "$before" = "$(md5sum </etc/hosts)" ] && echo "unchanged=yes" || echo "unchanged=no"
cmp -s /etc/hosts "$src" && echo "same-as-source=yes" || echo "same-as-source=no"
"""
ATTEMPTS = (
    "append",
    "truncate",
    "mv",
    "rename",
    "bind",
    "umount",
    "userns",
    "chmod",
    "src-append",
    "src-link",
    "src-rename",
    "go-ahead",
)


def hosts_probe_holds(out: str, hosts: str) -> None:
    """What HOSTS printed shows every attempt refused, and `hosts` (the run's file) is as the supervisor wrote
    it: loopback, the container's own name, and the sidecar at the address the container resolved."""
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    for attempt in ATTEMPTS:
        assert lines[attempt] == "refused", (attempt, out)
    side = lines["sidecar-before"]
    assert side and lines["sidecar-after"] == side, out
    assert lines["unchanged"] == "yes" and lines["same-as-source"] == "yes", out
    named = {name: fields[0] for fields in (line.split() for line in hosts.splitlines()) for name in fields[1:]}
    assert named["sidecar"] == side and "192.0.2.1" not in hosts, hosts
    assert set(named) - {"sidecar", "localhost", "ip6-localhost", "ip6-loopback"} and len(named) == 5, hosts


@e2e
def test_the_hosts_file_cannot_be_changed_by_the_agent_or_its_check(make_repo, sandbox, write_script) -> None:
    """The agent's code runs twice with a run's /etc/hosts: in the agent's container, and (the branch's files)
    in the check's, after the finaliser started ahead was held while the agent worked on."""
    script = write_script(
        "turns:\n"
        f"  - write: {{path: probe.sh, content: {json.dumps(HOSTS)}}}\n"
        '  - bash: "bash probe.sh agent"\n' + SLEEP_4 + "  - text: done\n"
    )
    checked = ["--check", "bash probe.sh check"]
    res = sandbox("run", "--repo", str(make_repo()), "--task", "t", "--model-script", str(script), *checked, "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    run_dir = Path(s["run_dir"])
    events = audit_events(run_dir)
    (out,) = [r for r in tool_results(run_dir) if "sidecar-before=" in r]
    hosts_probe_holds(out, (run_dir / "in" / "agent.hosts").read_text())
    (check,) = [e["payload"] for e in events if e["type"] == "check"]
    assert check["exit_code"] == 0, check
    hosts_probe_holds(check["output"], (run_dir / "in" / "check.hosts").read_text())
    assert started_ahead(events)
    assert (s["status"], s["reason"]) == ("succeeded", "completed"), s["message"]
    nothing_left(run_dir.parent.parent, s["id"])


# --- the finaliser, started ahead and held -----------------------------------------------------------------------

PLANT = r"""
cd /workspace
for d in /workspace /workspace/sandbox/in /tmp /home/agent; do
  mkdir -p "$d" && printf timeout >"$d/finalise-ready" && printf budget >"$d/finalise-ready.part"
done
for m in os sys time site sitecustomize usercustomize; do
  for p in /sandbox/out /workspace; do
    printf 'try:\n    open("%s/PWNED-%s", "w").close()\nexcept OSError:\n    pass\n' "$p" "$m" >>"$m.py"
  done
done
mkdir -p bin
for b in python3 head tr bash timeout git jq sleep; do
  for f in "$b" "bin/$b"; do
    printf '#!/bin/sh\ntouch /sandbox/out/PWNED-%s /workspace/PWNED-%s 2>/dev/null\n' "$b" "$b" >"$f"; chmod +x "$f"
  done
done
setsid python3 -I -c '
import os, time
objects = "/workspace/.git/objects"
def snapshot():
    found = set()
    for root, _, files in os.walk(objects):
        found.update(os.path.join(root, f) for f in files)
    for extra in ("/workspace/.git/index.lock", "/workspace/.git/packed-refs.lock"):
        if os.path.exists(extra):
            found.add(extra)
    return found
base = snapshot()
open("/tmp/watch.log", "w").close()
while True:
    new = snapshot() - base
    if new:
        with open("/tmp/watch.log", "a") as f:
            f.write("".join(f"{time.time():.3f} {p}\n" for p in sorted(new)))
        base |= new
    time.sleep(0.02)
' </dev/null >/dev/null 2>&1 &
sleep 0.5; echo planted
"""
HELD = (
    "turns:\n"
    f"  - bash: {json.dumps(PLANT)}\n"
    "  - bash: \"python3 -I -c 'import time; time.sleep(5)'; echo in=[$(ls -a /sandbox/in | tr '\\n' ' ')];"
    ' echo watch=[$(cat /tmp/watch.log)]"\n'
    '  - write: {path: late.txt, content: "written while the finaliser was held\\n"}\n'
    '  - bash: "echo final-watch=[$(cat /tmp/watch.log)]"\n'
    "  - text: done\n"
)


@e2e
def test_the_held_finaliser_reads_nothing_early_and_runs_nothing_planted(make_repo, sandbox, write_script) -> None:
    repo = make_repo()
    res = sandbox("run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(HELD)), "--json")
    assert res.code == 0, res.stderr
    s = res.json()
    run_dir = Path(s["run_dir"])
    events = audit_events(run_dir)
    out = "\n".join(tool_results(run_dir))
    # The scenario: the finaliser had been started ahead (its go-ahead file was being made) and was held.
    (inputs,) = [line for line in out.splitlines() if line.startswith("in=[")]
    listed = inputs[4:-1].split()
    assert "finalise-ready.part" in listed and "finalise-ready" not in listed, inputs
    assert started_ahead(events)
    # It packed nothing while the agent worked: no object, no lock appeared in the agent's repository.
    assert "watch=[]" in out and "final-watch=[]" in out, out
    # Its go-ahead came after the agent's result, and it packed what the agent wrote while it was held.
    types = [e["type"] for e in events]
    fin_at = next(
        i for i, e in enumerate(events) if e["type"] == "container_created" and e["payload"]["role"] == "finaliser"
    )
    assert types.index("result") < fin_at, types
    assert git(repo, "show", f"{s['branch']}:late.txt") == "written while the finaliser was held"
    # Nothing planted ran in it, and the end reason is the run's, not the planted files'.
    tree = git(repo, "ls-tree", "-r", "--name-only", s["branch"]).split()
    assert not [p for p in tree if "PWNED" in p], tree
    assert not list((run_dir / "out").glob("PWNED*")), list((run_dir / "out").iterdir())
    assert last_subject(repo, s["branch"]) == f"sandbox: uncommitted work left by run {s['id']}"
    assert (run_dir / "in" / "finalise-ready").read_text() == "completed"
    assert (s["status"], s["reason"]) == ("succeeded", "completed")
    nothing_left(run_dir.parent.parent, s["id"])


LONG_SLEEP = "  - bash: \"python3 -c 'import time; time.sleep(600)'\"\n    timeout_ms: 600000\n"
STOPPED = {
    # reason: (extra options, script, exit code)
    "idle": (["--idle-timeout", "5"], "turns:\n" + PARTIAL + LONG_SLEEP + "  - text: never\n", 12),
    # $0.36 a call: over $1 on the third call (once the agent has worked 4 s), the fourth is refused.
    "budget": (
        ["--budget-usd", "1"],
        "turns:\n"
        + PARTIAL
        + SLEEP_4
        + '  - bash: "echo three"\n  - bash: "echo four"\n  - text: never\n'
        + "usage: {input_tokens: 120000, output_tokens: 0}\n",
        13,
    ),
    "turns": (["--max-turns", "2"], "turns:\n" + PARTIAL + SLEEP_4 + '  - bash: "echo three"\n  - text: never\n', 14),
}


@e2e
@pytest.mark.parametrize("reason", list(STOPPED))
def test_a_stop_reaches_the_held_finaliser(reason, make_repo, sandbox, write_script) -> None:
    options, script, code = STOPPED[reason]
    repo = make_repo()
    res = sandbox(
        "run", "--repo", str(repo), "--task", "t", *options, "--model-script", str(write_script(script)), "--json"
    )
    assert res.code == code, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("killed", reason), s["message"]
    assert started_ahead(audit_events(s["run_dir"]))
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    want = f"sandbox: run {s['id']} was stopped ({reason}); uncommitted work at that point"
    assert last_subject(repo, s["branch"]) == want
    nothing_left(Path(s["run_dir"]).parent.parent, s["id"])


def go_ahead_part(state_dir: Path) -> bool:
    """The finaliser's start ahead is under way (its go-ahead's file is made just before its container)."""
    runs = state_dir / "runs"
    return runs.exists() and any((d / "in" / "finalise-ready.part").exists() for d in runs.iterdir())


def go_ahead_given(state_dir: Path) -> bool:
    runs = state_dir / "runs"
    return runs.exists() and any((d / "in" / "finalise-ready").exists() for d in runs.iterdir())


def finaliser_held(state_dir: Path) -> bool:
    if not go_ahead_part(state_dir) or not agent_container_exists(state_dir, "finalise"):
        return False
    name = f"sbx-{the_run(state_dir)}-finalise"
    res = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], capture_output=True, text=True)
    return res.stdout.strip() == "true"


def wait_closely(predicate: Any, timeout: float, what: str) -> None:
    """wait_for, polling every 5 ms: the moments aimed at here last a fraction of a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


SLEEPER = "turns:\n" + PARTIAL + LONG_SLEEP + "  - text: never\n"


@e2e
@pytest.mark.parametrize("moment", ["ahead_starting", "held"])
def test_sigterm_while_the_finaliser_is_started_ahead_lands_the_work(
    moment, make_repo, state_dir, write_script
) -> None:
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    try:
        moment_came = go_ahead_part if moment == "ahead_starting" else finaliser_held
        wait_closely(lambda: moment_came(state_dir), 120, moment)
    finally:
        proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert "Traceback" not in err, err
    s = json.loads(out)
    assert code == 130 and (s["status"], s["reason"]) == ("killed", "interrupted"), err
    assert started_ahead(audit_events(s["run_dir"]))
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    want = f"sandbox: run {s['id']} was stopped (interrupted); uncommitted work at that point"
    assert last_subject(repo, s["branch"]) == want
    nothing_left(state_dir, s["id"])


WORK_AFTER_4S = "turns:\n" + SLEEP_4 + '  - write: {path: done.txt, content: "finished work\\n"}\n  - text: done\n'
WORK_AFTER_6S = WORK_AFTER_4S.replace("sleep(4)", "sleep(6)")


@e2e
# Side by side, another state directory's gc can remove this one's recovery finaliser (see test_start_and_settle).
@pytest.mark.xdist_group("start-and-settle-gc")
@pytest.mark.parametrize("moment", ["ahead_starting", "released"])
def test_sigkill_around_the_finaliser_started_ahead_is_recovered_by_gc(
    moment, make_repo, sandbox, state_dir, write_script
) -> None:
    repo = make_repo()
    script = SLEEPER if moment == "ahead_starting" else WORK_AFTER_4S
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(script)), "--json"
    )
    try:
        moment_came = go_ahead_part if moment == "ahead_starting" else go_ahead_given
        wait_closely(lambda: moment_came(state_dir), 120, moment)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        finish(proc, 30)
    run_id = the_run(state_dir)
    res = gc_alone(sandbox)
    assert res.code == 0, res.stderr
    mine = [r for r in res.json() if r["run_id"] == run_id]
    assert [r["action"] for r in mine] == ["recovered"], json.dumps(mine, indent=1) + res.stderr
    nothing_left(state_dir, run_id)
    r = row(state_dir, run_id)
    assert (r["status"], r["reason"]) == ("killed", "interrupted"), r
    events = audit_events(state_dir / "runs" / run_id)
    assert events[-1]["type"] == "run_ended"
    if moment == "released":
        assert git(repo, "show", f"sandbox/{run_id}:done.txt") == "finished work"
    else:
        assert git(repo, "show", f"sandbox/{run_id}:partial.txt") == "work before the stop"
    verify = sandbox("audit", "verify", run_id)
    assert verify.code == 0, verify.stdout + verify.stderr


# --- a sidecar that dies between `listening` and `ready` ---------------------------------------------------------


@e2e
def test_a_sidecar_that_dies_before_ready_ends_the_run_clearly(make_repo, sandbox, write_script) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs a supervisor running as root (the sidecar runs as another user only then)")
    # The host (root) reads the script; the sidecar's user cannot: it dies loading it, after `listening`.
    script = write_script('turns:\n  - write: {path: w.txt, content: "w\\n"}\n  - text: done\n')
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    res = sandbox("run", "--repo", str(make_repo()), "--task", "t", "--model-script", str(script), "--json")
    s = res.json()
    assert (res.code, s["status"], s["reason"]) == (10, "failed", "error"), res.stderr
    assert s["message"].startswith("the sidecar did not become ready: "), s["message"]
    assert "cannot read model script" in s["message"] and "Permission denied" in s["message"], s["message"]
    events = audit_events(s["run_dir"])
    types = [e["type"] for e in events]
    assert "listening" in types and "ready" not in types and "model_call" not in types, types
    nothing_left(Path(s["run_dir"]).parent.parent, s["id"])


# --- a finaliser started ahead that ends before its go-ahead -------------------------------------------------------


@e2e
def test_a_held_finaliser_that_ended_is_replaced(make_repo, sandbox, state_dir, write_script) -> None:
    """Before issue 15 the finaliser was started at the collection, so whatever stopped containers while the
    agent worked could not take it. Now one is held for the whole run: if it ends before its go-ahead, the
    collection must start one the usual way, as it does when the start ahead failed."""
    repo = make_repo()
    script = write_script(WORK_AFTER_6S)
    proc = start_run(state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--json")
    try:
        wait_closely(lambda: finaliser_held(state_dir), 120, "the finaliser held")
        run_id = the_run(state_dir)
        subprocess.run(["docker", "kill", f"sbx-{run_id}-finalise"], check=True, capture_output=True)
    finally:
        code, out, _ = finish(proc, 120)
    try:
        s = json.loads(out)
        assert (code, s["status"], s["reason"]) == (0, "succeeded", "completed"), s["message"]
        assert git(repo, "show", f"{s['branch']}:done.txt") == "finished work"
    finally:
        # The work the run kept for gc is imported by it, and nothing of the run stays either way.
        gc_alone(sandbox)
        nothing_left(state_dir, run_id)


# --- SIGKILL right after the go-ahead, while the finaliser packs ---------------------------------------------------


@e2e
@pytest.mark.xdist_group("start-and-settle-gc")
def test_gc_recovers_a_run_whose_finaliser_was_stopped_while_bundling(
    make_repo, sandbox, state_dir, write_script
) -> None:
    """The supervisor is SIGKILLed right after the finaliser's go-ahead. With a large change the finaliser is
    still bundling when `sandbox gc` removes the run's workloads (seen with 400 MB of new data: gc's first pass
    fails, its second recovers). Here the moment is made exact: the released finaliser is let finish, then the
    lock a removal in the middle of `git bundle create` leaves is put in its place, as that removal leaves it."""
    repo = make_repo()
    proc = start_run(
        state_dir,
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script(WORK_AFTER_4S)),
        "--json",
    )
    try:
        wait_closely(lambda: go_ahead_given(state_dir), 120, "the finaliser's go-ahead")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        finish(proc, 30)
    run_id = the_run(state_dir)
    out = state_dir / "runs" / run_id / "out"
    wait_closely(lambda: (out / "result.json").exists(), 120, "the released finaliser's end")
    lock = out / "work.bundle.lock"
    lock.touch()
    os.chown(lock, out.stat().st_uid, out.stat().st_gid)
    try:
        res = gc_alone(sandbox)
        assert res.code == 0, res.stderr
        mine = [r for r in res.json() if r["run_id"] == run_id]
        assert [r["action"] for r in mine] == ["recovered"], json.dumps(mine, indent=1)
        assert git(repo, "show", f"sandbox/{run_id}:done.txt") == "finished work"
    finally:
        gc_alone(sandbox)  # the failed finaliser removed the lock: this one recovers it
        nothing_left(state_dir, run_id)
