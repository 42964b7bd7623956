"""The pieces that let a run's start and end overlap (issue 15), without an engine: the sidecar's early ports and
`listening` line, the agent's /etc/hosts, the wait for the sidecar's start, and the finaliser started ahead with
its go-ahead's note. tests/hostile/test_start_and_settle.py attacks the same end to end."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.backend.base import NotHeld
from agent_sandbox.backend.docker import DockerRun, hosts_text
from agent_sandbox.backend.plan import NOTE_PATTERN, ExitInfo, Started
from agent_sandbox.run.workloads import FINALISER_GO_AHEAD
from agent_sandbox.sidecar import __main__ as sidecar_main
from agent_sandbox.sidecar.events import SidecarListening

from .memory_backend import MemoryBackend
from .test_supervisor_logic import _supervisor
from .test_supervisor_logic import repo as repo  # the same repository fixture


def test_hosts_text_names_loopback_itself_and_the_given_names() -> None:
    text = hosts_text({"sidecar": "172.30.0.2"}, ("abc123", "172.30.0.3"))
    rows = [line.split("\t") for line in text.splitlines()]
    assert rows == [
        ["127.0.0.1", "localhost"],
        ["::1", "localhost ip6-localhost ip6-loopback"],
        ["172.30.0.3", "abc123"],
        ["172.30.0.2", "sidecar"],
    ]


@pytest.mark.parametrize("bad", ["host-gateway", "sidecar.evil", "1.2.3.4\n5.6.7.8 api.anthropic.com", ""])
def test_hosts_text_takes_addresses_only(bad: str) -> None:
    # A name's value is never written unchecked: no second line can be smuggled into the agent's /etc/hosts.
    with pytest.raises((ValueError, RuntimeError)):
        hosts_text({"sidecar": bad}, ("h", "172.30.0.3"))


def test_the_sidecar_listens_and_says_so_before_its_heavy_imports() -> None:
    lines: list[dict[str, Any]] = []
    gateway, proxy = sidecar_main.open_ports({"gateway_port": 0, "proxy_port": 0}, lines.append)
    try:
        (line,) = lines
        # The hand-written line is the model's, field for field.
        assert SidecarListening.model_validate({k: v for k, v in line.items() if k != "event"})
        assert line["event"] == SidecarListening.TYPE
        # A client that comes before anything serves is held in the backlog, not refused.
        with socket.create_connection(gateway.getsockname()) as early:
            early.sendall(b"GET / HTTP/1.0\r\n\r\n")
            gateway.setblocking(True)
            accepted, _ = gateway.accept()
            with accepted:
                assert accepted.recv(64).startswith(b"GET /")
    finally:
        gateway.close()
        proxy.close()


def test_the_sidecar_module_imports_no_heavy_package_at_start() -> None:
    # What runs before `listening`: the standard library and contract.py alone (a fifth of a second otherwise).
    import subprocess
    import sys

    code = (
        "import sys, agent_sandbox.sidecar.__main__ as m; "
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('aiohttp', 'pydantic', 'yaml')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Engine:
    """The little of DockerBackend that the wait for the sidecar uses."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.running = True

    def status(self, container: str) -> ExitInfo:
        return ExitInfo(running=self.running, exit_code=None if self.running else 137)

    def address(self, container: str, network: str) -> str:
        self.asked.append(container)
        return "172.30.0.2"


def _run() -> tuple[DockerRun, _Engine]:
    engine = _Engine()
    run = DockerRun(engine, "r1", {"sandbox.run-id": "r1"})  # type: ignore[arg-type]
    run._prepared = True
    return run, engine


def test_a_workload_that_reaches_the_sidecar_waits_for_its_start() -> None:
    run, engine = _run()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(run._sidecar_address()))
    waiter.start()
    time.sleep(0.2)
    assert got == [] and engine.asked == []  # still waiting: the sidecar has no address yet
    run._sidecar.run(lambda: Started(security={}))
    waiter.join(5)
    assert got == ["172.30.0.2"]


def test_a_failed_sidecar_start_fails_the_waiting_workload() -> None:
    run, engine = _run()

    def no_image() -> Started:
        raise RuntimeError("no such image")

    with pytest.raises(RuntimeError, match="no such image"):
        run._sidecar.run(no_image)
    with pytest.raises(RuntimeError, match="the sidecar did not start: no such image"):
        run._sidecar_address()
    assert engine.asked == []


def test_the_go_ahead_carries_a_word_and_nothing_else(tmp_path: Path) -> None:
    run, _ = _run()
    gate = tmp_path / "finalise-ready"
    for bad in ("timeout; rm -rf /", "a" * 33, "two words", "x\n"):
        run._go_ahead["finaliser"] = str(gate)
        with pytest.raises(ValueError):
            run.release("finaliser", bad)
        assert not gate.exists()
    run.release("finaliser", "timeout")
    assert gate.read_text() == "timeout" and not list(tmp_path.glob("*.part"))
    with pytest.raises(RuntimeError, match="has had it"):
        run.release("finaliser", "timeout")


def test_a_held_workload_that_ended_meanwhile_is_not_released_but_replaced(tmp_path: Path) -> None:
    # A finaliser started ahead and killed while the agent worked: its go-ahead would reach no one, and a new
    # start of the role removes it first (collect.py then starts one the usual way).
    run, engine = _run()
    gate = tmp_path / "finalise-ready"
    run._go_ahead["finaliser"] = str(gate)
    run._ids["finaliser"] = "c0ffee"
    engine.running = False
    with pytest.raises(NotHeld, match="ended before its go-ahead"):
        run.release("finaliser", "completed")
    assert not gate.exists() and "finaliser" in run._failed


def test_the_finaliser_started_ahead_waits_for_a_go_ahead_in_its_inputs(tmp_path: Path, repo: Path) -> None:
    sup = _supervisor(tmp_path, repo, MemoryBackend())
    ahead = sup.recipes.finaliser(None, 420, hold_s=1900)
    assert ahead.go_ahead == str(sup.run_dir / "in" / FINALISER_GO_AHEAD)
    assert ahead.env["SANDBOX_GO_AHEAD"] == "/sandbox/in/" + FINALISER_GO_AHEAD
    assert ahead.env["SANDBOX_HOLD_SECONDS"] == "1900" and "SANDBOX_END_REASON" not in ahead.env
    # The go-ahead lies in a read-only mount: the agent, which sees the same inputs, cannot give it.
    (inputs,) = [m for m in ahead.mounts if m.target == "/sandbox/in"]
    assert inputs.read_only and Path(ahead.go_ahead).parent == Path(inputs.source)
    usual = sup.recipes.finaliser("timeout", 420)
    assert usual.go_ahead is None and usual.env["SANDBOX_END_REASON"] == "timeout"
    assert "SANDBOX_GO_AHEAD" not in usual.env


@pytest.mark.parametrize("reason", ["completed", "timeout", "idle", "budget", "turns", "error", "interrupted"])
def test_every_end_reason_is_a_note(reason: str) -> None:
    import re

    assert re.fullmatch(NOTE_PATTERN, reason)


def test_a_sidecar_that_listens_but_never_serves_ends_the_run_clearly(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The go-ahead comes on `listening`; should `ready` never follow (a sidecar stuck in its imports), the run ends
    # with the sidecar's own error in SIDECAR_READY_TIMEOUT, not at the idle limit with "idle".
    from agent_sandbox.run import watch as watch_module

    from .memory_backend import idle
    from .test_supervisor_logic import _run, agent_saying

    monkeypatch.setattr(watch_module, "SIDECAR_READY_TIMEOUT", 1.0)

    def listening_only(w: Any) -> int:
        w.say(json.dumps({"event": "listening", "n": 1, "gateway_port": 8080, "proxy_port": 3128}))
        w.say("stuck importing aiohttp", stderr=True)
        return idle(w)

    summary, _, events = _run(tmp_path, repo, {"sidecar": listening_only, "agent": agent_saying(then=None)})
    assert summary.reason == "error" and summary.message.startswith("the sidecar did not become ready"), summary
    assert [e["type"] for e in events].count("listening") == 1
