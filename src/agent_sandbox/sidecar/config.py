"""The sidecar's configuration, handed over by the supervisor as JSON in SANDBOX_SIDECAR_CONFIG."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# What the supervisor and the sidecar agree on lives in contract.py (standard library only: the sidecar reads it
# before its heavy imports); named here too, where the rest of the configuration is.
from agent_sandbox.sidecar.contract import (
    CONFIG_ENV,
    GATEWAY_PORT,
    KEY_ENV,
    KEY_FILE_ENV,
    PROXY_PORT,
    SCRIPTED_MODEL_PORT,
)
from agent_sandbox.sidecar.egress import Egress
from agent_sandbox.sidecar.pricing import Price

__all__ = [
    "CONFIG_ENV",
    "GATEWAY_PORT",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "PROXY_PORT",
    "SCRIPTED_MODEL_PORT",
    "SidecarConfig",
]


class SidecarConfig(BaseModel):
    """Everything the sidecar needs to know about its run, except secrets."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    """The run this sidecar serves; stamped on every event."""
    upstream_url: str = "https://api.anthropic.com"
    """Where the gateway forwards model calls. Ignored when a script is given."""
    budget_usd: float = Field(gt=0)
    """Spend after which every further model call is refused with 403."""
    prices: dict[str, Price] = Field(default_factory=dict)
    """Price overrides by model-name substring, on top of the built-in table."""
    script_path: str | None = None
    """A model script mounted into the sidecar: the gateway then forwards to the scripted model."""
    events_path: str | None = None
    """A file (in the sidecar's own output directory) where every event line is kept too, numbered: what
    recovery reads should the supervisor die (model calls always; egress lines up to 64 MiB)."""
    control_socket: str | None = None
    """A Unix socket (in the sidecar's own output directory) where the supervisor asks the gateway to settle:
    the answer is a `settled` line on stdout, after every model call in flight has ended (run/watch.py)."""
    transcript_path: str | None = None
    """Where the scripted model writes its transcript."""
    gateway_port: int = GATEWAY_PORT
    """Port the gateway listens on."""
    proxy_port: int = PROXY_PORT
    """Port the egress proxy listens on."""
    egress: Egress = Field(default_factory=Egress)
    """The run's egress rules (its `hosts` are applied by the backend, as the sidecar's /etc/hosts)."""
    own_addresses: list[str] = Field(default_factory=list)
    """The host's own addresses, refused like private ones unless egress.allow_private."""
    broker_socket: str | None = None
    """The unix socket of a budget shared with other runs (run/budget.py), mounted into the sidecar alone."""
    extra_ca_pem: str = ""
    """The policy's extra certificate authorities (PEM), trusted by the gateway for its upstream."""
    server_tools: list[str] = Field(default_factory=list)
    """Anthropic server-side tools the gateway lets through in forwarded requests (the policy's
    `agent.server_tools`): web_search, web_fetch, code_execution, mcp. Anything else is refused."""
    gateway_name: str = "sidecar"
    """The name the agent reaches the sidecar by; the proxy passes `name:gateway_port` to the gateway."""
    heartbeat_path: str | None = None
    """The supervisor's heartbeat file inside the sidecar (it touches it every few seconds); None: not watched."""
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    """A heartbeat older than this means the supervisor is gone: no model calls, no connections (watchdog.py)."""
    deadline_s: float | None = Field(default=None, gt=0)
    """Seconds after the sidecar's start after which the run is over, supervisor or not; None: no deadline."""
