"""The warm pool, attacked: the agent of a pooled run goes for the next slot's held sidecar, for its own
sidecar's key and configuration, and leaves things behind for the next pooled run; clients end their runs at
awkward moments around a claim. Each test has its own state directory and daemon (tests/test_daemon_e2e.py's
`warm` fixture), stops it at the end and leaves nothing labelled with its state directory."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from agent_sandbox.run.workloads import HELD_INPUTS
from agent_sandbox.sidecar.contract import HELD_KEY

from ..conftest import audit_events, labelled, tool_results
from ..test_daemon_e2e import Warm, finish, gone, held_agent_processes, put_input, run_args, summary, wait_for
from ..test_daemon_e2e import warm as warm  # the fixture, re-exported

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]


def script(*commands: str) -> str:
    return "turns:\n" + "".join(f"  - bash: {json.dumps(c)}\n" for c in commands) + "  - text: done\n"


def inspect(name: str) -> dict:
    res = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)[0]


def network_gateways(run_id: str) -> list[str]:
    out = []
    for suffix in ("int", "egress"):
        res = subprocess.run(["docker", "network", "inspect", f"sbx-{run_id}-{suffix}"], capture_output=True, text=True)
        if res.returncode == 0:
            for cfg in json.loads(res.stdout)[0]["IPAM"]["Config"] or []:
                if cfg.get("Gateway"):
                    out.append(cfg["Gateway"])
    return out


def docker0() -> str:
    res = subprocess.run(
        ["docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}"],
        capture_output=True,
        text=True,
    )
    return res.stdout.strip() or "172.17.0.1"


# --- 1 and 2: the next slot's held sidecar, and this run's key ------------------------------------------------

SCAN = r"""
import json, socket, time
for _ in range(300):
    try:
        targets = json.load(open("/sandbox/in/targets.json"))
        break
    except (OSError, ValueError):
        time.sleep(0.2)
else:
    targets = []
out = {}
for ip in targets:
    for port in (8080, 3128, 80, 22):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((ip, port))
            out[f"{ip}:{port}"] = "CONNECTED"
        except ConnectionRefusedError:
            out[f"{ip}:{port}"] = "REFUSED"
        except OSError as exc:
            out[f"{ip}:{port}"] = f"{type(exc).__name__}: {exc}"
        finally:
            s.close()
print("SCAN " + json.dumps({"targets": targets, "results": out}))
"""

LOOK = [
    "ls -la /sandbox /sandbox/* 2>&1; ls -la /sandbox/sidecar-in 2>&1; echo ls-end",
    "cat /etc/hosts; grep -h sandbox /proc/self/mountinfo; echo mounts-end",
    "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f 2>/dev/null; done | sort -u; echo environ-end",
    "env; find / -xdev \\( -name 'key' -o -name 'config.json' -o -name 'sidecar-in' \\) -not -path '/proc/*' "
    "2>/dev/null | head -50; echo find-end",
    "grep -rIl sk-ant- / --exclude-dir=proc --exclude-dir=sys 2>/dev/null | head; echo grep-end",
]


def test_agent_reaches_neither_the_next_slot_nor_its_key(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    fake = "sk-ant-api03-POOLFAKE" + secrets.token_hex(12)
    repo = make_repo(files={"scan.py": SCAN, "README.md": "# scan\n"})
    sc = script("python3 scan.py", *LOOK)  # it waits for its targets
    out, err = warm.state.parent / "out.json", warm.state.parent / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(sc)), out=out, err=err, env={"ANTHROPIC_API_KEY": fake})
    try:
        wait_for(warm.bash_started, 90, "the agent's Bash call")
        # The keeper makes the next slot 3 s after the claim: its sidecar's and networks' addresses are the targets.
        nxt = wait_for(lambda: next(iter(warm.slots() - {slot}), None), 60, "the next slot")
        wait_for(lambda: warm.status()["pool"]["ready"] >= 1, 60, "the next slot to be ready")
        side = inspect(f"sbx-{nxt}-sidecar")
        ips = [n["IPAddress"] for n in side["NetworkSettings"]["Networks"].values() if n.get("IPAddress")]
        # The next slot's agent container too, made ahead and held like its sidecar.
        held = inspect(f"sbx-{nxt}-agent")
        held_ips = [n["IPAddress"] for n in held["NetworkSettings"]["Networks"].values() if n.get("IPAddress")]
        targets = [*ips, *held_ips, *network_gateways(nxt), docker0()]
        assert ips and held_ips, (side["NetworkSettings"], held["NetworkSettings"])
        put_input(warm.state / "runs" / slot, "targets.json", targets)
        s = summary(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert s["id"] == slot, s
    outputs = tool_results(s["run_dir"])
    assert len(outputs) == 1 + len(LOOK), outputs
    line = next(ln for ln in outputs[0].splitlines() if ln.startswith("SCAN "))
    scan = json.loads(line[5:])
    assert scan["targets"] == targets, scan
    # Nothing connected, and nothing even refused (a refusal means the address answers at all).
    reached = {k: v for k, v in scan["results"].items() if v in ("CONNECTED", "REFUSED")}
    assert reached == {}, scan
    # The held sidecar of the next slot never saw a connection: still held; its agent still runs nothing but
    # its init, waiting for a start.
    assert inspect(f"sbx-{nxt}-sidecar")["State"]["Running"]
    held_now = held_agent_processes(nxt)
    assert len(held_now) == 1 and "init.py --held" in held_now[0], held_now
    # No key material, wherever the agent looked.
    for o in outputs:
        assert fake not in o and fake[13:] not in o, o[:2000]
    assert "cannot access '/sandbox/sidecar-in': No such file" in outputs[1], outputs[1]
    assert "sidecar-in" not in outputs[2] + outputs[3] + outputs[4], outputs[2] + outputs[3] + outputs[4]
    assert "SANDBOX_SIDECAR_HELD" not in outputs[3], outputs[3]
    stream = out.read_text() + err.read_text()
    assert fake[13:] not in stream
    # The egress proxy saw no allowed connection to the targets either.
    allowed = [e for e in audit_events(s["run_dir"]) if e["type"].startswith("egress") and e["payload"].get("allowed")]
    assert not any(any(t in json.dumps(e) for t in targets) for e in allowed), allowed
    gone(s["id"], 15)
    run_dir = Path(s["run_dir"])
    assert not (run_dir / HELD_INPUTS / HELD_KEY).exists()
    for p in run_dir.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert fake[13:].encode() not in p.read_bytes(), p


# --- 3: what one pooled run leaves, the next finds ------------------------------------------------------------

MARK = "POOLMARK" + secrets.token_hex(4)

LEAVE = [
    f"echo {MARK} > /tmp/{MARK}; echo {MARK} > $HOME/{MARK}; echo {MARK} > /dev/shm/{MARK} 2>&1; "
    f"echo {MARK} > /workspace/.git/{MARK}; echo {MARK} > /var/tmp/{MARK}; echo left",
    f"for d in /sandbox/*; do echo {MARK} > $d/{MARK} 2>&1 && echo WROTE $d; done; echo sandbox-end",
    f"(setsid nohup bash -c 'exec -a {MARK} sleep 600' >/dev/null 2>&1 &); "
    f"(setsid nohup bash -c 'while :; do echo {MARK}-flood; done' >/dev/null 2>&1 &); "
    f"python3 -c 'import time; time.sleep(1)'; ps -eo args | grep -c '^{MARK} 600'; echo bg",
    # Floods its own output while the run answers and its containers go.
    "head -c 3000000 /dev/zero | tr '\\0' 'F'; echo",
]

FIND = [
    # The marker is put together in the shell: the command line itself, which ps shows, never holds it.
    f"m={MARK[:4]}; m=${{m}}{MARK[4:]}; "
    "ls /tmp /var/tmp /dev/shm $HOME /workspace /workspace/.git /sandbox/* 2>&1 | grep -c $m; "
    "ps -eo args | grep -v grep | grep -c $m; "
    "grep -rl $m /tmp /var/tmp /dev/shm $HOME /workspace /sandbox 2>/dev/null | wc -l; echo find-end",
]


def test_nothing_carries_over_to_the_next_pooled_run(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (first,) = warm.slots()
    repo = make_repo()
    a = warm.cli(*run_args(repo, write_script(script(*LEAVE), "a.yaml")))
    assert a.code == 0, a.stderr
    sa = a.json()
    assert sa["id"] == first
    left = tool_results(sa["run_dir"])
    assert len(left) == len(LEAVE) and left[0].strip().endswith("left") and "bg" in left[2], left
    assert left[2].split()[0] == "1", left[2]  # the sleeper was running in A
    wrote = left[1]
    # The agent's /sandbox mounts are read-only.
    assert "WROTE" not in wrote, wrote
    gone(sa["id"], 20)  # the flooder and the sleeper went with the container

    warm.wait_ready(1)
    (second,) = warm.slots()
    assert second != first
    b = warm.cli(*run_args(repo, write_script(script(*FIND), "b.yaml")))
    assert b.code == 0, b.stderr
    sb = b.json()
    assert sb["id"] == second
    (found,) = tool_results(sb["run_dir"])
    assert found.split() == ["0", "0", "0", "find-end"], found
    gone(sb["id"], 15)
    # On the host, nothing of A's marker where B's run lives.
    for p in Path(sb["run_dir"]).rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size < 10_000_000:
            assert MARK.encode() not in p.read_bytes(), p


# --- 4 and 5: runs that end right after their claim ------------------------------------------------------------


SLEEP = "python3 -c 'import time; time.sleep(30)'"  # Claude Code refuses a plain `sleep 30`


def test_runs_ending_at_the_claim_leave_no_slot_behind(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (first,) = warm.slots()
    repo = make_repo()
    # A run that ends at once, after its claim: its wall clock is a second.
    res = warm.cli(*run_args(repo, write_script(script(SLEEP)), "--timeout", "1"))
    s = res.json()
    assert s["id"] == first and s["status"] != "succeeded", s
    gone(first, 15)
    assert not (Path(s["run_dir"]) / HELD_INPUTS / HELD_KEY).exists()

    # The pool refills; a client interrupted right at its claim.
    warm.wait_ready(1)
    (second,) = warm.slots()
    assert second != first
    out, err = warm.state.parent / "out.json", warm.state.parent / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(script(SLEEP), "s.yaml")), out=out, err=err)
    try:
        wait_for(lambda: f"pool_slot_claimed run_id={second}" in warm.log(), 60, "the claim")
        proc.send_signal(signal.SIGINT)
    finally:
        code = finish(proc, 120)
    assert code != 0, out.read_text()
    assert "Traceback" not in err.read_text(), err.read_text()
    gone(second, 20)
    assert not (warm.state / "runs" / second / HELD_INPUTS / HELD_KEY).exists()

    # And again: the pool refills, with nothing of either claimed slot left.
    warm.wait_ready(1)
    (third,) = warm.slots()
    assert third not in (first, second)
    assert labelled(first) == [] and labelled(second) == []
    p = warm.status()["pool"]
    assert p["claimed"] == 2 and p["ready"] == 1, p


# --- 6: the repository's objects, bound into a container made before its run -----------------------------------

OBJECTS_ATTACK = [
    # Every way into the host's objects the agent's user has: a new file, an existing one, a rename, a chmod,
    # a mount of its own over them, and a remount read-write.
    "cd /sandbox/host-objects; touch planted 2>&1; f=$(find . -type f | head -1); echo $f; "
    "echo x >> $f 2>&1; mv $f $f.moved 2>&1; chmod 777 . 2>&1; "
    "mount -t tmpfs t /sandbox/host-objects 2>&1; mount -o remount,rw /sandbox/host-objects 2>&1; echo attack-end",
    "grep -E ' /sandbox/host-objects | /workspace ' /proc/self/mountinfo; echo mounts-end",
    "git -C /workspace log --oneline | wc -l; git -C /workspace cat-file -t HEAD; echo git-end",
]


def test_pooled_agent_cannot_write_the_host_objects(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    repo = make_repo()
    objects = repo / ".git" / "objects"

    def snapshot() -> dict[str, tuple[int, int, int]]:
        return {
            str(p.relative_to(objects)): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime_ns)
            for p in objects.rglob("*")
        }

    before = snapshot()
    res = warm.cli(*run_args(repo, write_script(script(*OBJECTS_ATTACK))))
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["id"] == slot, s
    attack, mounts, history = tool_results(s["run_dir"])
    assert "attack-end" in attack, attack
    # Each write refused, as on a read-only filesystem; no mount of its own.
    assert attack.count("Read-only file system") >= 3, attack
    assert "planted" not in "".join(before) and not (objects / "planted").exists()
    assert "must be superuser" in attack or "permission denied" in attack.lower(), attack
    # The objects' bind is read-only (and nosuid, nodev, noexec) in the container; the workspace's follows the
    # run's overlay.
    # The last mount on a path is the one seen there: the repository's objects the run bound on the point.
    line = [ln for ln in mounts.splitlines() if " /sandbox/host-objects " in ln][-1]
    assert line.split()[5].split(",")[:4] == ["ro", "nosuid", "nodev", "noexec"], mounts
    assert any(" /workspace " in ln and " - overlay " in ln for ln in mounts.splitlines()), mounts
    # The history is there to read.
    assert history.split()[:2] == ["1", "commit"], history
    gone(s["id"], 15)
    assert snapshot() == before
    # The run's mount points went with it (the next slot's are the next run's).
    assert f"{s['run_dir']}/" not in Path("/proc/mounts").read_text()
