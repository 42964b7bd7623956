"""How the agent's network namespace is isolated (backend/docker.py): nsenter only where the container's
process is provably one of this machine's, a helper container otherwise. No Docker needed."""

from __future__ import annotations

import os

import pytest

from agent_sandbox.backend import docker as backend_docker


def test_the_helper_is_forced_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backend_docker.ISOLATE_ENV, "helper")
    assert backend_docker.isolation_method() == "helper"


def test_a_remote_engine_gets_the_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend_docker.ISOLATE_ENV, raising=False)
    monkeypatch.setenv("DOCKER_HOST", "tcp://10.0.0.5:2376")
    assert backend_docker.isolation_method() == "helper"


def test_not_root_gets_the_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backend_docker.ISOLATE_ENV, raising=False)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert backend_docker.isolation_method() == "helper"


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 12345])
def test_a_pid_that_is_no_process_here_is_not_the_containers(pid: int) -> None:
    assert not backend_docker._is_containers_process(pid, "0d095481ae3f5fb3a606b406875b7e29db577e28c982da49fe3e87")


def test_a_process_outside_the_containers_cgroup_is_not_the_containers() -> None:
    # This test's own process is in no container of that id: entering it would cut the wrong namespace.
    assert not backend_docker._is_containers_process(os.getpid(), "0d095481ae3f5fb3a606b406875b7e29db577e28c982da49")
