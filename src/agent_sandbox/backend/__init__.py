"""Platforms that run the tasks, behind one run-level interface (base.py, plan.py): Docker (docker.py) and
Kubernetes (kubernetes/).

Backends are imported lazily so that choosing one never imports another's SDK.
"""

from __future__ import annotations

from agent_sandbox.backend.base import Backend, RunHandle
from agent_sandbox.backend.plan import ExitInfo, Mount, Reach, RunPlan, Workload
from agent_sandbox.config.backends import BackendConfig, DockerConfig, KubernetesConfig


def connect(config: BackendConfig | None = None) -> Backend:
    """The backend the configuration names, connected (EnvironmentNotReady when its platform does not answer)."""
    config = config or DockerConfig()
    if isinstance(config, DockerConfig):
        from agent_sandbox.backend.docker import DockerBackend

        return DockerBackend.connect(config)
    if isinstance(config, KubernetesConfig):
        from agent_sandbox.backend.kubernetes.backend import KubernetesBackend

        return KubernetesBackend.connect(config)
    raise ValueError(f"unknown backend {config!r}")


__all__ = ["Backend", "ExitInfo", "Mount", "Reach", "RunHandle", "RunPlan", "Workload", "connect"]
