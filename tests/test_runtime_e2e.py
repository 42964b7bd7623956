"""The policy's `agent.runtime`: the workloads that run or read the agent's code use that container runtime,
and an engine without it refuses the run before anything is made. Real Docker, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import audit_events, labelled

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

SCRIPT = """
turns:
  - bash: "echo runtime > runtime.txt"
  - text: "Done."
"""


def _policy(tmp_path: Path, runtime: str) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"name": "runtime", "agent": {"runtime": runtime}}))
    return path


def test_the_agents_workloads_run_under_the_policys_runtime(make_repo, sandbox, write_script, tmp_path) -> None:
    # runc: the one runtime every engine has; what matters is that the choice reaches the engine and the trail.
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "write a file",
        "--policy",
        str(_policy(tmp_path, "runc")),
        "--model-script",
        str(write_script(SCRIPT)),
        "--json",
    )
    assert res.code == 0, res.stderr
    summary = res.json()
    runtimes = {
        e["payload"]["role"]: e["payload"]["security"]["runtime"]
        for e in audit_events(summary["run_dir"])
        if e["type"] == "container_created"
    }
    assert runtimes == {"sidecar": "default", "agent": "runc", "finaliser": "runc"}
    assert summary["files_changed"] == ["runtime.txt"]
    assert labelled(summary["id"]) == []


def test_an_engine_without_the_runtime_refuses_the_run_before_anything_starts(
    make_repo, sandbox, write_script, tmp_path, state_dir
) -> None:
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "write a file",
        "--policy",
        str(_policy(tmp_path, "no-such-runtime")),
        "--model-script",
        str(write_script(SCRIPT)),
    )
    assert res.code == 3, (res.code, res.stderr)
    assert "the policy asks for the container runtime 'no-such-runtime'" in res.stderr
    assert "runc" in res.stderr, "it names the runtimes the engine has"
    runs = state_dir / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "no run directory was made"
