"""The Docker engine restarts mid-run. This stops every container on the engine, so it runs on its own, after
the parallel suite (`make test` runs `-m serial` separately)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO_ROOT, git, labelled, start_run
from .test_faults_e2e import bash_started, finish, no_leftovers, only_run_id, wait_for
from .test_limits_e2e import SLEEPER

pytestmark = [pytest.mark.docker, pytest.mark.serial, pytest.mark.usefixtures("docker_ready")]

PIDFILE = Path("/var/run/docker.pid")


def stop_dockerd() -> tuple[int, list[bytes]]:
    """Stop the engine this machine's docker.sock belongs to; its pid and command line."""
    pid = int(PIDFILE.read_text().strip())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    os.kill(pid, signal.SIGTERM)
    return pid, cmdline


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state == "Z":  # exited; its parent has yet to reap it
            return
        assert time.monotonic() < deadline, "dockerd did not stop"
        time.sleep(0.2)


def start_dockerd(cmdline: list[bytes]) -> None:
    """Start the engine again with the same command line, detached (not this process's child: a child that
    exits later would stay a zombie of the test run), and wait until it answers."""
    subprocess.run(
        [
            "setsid",
            "sh",
            "-c",
            'exec "$@" >>/var/log/dockerd.log 2>&1 </dev/null &',
            "sh",
            *[a.decode() for a in cmdline],
        ],
        check=True,
        timeout=30,
    )
    subprocess.run([str(REPO_ROOT / "scripts" / "ensure-docker")], check=True, timeout=120)


def restart_dockerd() -> None:
    pid, cmdline = stop_dockerd()
    wait_gone(pid)
    start_dockerd(cmdline)


def test_dockerd_restart_mid_run_keeps_the_work(make_repo, state_dir, write_script) -> None:
    if os.geteuid() != 0 or not PIDFILE.exists():
        pytest.skip("restarting the engine needs root and a dockerd with /var/run/docker.pid")
    repo = make_repo()
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "t", "--model-script", str(write_script(SLEEPER)), "--json"
    )
    wait_for(lambda: bash_started(state_dir), 90, "the Bash call")
    run_id = only_run_id(state_dir)
    restart_dockerd()
    code, out, err = finish(proc, 400)
    assert "Traceback" not in err, err
    s = json.loads(out)
    # The engine's restart stopped the agent; the supervisor waited for the engine, packed and imported the
    # work, tore down, and says what happened with the environment's exit code.
    assert code == 3, err
    assert "Docker engine went away" in s["message"] and s["reason"] == "error"
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the stop"
    no_leftovers(state_dir, run_id)
    assert labelled(run_id) == []


def test_engine_gone_for_good_keeps_the_work_for_gc(make_repo, state_dir, sandbox, write_script) -> None:
    if os.geteuid() != 0 or not PIDFILE.exists():
        pytest.skip("stopping the engine needs root and a dockerd with /var/run/docker.pid")
    repo = make_repo()
    proc = start_run(
        state_dir,
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script(SLEEPER)),
        "--json",
        env={"SANDBOX_ENGINE_WAIT_SECONDS": "10"},
    )
    wait_for(lambda: bash_started(state_dir), 90, "the Bash call")
    run_id = only_run_id(state_dir)
    pid, cmdline = stop_dockerd()
    try:
        code, out, err = finish(proc, 300)
    finally:
        wait_gone(pid)
        start_dockerd(cmdline)
    assert "Traceback" not in err, err
    s = json.loads(out)
    # The engine never came back while the run waited: exit 3, the work kept where the summary says.
    assert code == 3 and "stopped answering" in s["message"], err
    kept = Path(s["kept"])  # the workspace, or its quota filesystem's image (unmounted: nothing is left mounted)
    assert (kept / "partial.txt").read_text() == "work before the stop\n" if kept.is_dir() else kept.is_file()
    assert str(state_dir) not in Path("/proc/mounts").read_text()
    assert s["branch"] is None

    # With the engine back, gc imports it and removes what the run left.
    res = sandbox("gc", "--json", timeout=300)
    assert res.code == 0, res.stderr
    (mine,) = [r for r in res.json() if r["run_id"] == run_id]
    assert mine["action"] == "recovered", mine
    assert git(repo, "show", f"sandbox/{run_id}:partial.txt") == "work before the stop"
    no_leftovers(state_dir, run_id)
