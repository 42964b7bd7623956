"""The warm daemon and its pool end to end: real Docker, real Claude Code, the scripted model. Each test has a
state directory of its own and its own daemon (started through the `sandbox` console script, which is what
hands `sandbox run` over), stops it at the end and leaves nothing labelled with its state directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox import wire
from agent_sandbox.config.policy import Policy
from agent_sandbox.run.liveness import state_id
from agent_sandbox.run.workloads import HELD_INPUTS, HELD_TARGET, SIDECAR_UID
from agent_sandbox.sidecar.contract import HELD_KEY

from .conftest import CliResult, alive, audit_events, git, labelled, tool_results, transcript
from .test_limits_e2e import SLEEPER

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

SANDBOX_BIN = Path(sys.executable).with_name("sandbox")

WORKER = """
turns:
  - write: {path: notes.md, content: "from a pooled run\\n"}
  - text: "Done."
"""


MORE = """
turns:
  - write: {path: more.md, content: "and more\\n"}
  - text: "Done."
"""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Warm:
    """One test's state directory and the daemon it starts there."""

    def __init__(self, root: Path, cwd: Path) -> None:
        self.state = root / "state"
        self.state.mkdir()
        self.cwd = cwd
        self.label = f"sandbox.state={state_id(self.state)}"
        self.pids: set[int] = set()  # every daemon and keeper seen: none may outlive the test

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != wire.DAEMON_ENV}
        return {**env, "SANDBOX_STATE_DIR": str(self.state), **(extra or {})}

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
        p = subprocess.run(
            [str(SANDBOX_BIN), *args],
            capture_output=True,
            text=True,
            env=self.env(env),
            cwd=self.cwd,
            timeout=timeout,
        )
        return CliResult(p.returncode, p.stdout, p.stderr)

    def popen(self, *args: str, out: Path, err: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`sandbox` in the background, its streams in files (the daemon's run writes into them too)."""
        with open(out, "w") as o, open(err, "w") as e:
            return subprocess.Popen(
                [str(SANDBOX_BIN), *args], stdout=o, stderr=e, text=True, env=self.env(env), cwd=self.cwd
            )

    def start(self, pool: int) -> dict[str, Any]:
        res = self.cli("daemon", "start", "--pool", str(pool), "--json", timeout=120)
        for _ in range(3):
            assert res.code == 0, res.stdout + res.stderr
            status = res.json()
            self._note(status)
            if status["current"]:
                break
            # The package's files changed between the daemon's start and this look (someone edits them): such a
            # daemon refuses every client as stale, as it should; start it again on the code as it is now.
            time.sleep(1)
            res = self.cli("daemon", "restart", "--pool", str(pool), "--json", timeout=200)
        assert status["running"] and status["current"], status
        return status

    def status(self) -> dict[str, Any]:
        res = self.cli("daemon", "status", "--json", timeout=60)
        assert res.code == 0, res.stderr
        status = res.json()
        self._note(status)
        return status

    def _note(self, status: dict[str, Any]) -> None:
        for key in ("pid", "keeper"):
            if status.get(key):
                self.pids.add(int(status[key]))

    def wait_ready(self, ready: int = 1, timeout: float = 90) -> dict[str, Any]:
        def pool() -> dict[str, Any] | None:
            p = self.status().get("pool")
            return p if p and p["ready"] >= ready else None

        return wait_for(pool, timeout, f"{ready} ready slot(s)")

    def slots(self) -> set[str]:
        """Run ids of the sidecars labelled with this state directory (a ready slot's, or a run's)."""
        res = subprocess.run(
            ["docker", "ps", "-a", "--filter", f"label={self.label}", "--format", '{{.Label "sandbox.run-id"}}'],
            capture_output=True,
            text=True,
            check=True,
        )
        return set(res.stdout.split())

    def leftovers(self) -> list[str]:
        out = []
        for kind in (["ps", "-a"], ["network", "ls"]):
            res = subprocess.run(
                ["docker", *kind, "-q", "--filter", f"label={self.label}"], capture_output=True, text=True, check=True
            )
            out += res.stdout.split()
        return out

    def daemon_runs(self) -> int:
        log = self.state / "daemon.log"
        return log.read_text().count("daemon_run ") if log.exists() else 0

    def log(self) -> str:
        log = self.state / "daemon.log"
        return log.read_text() if log.exists() else ""

    def show(self, run_id: str) -> dict[str, Any]:
        res = self.cli("show", run_id, "--json", timeout=60)
        assert res.code == 0, res.stderr
        return res.json()["run"]

    def bash_started(self) -> str | None:
        """The run id whose agent has begun a Bash call, if any."""
        for audit in (self.state / "runs").glob("*/audit.jsonl"):
            for line in audit.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    e = json.loads(line)
                    if e["type"] == "tool_call" and e["payload"].get("name") == "Bash":
                        return audit.parent.name
        return None


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[Warm]:
    # A short path: the daemon's socket lives in the state directory, and a Unix socket's path is short.
    root = Path(tempfile.mkdtemp(prefix="sbxd-", dir="/tmp"))
    w = Warm(root, tmp_path)
    try:
        yield w
    finally:
        stopped = w.cli("daemon", "stop", "--json", timeout=200)
        problems = []
        if stopped.code != 0:
            problems.append(f"`sandbox daemon stop` failed: {stopped.stderr}")
        left: list[str] = []
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not w.leftovers(), 30, "the state directory's objects to go")
        left = w.leftovers()
        if left:
            problems.append(f"left on the engine with {w.label}: {left}")
        survivors = [pid for pid in w.pids if alive(pid)]
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if survivors:
            problems.append(f"daemon/keeper processes outlived `sandbox daemon stop`: {survivors}")
        mounted = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if str(root) in ln]
        if mounted:
            # A pooled agent's mount points and the objects bound on them go with their run, or their slot.
            problems.append(f"mounts left under the state directory: {mounted}")
            for point in sorted(mounted, reverse=True):
                subprocess.run(["umount", "-l", point], check=False)
        if str(root) not in Path("/proc/mounts").read_text():
            shutil.rmtree(root, ignore_errors=True)
        if problems:
            pytest.fail("; ".join(problems))


def held_agent_processes(run_id: str) -> list[str]:
    """The command lines running in a slot's held agent container."""
    res = subprocess.run(
        ["docker", "top", f"sbx-{run_id}-agent", "-o", "pid,args"], capture_output=True, text=True, check=True
    )
    return [line.split(None, 1)[1] for line in res.stdout.splitlines()[1:]]


def run_args(repo: Path, script: Path, *extra: str) -> list[str]:
    return ["run", "--repo", str(repo), "--task", "t", "--model-script", str(script), "--json", *extra]


def summary(proc: subprocess.Popen[str], out: Path, err: Path, timeout: float = 180) -> dict[str, Any]:
    """The summary a background `sandbox run --json` printed, once it exited 0."""
    code = finish(proc, timeout)
    assert code == 0, err.read_text()
    return json.loads(out.read_text())


def put_input(run_dir: Path, name: str, data: object) -> None:
    """A file in the run's inputs (the agent's /sandbox/in, which it can only read), renamed into place whole."""
    part = run_dir / "in" / f"{name}.part"
    part.write_text(json.dumps(data))
    os.chmod(part, 0o644)
    part.rename(run_dir / "in" / name)


def finish(proc: subprocess.Popen[str], timeout: float = 180) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def gone(run_id: str, timeout: float = 10) -> None:
    """Nothing labelled with the run id within `timeout` seconds (the removal after the answer is quick)."""
    wait_for(lambda: labelled(run_id) == [], timeout, f"run {run_id}'s containers and networks to go")


# --- a pooled run -------------------------------------------------------------------------------------------


def test_pooled_run_is_served_by_the_daemon(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    assert (warm.state / "runs" / slot / "supervisor.lock").exists()
    # The slot's agent container is made too, confined and held: nothing in it runs but its init, which waits
    # for the run's start file; its workspace and objects are empty mount points until the run fills them.
    held = held_agent_processes(slot)
    assert len(held) == 1 and "init.py --held" in held[0], held
    points = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if slot in ln]
    assert sorted(Path(p).name for p in points) == ["host-objects", "workspace"], points
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")

    res = warm.cli(*run_args(repo, write_script(WORKER)))
    assert res.code == 0, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("succeeded", "completed")
    assert git(repo, "show", f"{s['branch']}:notes.md") == "from a pooled run"
    # The pool's agent and finaliser, made before the run, took the run's git identity at its start.
    author = Policy().git.author
    assert git(repo, "log", "-1", "--format=%an <%ae>", s["branch"]) == f"{author.name} <{author.email}>"
    assert git(repo, "diff", "--name-only", f"{base}..{s['branch']}") == "notes.md"
    # Served by the daemon, on the slot the keeper had ready.
    assert warm.daemon_runs() == 1, warm.log()
    assert s["id"] == slot
    status = warm.status()
    assert status["served"] == 1
    assert status["pool"]["claimed"] == 1 and status["pool"]["made"] >= 1
    assert f"pool_slot_claimed run_id={slot}" in warm.log()

    events = audit_events(s["run_dir"])
    types = [e["type"] for e in events]
    # The trail records the slot's networks as the run's, before anything of the run was started.
    nets = [e["payload"]["name"] for e in events if e["type"] == "network_created"]
    assert nets == [f"sbx-{slot}-int", f"sbx-{slot}-egress"]
    first_container = types.index("container_created")
    assert max(i for i, t in enumerate(types) if t == "network_created") < first_container
    assert types.index("checkout_prepared") < types.index("network_created")
    sidecar = events[first_container]["payload"]
    assert sidecar["role"] == "sidecar" and sidecar["security"]["name"] == f"sbx-{slot}-sidecar"
    # The pool's agent container is the run's, its confinement on record as if the run had made it.
    (agent,) = [e["payload"] for e in events if e["type"] == "container_created" and e["payload"]["role"] == "agent"]
    assert agent["security"]["name"] == f"sbx-{slot}-agent" and agent["command"][0] == "claude"
    assert agent["security"]["user"] == "1000:1000" and agent["security"]["read_only_root"] is True
    assert "sidecar" in agent["security"]["extra_hosts"]
    isolated = [e["payload"] for e in events if e["type"] == "network_isolated"]
    assert [i["container"] for i in isolated] == [f"sbx-{slot}-agent"], isolated
    (fin,) = [e["payload"] for e in events if e["type"] == "container_created" and e["payload"]["role"] == "finaliser"]
    assert fin["security"]["name"] == f"sbx-{slot}-finalise" and fin["security"]["no_network"] is True
    (teardown,) = [e["payload"] for e in events if e["type"] == "teardown"]
    assert teardown["after_answer"] is True and teardown["removed"] == [] and teardown["error"] is None
    assert types[-1] == "run_ended"
    verify = warm.cli("audit", "verify", s["id"])
    assert verify.code == 0, verify.stdout + verify.stderr

    gone(s["id"])
    run_dir = Path(s["run_dir"])
    assert not (run_dir / HELD_INPUTS / HELD_KEY).exists()
    assert not (run_dir / "workspace").exists()
    assert str(run_dir) not in Path("/proc/mounts").read_text()
    assert warm.show(s["id"])["status"] == "succeeded"

    # A follow-up on the next slot: the branch, the base commit and the identity the pool's finaliser packs with
    # are the run's (its start file), not those of a run named after the slot.
    warm.wait_ready(1)
    (slot2,) = warm.slots()
    follow = warm.cli(*run_args(repo, write_script(MORE, "more.yaml"), "--follow-up", s["id"]))
    assert follow.code == 0, follow.stderr
    s2 = follow.json()
    assert s2["id"] == slot2 and s2["status"] == "succeeded", s2
    assert s2["branch"] == s["branch"] and s2["base_commit"] == s["head"]
    history = git(repo, "rev-list", "--reverse", f"{base}..{s2['branch']}").split()
    assert history == s["commits"] + s2["commits"] and len(s2["commits"]) == 1
    assert git(repo, "show", f"{s2['branch']}:more.md") == "and more"
    gone(s2["id"])


# --- the client goes: a signal, or killed -------------------------------------------------------------------


def test_sigint_to_the_client_stops_the_daemons_run(warm: Warm, make_repo, write_script, tmp_path) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    repo = make_repo()
    out, err = tmp_path / "out.json", tmp_path / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(SLEEPER)), out=out, err=err)
    try:
        run_id = wait_for(warm.bash_started, 90, "the agent's Bash call")
        proc.send_signal(signal.SIGINT)
    finally:
        code = finish(proc)
    assert code == 130, err.read_text()
    assert "Traceback" not in err.read_text(), err.read_text()
    s = json.loads(out.read_text())
    assert run_id == s["id"] == slot
    assert (s["status"], s["reason"]) == ("killed", "interrupted")
    assert "SIGINT" in s["message"]
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    assert warm.daemon_runs() == 1
    row = warm.show(run_id)
    assert (row["status"], row["reason"]) == ("killed", "interrupted")
    gone(run_id, 15)


def test_sigkill_of_the_client_stops_the_daemons_run(warm: Warm, make_repo, write_script, tmp_path) -> None:
    warm.start(pool=0)  # the daemon without a pool: the run makes its own networks and sidecar
    repo = make_repo()
    out, err = tmp_path / "out.json", tmp_path / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(SLEEPER)), out=out, err=err)
    try:
        run_id = wait_for(warm.bash_started, 90, "the agent's Bash call")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        finish(proc, 30)
    assert warm.daemon_runs() == 1

    def ended() -> dict[str, Any] | None:
        row = warm.show(run_id)
        return row if row["status"] != "running" else None

    row = wait_for(ended, 60, "the run to end without its client")
    assert (row["status"], row["reason"]) == ("killed", "interrupted"), row
    assert "SIGTERM" in row["message"]
    # Its summary still went where the client's stdout pointed.
    s = wait_for(lambda: out.read_text().strip() and json.loads(out.read_text()), 30, "the summary")
    assert s["id"] == run_id and s["status"] == "killed"
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    gone(run_id, 15)
    wait_for(lambda: warm.status()["active"] == 0, 30, "the daemon to reap the run's process")


# --- the pool's keeper --------------------------------------------------------------------------------------


def test_daemon_stop_removes_the_unclaimed_slot(warm: Warm) -> None:
    status = warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    assert len(labelled(slot)) == 5  # its sidecar, agent and finaliser, and its two networks
    assert (warm.state / "daemon.sock").exists() and (warm.state / "pool.sock").exists()
    res = warm.cli("daemon", "stop", "--json", timeout=200)
    assert res.code == 0, res.stderr
    # `stop` returns once the keeper has removed its slots: nothing to wait for.
    assert warm.leftovers() == []
    assert not (warm.state / "daemon.sock").exists() and not (warm.state / "pool.sock").exists()
    assert not (warm.state / "runs" / slot).exists()
    assert not alive(status["pid"]) and not alive(status["keeper"])
    assert f"pool_slot_removed run_id={slot}" in warm.log()


def test_killed_keeper_is_restarted_and_its_slot_left_to_gc(warm: Warm) -> None:
    status = warm.start(pool=1)
    warm.wait_ready(1)
    (old,) = warm.slots()
    old_keeper = status["keeper"]
    os.kill(old_keeper, signal.SIGKILL)
    new_keeper = wait_for(lambda: (k := warm.status()["keeper"]) not in (None, old_keeper) and k, 15, "a new keeper")
    assert alive(new_keeper) and not alive(old_keeper)
    assert "daemon_keeper_ended" in warm.log()
    warm.wait_ready(1)
    (new,) = warm.slots() - {old}
    # The dead keeper's slot is nobody's now: nothing removed it, and its lock is free.
    assert len(labelled(old)) == 5  # its sidecar, agent and finaliser, and its two networks
    res = warm.cli("gc", "--json")
    assert res.code == 0, res.stderr
    actions = {r["run_id"]: r["action"] for r in res.json()}
    assert actions.get(old) == "removed", res.stdout
    assert actions.get(new) == "skipped", res.stdout  # the live keeper's slot stays
    assert labelled(old) == []
    # Its mount points (the held agent's workspace and objects) went with it.
    assert f"/runs/{old}/" not in Path("/proc/mounts").read_text()
    assert len(labelled(new)) == 5
    p = warm.status()["pool"]
    assert (p["ready"], p["claimed"]) == (1, 0)


# --- clients the daemon does not serve ----------------------------------------------------------------------


def test_stale_client_refused_and_daemon_off_runs_here(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    nulls = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(warm.state / "daemon.sock"))
            request = {
                "token": "f" * 64,
                "argv": ["sandbox", "run", "--task", "t"],
                "cwd": str(warm.cwd),
                "env": warm.env(),
                "umask": 0o022,
            }
            wire.send(sock, request, nulls)
            answer, _ = wire.receive(sock)
    finally:
        for fd in nulls:
            os.close(fd)
    assert answer is not None
    assert answer["accepted"] is False and answer["stale"] is True, answer

    repo = make_repo()
    res = warm.cli(*run_args(repo, write_script(WORKER)), env={wire.DAEMON_ENV: "off"})
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["status"] == "succeeded"
    assert git(repo, "show", f"{s['branch']}:notes.md") == "from a pooled run"
    # Neither handed over nor on the pool's slot: the run made its own, and removed them before it answered.
    assert s["id"] != slot
    assert warm.daemon_runs() == 0
    status = warm.status()
    assert status["served"] == 0
    assert (status["pool"]["ready"], status["pool"]["claimed"]) == (1, 0)
    assert warm.slots() == {slot}
    assert labelled(s["id"]) == []
    (teardown,) = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "teardown"]
    assert teardown["after_answer"] is False


def test_a_run_whose_agent_would_differ_takes_no_slot(warm: Warm, make_repo, write_script, tmp_path) -> None:
    """The pool's agent containers are made to the default policy: a run whose agent's container would be made
    otherwise (its limits here) runs on containers of its own, and the slot stays for a run it fits."""
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    policy = tmp_path / "tight.yaml"
    policy.write_text("limits:\n  memory: 768m\n  pids: 256\n")
    repo = make_repo()
    res = warm.cli(*run_args(repo, write_script(WORKER), "--policy", str(policy)))
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["status"] == "succeeded" and s["id"] != slot, s
    assert warm.daemon_runs() == 1  # handed over, but no slot fits it
    (agent,) = [
        e["payload"]
        for e in audit_events(s["run_dir"])
        if e["type"] == "container_created" and e["payload"]["role"] == "agent"
    ]
    assert (agent["security"]["memory_bytes"], agent["security"]["pids_limit"]) == (768 * 1024**2, 256)
    assert agent["security"]["name"] == f"sbx-{s['id']}-agent"
    assert not any(m.get("propagated") for m in agent["security"]["mounts"])
    status = warm.status()
    assert (status["pool"]["ready"], status["pool"]["claimed"]) == (1, 0)
    assert warm.slots() == {slot}
    # The default policy's run takes it.
    again = warm.cli(*run_args(repo, write_script(WORKER, "again.yaml")))
    assert again.code == 0, again.stderr
    assert again.json()["id"] == slot


# --- the agent against a pooled run -------------------------------------------------------------------------

PROBE = f"""
turns:
  - bash: "ls -la {HELD_TARGET} 2>&1; echo ls-rc=$?"
  - bash: "cat {HELD_TARGET}/{HELD_KEY} 2>&1; cat {HELD_TARGET}/config.json 2>&1; echo cat-end"
  - bash: "grep -c sidecar-in /proc/mounts; find / -name sidecar-in -not -path '/proc/*' 2>/dev/null; echo find-end"
  - text: looked
"""


def test_agent_cannot_see_the_held_sidecars_inputs(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    inputs = warm.state / "runs" / slot / HELD_INPUTS
    sidecar = f"sbx-{slot}-sidecar"

    # The held sidecar sees its inputs read-only, and cannot write there.
    info = json.loads(subprocess.run(["docker", "inspect", sidecar], capture_output=True, text=True, check=True).stdout)
    (mount,) = [m for m in info[0]["Mounts"] if m["Destination"] == HELD_TARGET]
    assert mount["RW"] is False and mount["Source"] == str(inputs), mount
    whoami = subprocess.run(["docker", "exec", sidecar, "id", "-u"], capture_output=True, text=True)
    assert whoami.stdout.strip() == str(SIDECAR_UID), whoami.stdout + whoami.stderr
    write = subprocess.run(
        ["docker", "exec", sidecar, "python3", "-c", f"open('{HELD_TARGET}/probe', 'w').write('x')"],
        capture_output=True,
        text=True,
    )
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    # Nor, on the host, is the directory the sidecar's user's to write.
    st = inputs.stat()
    assert st.st_uid != SIDECAR_UID and st.st_mode & 0o022 == 0, oct(st.st_mode)
    assert not (inputs / "probe").exists() and not (inputs / HELD_KEY).exists()

    fake = "sk-ant-api03-FAKE" + secrets.token_hex(12)
    repo = make_repo()
    res = warm.cli(*run_args(repo, write_script(PROBE)), env={"ANTHROPIC_API_KEY": fake})
    assert res.code == 0, res.stderr
    s = res.json()
    assert s["id"] == slot and warm.daemon_runs() == 1
    outputs = tool_results(s["run_dir"])
    assert len(outputs) == 3, outputs
    assert "No such file or directory" in outputs[0] and "ls-rc=2" in outputs[0], outputs[0]
    assert outputs[1].count("No such file or directory") == 2 and "cat-end" in outputs[1], outputs[1]
    assert outputs[2].split() == ["0", "find-end"], outputs[2]
    for out in outputs:
        assert fake not in out and fake[8:] not in out
    # The pooled sidecar did get the key, from its file: every model call went upstream with it.
    calls = [t for t in transcript(s["run_dir"]) if t.get("path") == "/v1/messages"]
    assert calls and {t["api_key_sha256"] for t in calls} == {hashlib.sha256(fake.encode()).hexdigest()}
    gone(s["id"])
    assert not (inputs / HELD_KEY).exists()
    for p in Path(s["run_dir"]).rglob("*"):
        if p.is_file():
            assert fake.encode() not in p.read_bytes(), p


# --- the daemon goes ----------------------------------------------------------------------------------------


def test_daemon_stop_leaves_a_running_run_be(warm: Warm, make_repo, write_script, tmp_path) -> None:
    status = warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    repo = make_repo()
    out, err = tmp_path / "out.json", tmp_path / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(SLEEPER)), out=out, err=err)
    try:
        run_id = wait_for(warm.bash_started, 90, "the agent's Bash call")
        assert run_id == slot
        res = warm.cli("daemon", "stop", "--json", timeout=200)
        assert res.code == 0, res.stderr
        assert not alive(status["pid"]) and not alive(status["keeper"])
        # The keeper removed what nobody had claimed, not the run's: it goes on, and its client with it.
        agent = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Running}}", f"sbx-{run_id}-agent"], capture_output=True, text=True
        )
        assert agent.stdout.strip() == "true", agent.stderr
        assert proc.poll() is None and warm.show(run_id)["status"] == "running"
        # Signals still reach it through its client.
        proc.send_signal(signal.SIGINT)
    finally:
        code = finish(proc)
    assert code == 130, err.read_text()
    s = json.loads(out.read_text())
    assert s["id"] == run_id and (s["status"], s["reason"]) == ("killed", "interrupted")
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    gone(run_id, 15)


def test_keeper_does_not_outlive_a_killed_daemon(warm: Warm) -> None:
    status = warm.start(pool=1)
    warm.wait_ready(1)
    keeper = status["keeper"]
    os.kill(status["pid"], signal.SIGKILL)
    try:
        wait_for(lambda: not alive(keeper), 20, "the keeper to end with its daemon")
        res = warm.cli("gc", "--json")
        assert res.code == 0, res.stderr
        assert warm.leftovers() == []
    finally:
        if alive(keeper):  # what `sandbox daemon stop` would have done: it removes its slots on SIGTERM
            os.kill(keeper, signal.SIGTERM)
            wait_for(lambda: not alive(keeper), 120, "the orphaned keeper to remove its slots")
