"""When the supervisor keeps the agent's working tree (`--keep`, or work not imported, for `sandbox gc`), it asks
the backend to bring it home before teardown (`RunHandle.keep_work`), and keeps what holds the work when that
fails; with the work imported and no --keep it asks nothing. On the in-memory backend, which holds the work in the
run directory as Docker does; the Kubernetes side is in test_kubernetes_backend.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.run.spec import RunSummary
from tests.memory_backend import MemoryBackend, MemoryRun, Running
from tests.test_supervisor_logic import (  # the same repository and state fixtures (_state is autouse)
    RESULT,
    _assistant,
    _call,
    _state,
    _supervisor,
    agent_saying,
    repo,
    sidecar_answering,
)

__all__ = ["_state", "repo"]  # fixtures: pytest finds them by name in this module


def _finaliser_fails(w: Running) -> int:
    return 1  # writes no result: the work is not imported


def _run(
    tmp_path: Path, repo: Path, finaliser: Any = None, keep: bool = False
) -> tuple[RunSummary, MemoryRun, list[str]]:
    behaviours: dict[str, Any] = {
        "sidecar": sidecar_answering(_call(2, 1, 0.01)),
        "agent": agent_saying(_assistant("m1"), RESULT),
    }
    if finaliser is not None:
        behaviours["finaliser"] = finaliser
    backend = MemoryBackend(behaviours)
    sup = _supervisor(tmp_path, repo, backend)
    sup.spec = sup.spec.model_copy(update={"keep": keep})
    order: list[str] = []
    h = sup.handle
    assert isinstance(h, MemoryRun)
    for name in ("keep_work", "teardown", "remove_workloads"):
        method = getattr(h, name)

        def traced(*args: Any, _m: Any = method, _n: str = name) -> Any:
            order.append(_n)
            return _m(*args)

        setattr(h, name, traced)
    summary = sup.run()
    return summary, h, order


def test_work_imported_without_keep_asks_nothing(tmp_path: Path, repo: Path) -> None:
    summary, h, order = _run(tmp_path, repo)
    assert summary.reason == "completed" and summary.kept is None, summary.message
    assert order == ["teardown"] and h.kept_work == []


def test_keep_brings_the_working_tree_home_before_teardown(tmp_path: Path, repo: Path) -> None:
    summary, h, order = _run(tmp_path, repo, keep=True)
    assert summary.reason == "completed", summary.message
    assert order == ["keep_work", "teardown"]
    assert h.kept_work == [Path(summary.run_dir) / "workspace"]
    assert (Path(summary.run_dir) / "workspace" / ".git").is_dir()


def test_work_not_imported_is_brought_home_then_parked(tmp_path: Path, repo: Path) -> None:
    summary, h, order = _run(tmp_path, repo, finaliser=_finaliser_fails)
    assert summary.kept, summary.message
    assert order == ["keep_work", "teardown"]
    assert h.kept_work == [Path(summary.run_dir) / "workspace"]


def test_work_that_cannot_be_brought_home_keeps_what_holds_it(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(self: MemoryRun, dest: Path) -> None:
        raise RuntimeError("the volume did not answer")

    monkeypatch.setattr(MemoryRun, "keep_work", fails)
    summary, _h, order = _run(tmp_path, repo, finaliser=_finaliser_fails)
    assert summary.kept, summary.message
    # Not teardown: the backend keeps what holds the work (on Kubernetes the run's volume) for `sandbox gc`.
    assert order == ["keep_work", "remove_workloads", "teardown"]  # the memory backend's removal is its teardown


def test_keep_with_the_work_imported_tears_down_even_when_it_cannot_bring_it_home(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(self: MemoryRun, dest: Path) -> None:
        raise RuntimeError("the volume did not answer")

    monkeypatch.setattr(MemoryRun, "keep_work", fails)
    summary, _h, order = _run(tmp_path, repo, keep=True)
    assert summary.reason == "completed", summary.message
    assert order == ["keep_work", "teardown"]
