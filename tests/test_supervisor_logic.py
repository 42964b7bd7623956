"""The supervisor's decisions on an in-memory backend (tests/memory_backend.py): limits, results, the sidecar's
loss, cancellation and teardown, in seconds and without Docker. The real-Docker end-to-end tests
(test_limits_e2e.py, test_run_e2e.py) remain the proof that the same decisions hold with real containers and
the real Claude Code; these pin the logic itself, one scenario each."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.backend.plan import Reach
from agent_sandbox.config.policy import Policy
from agent_sandbox.errors import ExitCode
from agent_sandbox.git.checkout import open_repo
from agent_sandbox.run import watch as watch_module
from agent_sandbox.run.spec import RunSpec, RunSummary
from agent_sandbox.run.supervisor import Supervisor
from agent_sandbox.run.workloads import PLACEHOLDER_KEY, Recipes, Users
from tests.memory_backend import READY, MemoryBackend, Running, idle

MODEL = "claude-sonnet-4-5"


def _call(n: int, call: int, spent: float, stop: str = "end_turn", status: int = 200) -> dict[str, Any]:
    return {
        "event": "model_call",
        "n": n,
        "call": call,
        "path": "/v1/messages",
        "status": status,
        "stream": True,
        "model": MODEL,
        "usage": {"input_tokens": 100, "output_tokens": 20},
        "cost_usd": 0.01,
        "spent_usd": spent,
        "budget_usd": 5.0,
        "duration_ms": 5,
        "stop_reason": stop,
        "tool_uses": [],
    }


def _assistant(msg_id: str, text: str = "working") -> dict[str, Any]:
    return {
        "type": "assistant",
        "message": {"id": msg_id, "role": "assistant", "model": MODEL, "content": [{"type": "text", "text": text}]},
    }


RESULT = {"type": "result", "subtype": "success", "is_error": False, "num_turns": 1, "result": "done"}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e",
        "PATH": "/usr/bin:/bin",
    }
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "commit", "-q", "--allow-empty", "-m", "base"]):
        subprocess.run(cmd, cwd=path, check=True, env=env)
    return path


@pytest.fixture(autouse=True)
def _state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_DISK_QUOTA", "sampled")  # no loop filesystem per test
    monkeypatch.setattr(watch_module, "STOP_GRACE", 0.2)
    monkeypatch.setattr(watch_module, "RESULT_GRACE", 0.5)


def _supervisor(tmp_path: Path, repo: Path, backend: MemoryBackend, **limits: Any) -> Supervisor:
    policy = Policy.model_validate({"name": "unit", "limits": {"wall_seconds": 20, "idle_seconds": 20, **limits}})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    run_id = f"unit-{tmp_path.name[-20:]}"
    spec = RunSpec(
        run_id=run_id,
        repo=str(repo),
        base_ref="main",
        base_commit=head,
        branch=f"sandbox/{run_id}",
        task="do it",
        policy=policy,
        policy_source="test",
        model=MODEL,
        run_dir=str(tmp_path / "state" / "runs" / run_id),
    )
    return Supervisor(spec, open_repo(repo), backend, backend.images())


def _run(
    tmp_path: Path, repo: Path, behaviours: dict[str, Any], **limits: Any
) -> tuple[RunSummary, MemoryBackend, list[dict[str, Any]]]:
    backend = MemoryBackend(behaviours)
    sup = _supervisor(tmp_path, repo, backend, **limits)
    summary = sup.run()
    events = [json.loads(line) for line in (Path(sup.run_dir) / "audit.jsonl").read_text().splitlines()]
    handle = backend.handles[sup.spec.run_id]
    # Whatever ended the run: everything was torn down, and nothing of it still runs.
    assert handle.torn_down and all(w.ended.is_set() for w in handle.workloads.values())
    assert not [e for e in events if e["type"] == "invalid_event"], "every payload matches its event model"
    return summary, backend, events


def _limits(events: list[dict[str, Any]]) -> list[str]:
    return [e["payload"]["limit"] for e in events if e["type"] == "limit_hit"]


def sidecar_answering(*calls: dict[str, Any]) -> Any:
    def behaviour(w: Running) -> int:
        w.say(READY)
        for c in calls:
            w.sleep(0.05)
            w.say(c)
        return idle(w)

    return behaviour


def agent_saying(*lines: dict[str, Any], pause: float = 0.1, then: int | None = 0) -> Any:
    def behaviour(w: Running) -> int | None:
        for line in lines:
            if not w.sleep(pause):
                return None
            w.say(line)
        return idle(w) if then is None else then

    return behaviour


def test_a_finished_task_backed_by_the_gateway_completes(tmp_path: Path, repo: Path) -> None:
    summary, backend, events = _run(
        tmp_path,
        repo,
        {"sidecar": sidecar_answering(_call(2, 1, 0.01)), "agent": agent_saying(_assistant("m1"), RESULT)},
    )
    assert (summary.reason, summary.exit_code, summary.status) == ("completed", 0, "succeeded")
    assert summary.model_calls == 1 and summary.cost_usd == pytest.approx(0.01) and summary.tokens.input == 100
    verified = next(e["payload"] for e in events if e["type"] == "result_verified")
    assert verified["backed"] and verified["gateway_calls"] == 1
    assert [w.role for w in backend.started] == ["sidecar", "agent", "finaliser"]


def test_the_wall_clock_stops_an_agent_that_never_ends(tmp_path: Path, repo: Path) -> None:
    summary, backend, events = _run(
        tmp_path, repo, {"agent": agent_saying(_assistant("m1"), then=None)}, wall_seconds=1, idle_seconds=30
    )
    assert (summary.reason, summary.exit_code) == ("timeout", int(ExitCode.TIMEOUT))
    assert _limits(events) == ["timeout"]
    assert backend.handles[summary.id].workloads["agent"].stop_calls, "the agent was stopped, not left running"


def test_silence_is_idle(tmp_path: Path, repo: Path) -> None:
    summary, _, events = _run(tmp_path, repo, {"agent": agent_saying(then=None)}, idle_seconds=1)
    assert (summary.reason, summary.exit_code) == ("idle", int(ExitCode.IDLE))
    assert _limits(events) == ["idle"]


def test_one_turn_too_many_ends_the_run(tmp_path: Path, repo: Path) -> None:
    summary, _, events = _run(
        tmp_path,
        repo,
        {"agent": agent_saying(*(_assistant(f"m{i}") for i in range(4)), pause=0.05, then=None)},
        max_turns=2,
    )
    assert (summary.reason, summary.exit_code) == ("turns", int(ExitCode.TURNS))
    assert _limits(events) == ["turns"] and summary.turns == 3


def test_a_budget_refusal_stops_the_agent(tmp_path: Path, repo: Path) -> None:
    refused = {"event": "model_call_refused", "n": 3, "reason": "budget", "spent_usd": 5.0, "budget_usd": 5.0}
    summary, _, events = _run(
        tmp_path, repo, {"sidecar": sidecar_answering(_call(2, 1, 5.0), refused), "agent": agent_saying(then=None)}
    )
    assert (summary.reason, summary.exit_code) == ("budget", int(ExitCode.BUDGET))
    assert _limits(events) == ["budget"]


def test_a_claimed_result_without_model_calls_is_an_error(tmp_path: Path, repo: Path) -> None:
    summary, _, events = _run(tmp_path, repo, {"agent": agent_saying(_assistant("m1"), RESULT)})
    assert (summary.reason, summary.exit_code) == ("error", int(ExitCode.ERROR))
    assert "not backed by the gateway" in summary.message
    assert not next(e["payload"] for e in events if e["type"] == "result_verified")["backed"]


def test_a_model_call_after_the_result_is_not_backed(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "RESULT_GRACE", 1.3)

    def late_sidecar(w: Running) -> int:
        w.say(READY)
        w.sleep(0.1)
        w.say(_call(2, 1, 0.01))
        w.sleep(0.8)  # past the agent's result (and the slack): something in its container kept calling
        w.say(_call(3, 2, 0.02))
        return idle(w)

    def lingering_agent(w: Running) -> None:
        w.sleep(0.3)
        w.say(RESULT)
        idle(w)  # lingers past its result: stopped by the supervisor after RESULT_GRACE

    summary, _, _ = _run(tmp_path, repo, {"sidecar": late_sidecar, "agent": lingering_agent})
    assert summary.reason == "error" and "began after the result" in summary.message


def test_a_lost_sidecar_ends_the_run(tmp_path: Path, repo: Path) -> None:
    def dying_sidecar(w: Running) -> int:
        w.say(READY)
        w.sleep(0.3)
        return 1

    summary, _, events = _run(tmp_path, repo, {"sidecar": dying_sidecar, "agent": agent_saying(then=None)})
    assert summary.reason == "error" and "sidecar stopped" in summary.message
    assert _limits(events) == ["error"]


def test_an_output_flood_ends_the_run_and_keeps_what_came_before(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "MAX_OUTPUT_LINES", 50)

    def flooding(w: Running) -> None:
        for i in range(500):
            w.say(f"line {i}")
        idle(w)

    summary, _, events = _run(tmp_path, repo, {"agent": flooding})
    assert summary.reason == "error" and _limits(events) == ["output_flood"]
    kept = [e for e in events if e["type"] == "agent_output"]
    assert 0 < len(kept) <= 50


def test_cancelling_a_running_supervisor_is_interrupted_and_still_collects(tmp_path: Path, repo: Path) -> None:
    backend = MemoryBackend({"agent": agent_saying(then=None)})
    sup = _supervisor(tmp_path, repo, backend)

    def cancel_once_the_agent_runs() -> None:
        # Not on a timer: on a loaded machine the run may not have got that far in any given time.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not sup.agent_started:
            time.sleep(0.05)
        time.sleep(0.3)
        sup.cancel("interrupted", "the test cancelled it")

    threading.Thread(target=cancel_once_the_agent_runs, daemon=True).start()
    summary = sup.run()
    assert (summary.reason, summary.exit_code) == ("interrupted", int(ExitCode.INTERRUPTED))
    roles = [w.role for w in backend.started]
    assert roles == ["sidecar", "agent", "finaliser"], "the work is still packed after a cancel"


def test_a_sidecar_that_never_gets_ready_fails_before_the_agent(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def silent(w: Running) -> int:
        w.say("Traceback: config broken", stderr=True)
        return 2

    ran: list[str] = []

    def agent(w: Running) -> int:
        ran.append("agent")
        return 0

    summary, backend, events = _run(tmp_path, repo, {"sidecar": silent, "agent": agent})
    assert summary.reason == "error" and "did not become ready" in summary.message
    assert "config broken" in summary.message
    # Its container was started beside the sidecar, held: it never got the go-ahead, so nothing of it ran, and
    # the workspace was no agent's work to keep.
    handle = backend.handles[summary.id]
    assert not handle.released["agent"].is_set() and ran == [], "no agent without a sidecar"
    assert [w.role for w in backend.started] == ["sidecar", "agent"]
    assert not [e for e in events if e["type"] == "container_created" and e["payload"]["role"] == "agent"]
    assert summary.kept is None


def test_the_agent_gets_its_go_ahead_only_once_the_sidecar_is_ready(tmp_path: Path, repo: Path) -> None:
    order: list[str] = []

    def slow_sidecar(w: Running) -> int:
        w.sleep(0.5)  # the agent's container is started meanwhile
        order.append("ready")
        w.say(READY)
        return idle(w)

    def agent(w: Running) -> int:
        order.append("agent")
        return agent_saying()(w)

    _summary, _backend, events = _run(tmp_path, repo, {"sidecar": slow_sidecar, "agent": agent})
    assert order == ["ready", "agent"]
    types = [(e["type"], e["payload"].get("role")) for e in events]
    assert types.index(("ready", None)) < types.index(("container_created", "agent"))


# --- the recipes ------------------------------------------------------------------------------------------


def test_only_the_sidecar_holds_the_key_and_reaches_outside(tmp_path: Path, repo: Path) -> None:
    sup = _supervisor(tmp_path, repo, MemoryBackend())
    from agent_sandbox.sidecar.config import SidecarConfig

    recipes = Recipes(sup.spec, sup.images, sup.run_dir, sup.repo.objects, Users.here())
    config = SidecarConfig(
        run_id="r", upstream_url="http://up", budget_usd=1.0, prices={}, egress=sup.spec.policy.egress, own_addresses=[]
    )
    sidecar = recipes.sidecar(config, "sk-real", [])
    agent = recipes.agent(100)
    check = recipes.check("0" * 40, 60)
    fin = recipes.finaliser("completed", 60)
    assert sidecar.reach is Reach.OUTSIDE and sidecar.secret_env and "sk-real" not in json.dumps(sidecar.env)
    for w in (agent, check, fin):
        assert not w.secret_env and "sk-real" not in w.model_dump_json()
    assert agent.env["ANTHROPIC_API_KEY"] == PLACEHOLDER_KEY
    assert (agent.reach, check.reach, fin.reach) == (Reach.SIDECAR, Reach.SIDECAR, Reach.NOTHING)
    assert agent.go_ahead and check.go_ahead and fin.go_ahead is None
    assert agent.own_init and agent.follow and not check.follow
    # The objects are readable history, never writable, in every workload that sees them.
    for w in (agent, check, fin):
        assert all(m.read_only for m in w.mounts if m.source == str(sup.repo.objects))
    # The check writes only its own directory: the bundle in out/ is out of reach of the code it runs.
    assert [m.target for m in check.mounts if not m.read_only] == ["/sandbox/check"]


def test_the_policys_runtime_reaches_every_workload_that_runs_or_reads_the_agents_code(
    tmp_path: Path, repo: Path
) -> None:
    sup = _supervisor(tmp_path, repo, MemoryBackend())
    from agent_sandbox.sidecar.config import SidecarConfig

    policy = sup.spec.policy.model_copy(update={"agent": sup.spec.policy.agent.model_copy(update={"runtime": "runsc"})})
    recipes = Recipes(
        sup.spec.model_copy(update={"policy": policy}), sup.images, sup.run_dir, sup.repo.objects, Users.here()
    )
    config = SidecarConfig(run_id="r", upstream_url="http://up", budget_usd=1.0, egress=policy.egress)
    assert recipes.sidecar(config, None, []).runtime is None, "the sidecar runs none of the agent's code"
    for w in (recipes.agent(100), recipes.check("0" * 40, 60), recipes.finaliser("completed", 60)):
        assert w.runtime == "runsc", w.role
