"""Host settings: the operator's configuration for every run on this machine (not per task)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_sandbox.config.backends import BackendConfig, DockerConfig
from agent_sandbox.errors import UsageError, validation_message

DAILY_ENV = "SANDBOX_DAILY_BUDGET_USD"
CONFIG_ENV = "SANDBOX_CONFIG"


class HostSettings(BaseModel):
    """Settings of this host, from the config file and the environment."""

    model_config = ConfigDict(extra="forbid")

    daily_budget_usd: float | None = Field(default=None, gt=0)
    """Most all runs on this host may spend on the model per UTC day; None means no cap."""
    backend: BackendConfig = Field(default_factory=DockerConfig)
    """The platform that runs the tasks (`kind: docker`, the default, and its settings)."""


def config_path() -> Path:
    if env := os.environ.get(CONFIG_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "agent-sandbox" / "config.yaml"


def load_settings() -> HostSettings:
    """The config file (if any), then SANDBOX_DAILY_BUDGET_USD on top."""
    data: dict[str, object] = {}
    path = config_path()
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UsageError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{path}: expected a mapping")
        data.update(loaded)
    if env := os.environ.get(DAILY_ENV):
        try:
            data["daily_budget_usd"] = float(env)
        except ValueError:
            raise UsageError(f"{DAILY_ENV}={env!r} is not a number") from None
    try:
        return HostSettings.model_validate(data)
    except ValidationError as exc:
        raise UsageError(validation_message(exc, f"host settings ({path})")) from None
