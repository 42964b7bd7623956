"""Which platform runs the tasks: one pydantic class per backend, chosen by its `kind`.

A Kubernetes backend joins as another class in the `BackendConfig` union (see SWE-ReX's deployment configs).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class DockerConfig(BaseModel):
    """Runs on the Docker engine of this machine (or DOCKER_HOST's)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["docker"] = "docker"
    """The backend."""
    engine_wait_seconds: float | None = Field(default=None, ge=0)
    """How long a call waits for an engine that stopped answering (a restart) before the run gives up on it;
    None: SANDBOX_ENGINE_WAIT_SECONDS, else 120."""


BackendConfig = Annotated[DockerConfig, Field(discriminator="kind")]
