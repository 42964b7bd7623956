"""Container backends behind one small interface. Docker today; a Kubernetes backend can join later.

Backends are imported lazily so that choosing one never imports another's SDK.
"""

from __future__ import annotations

from agent_sandbox.backend.base import Backend, ContainerSpec, ExitInfo, Mount, NetworkSpec


def docker_backend() -> Backend:
    from agent_sandbox.backend.docker import DockerBackend

    return DockerBackend.connect()


__all__ = ["Backend", "ContainerSpec", "ExitInfo", "Mount", "NetworkSpec", "docker_backend"]
