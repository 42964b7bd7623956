"""RunHandle.ask: one line to a Unix socket a workload listens on, its short answer back. The supervisor's settle
(run/watch.py) asks the sidecar's control socket through it, knowing no backend: Docker and the in-memory backend
find the socket in the workload's mount on this machine (here), Kubernetes in the pod through `exec`
(test_kubernetes_backend.py)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from agent_sandbox.backend.base import ASK_LIMIT, ask_unix, mounted_path
from agent_sandbox.backend.plan import Mount
from agent_sandbox.run import watch as watch_module
from agent_sandbox.sidecar.relay import listen_unix
from tests.memory_backend import READY, MemoryBackend, Running, idle
from tests.test_supervisor_logic import RESULT, _assistant, _call, _supervisor, agent_saying

CONTROL = "/sandbox/model-out/control.sock"


def _serve_once(path: str, answer: bytes, got: list[bytes], close: bool = True) -> threading.Thread:
    server, _ = listen_unix(path, 1)

    def run() -> None:
        conn, _ = server.accept()
        got.append(conn.makefile("rb").readline())
        conn.sendall(answer)
        if close:
            conn.close()
        else:
            threading.Timer(2, conn.close).start()
        server.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_mounted_path_finds_the_deepest_mount_and_never_climbs_out() -> None:
    mounts = [
        Mount(source="/runs/r1/model", target="/sandbox/model-out", read_only=False),
        Mount(source="/runs/r1/in", target="/sandbox", read_only=True),
    ]
    assert mounted_path(mounts, CONTROL) == "/runs/r1/model/control.sock"
    assert mounted_path(mounts, "/sandbox/task.md") == "/runs/r1/in/task.md"
    assert mounted_path(mounts, "/sandbox/model-out") == "/runs/r1/model"
    assert mounted_path(mounts, "/sandbox/model-out/../../etc/passwd") is None
    assert mounted_path(mounts, "/sandbox-other/x") is None
    assert mounted_path(mounts, "/etc/passwd") is None


def test_ask_unix_reaches_a_socket_of_any_path_length(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    path = str(deep / "control.sock")
    assert len(path) > 108  # beyond a socket address: reached by its directory's descriptor
    got: list[bytes] = []
    t = _serve_once(path, b"ok\n", got)
    assert ask_unix(path, b"token\n", 3) == b"ok\n"
    t.join(5)
    assert got == [b"token\n"]
    assert ask_unix(str(deep / "nothing.sock"), b"token\n", 1) is None


def test_ask_unix_returns_what_came_within_its_timeout_and_limit(tmp_path: Path) -> None:
    got: list[bytes] = []
    t = _serve_once(str(tmp_path / "a.sock"), b"ok\n", got, close=False)  # answers, keeps the connection open
    assert ask_unix(str(tmp_path / "a.sock"), b"x\n", 0.5) == b"ok\n"
    t.join(5)
    t = _serve_once(str(tmp_path / "b.sock"), b"y" * (ASK_LIMIT * 2), got)
    assert ask_unix(str(tmp_path / "b.sock"), b"x\n", 3) == b"y" * ASK_LIMIT
    t.join(5)


def test_docker_asks_in_the_workloads_bind_mount(tmp_path: Path) -> None:
    from agent_sandbox.backend.docker import DockerRun

    run = DockerRun(cast(Any, None), "r1", None)
    model = tmp_path / "model"
    model.mkdir()
    assert run.ask("sidecar", CONTROL, b"t\n", 1) is None  # not started by this handle: nothing to ask
    run._mounts["sidecar"] = [Mount(source=str(model), target="/sandbox/model-out", read_only=False)]
    got: list[bytes] = []
    t = _serve_once(str(model / "control.sock"), b"ok\n", got)
    assert run.ask("sidecar", CONTROL, b"token\n", 3) == b"ok\n"
    t.join(5)
    assert got == [b"token\n"]
    assert run.ask("sidecar", "/elsewhere/control.sock", b"t\n", 1) is None


def _settling_sidecar(w: Running) -> int:
    """A sidecar that answers the supervisor's settle as the real one does: `settled` with its token, then ok."""
    w.say(READY)
    w.sleep(0.05)
    w.say(_call(2, 1, 0.01))
    server, _ = listen_unix(str(w.mount("/sandbox/model-out") / "control.sock"), 1)
    server.settimeout(0.1)
    with server:
        while not w.stopped.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                token = conn.makefile().readline().strip()
                w.say({"event": "settled", "n": 3, "token": token, "inflight": 0, "calls": 1})
                conn.sendall(b"ok\n")
            break
    return idle(w)


def test_the_settle_asks_the_sidecar_through_the_run_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "commit", "-q", "--allow-empty", "-m", "base"]):
        subprocess.run(cmd, cwd=repo, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_DISK_QUOTA", "sampled")
    monkeypatch.setattr(watch_module, "STOP_GRACE", 0.2)
    backend = MemoryBackend({"sidecar": _settling_sidecar, "agent": agent_saying(_assistant("m1"), RESULT)})
    sup = _supervisor(tmp_path, repo, backend)
    summary = sup.run()
    assert summary.reason == "completed", summary.message
    (asked,) = backend.handles[sup.spec.run_id].asked
    assert asked[:2] == ("sidecar", CONTROL) and asked[2].endswith(b"\n")
    events = [line for line in (sup.run_dir / "audit.jsonl").read_text().splitlines() if '"settled"' in line]
    assert len(events) == 1 and asked[2].strip().decode() in events[0]
