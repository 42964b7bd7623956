"""The sidecar's events, one pydantic model each: the lines it prints (and the supervisor writes into the audit
trail, checked against these same models), and the base of every audit event.

They live here, not in audit/, because the sidecar image carries this package alone; audit/events.py imports
them, so each event is defined once.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Event(BaseModel):
    """A payload of the audit trail; each subclass is one event type, named by TYPE."""

    # Attribute docstrings become field descriptions: docs/audit.md is generated from them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    TYPE: ClassVar[str] = ""
    """The event's type in the trail."""


# --- sidecar ---------------------------------------------------------------------------------------------


class SidecarListening(Event):
    """The sidecar's ports are open, before its heavy imports: the agent may go ahead, its connections wait in
    the ports' backlogs until the gateway and the proxy serve them (`ready`), none is refused."""

    TYPE: ClassVar[str] = "listening"

    gateway_port: int
    """Port of the model gateway."""
    proxy_port: int
    """Port of the egress proxy."""


class SidecarReady(Event):
    """The sidecar is serving."""

    TYPE: ClassVar[str] = "ready"

    gateway_port: int
    """Port of the model gateway."""
    proxy_port: int
    """Port of the egress proxy."""
    egress_mode: str
    """enforce or report."""
    allow: list[str]
    """Allow rules."""
    deny: list[str]
    """Deny rules."""
    allow_private: bool
    """Whether private addresses are allowed (never loopback or metadata)."""
    allow_addresses: list[str] = Field(default_factory=list)
    """Addresses and ranges let through although not public (cloud metadata only when named exactly)."""
    upstream: str
    """Where model calls go (`scripted` for the scripted model)."""
    key_present: bool
    """Whether the sidecar holds a real key."""


class Watchdog(Event):
    """The sidecar's backstop changed state: with the supervisor's heartbeat stale (`supervisor_lost`) or the
    run's deadline passed (`deadline`) it refuses every model call and connection and cuts those open;
    `restored` when a paused supervisor's heartbeat came back."""

    TYPE: ClassVar[str] = "watchdog"

    state: str
    """supervisor_lost, deadline or restored."""
    detail: str
    """For people: how old the heartbeat is, or how long the sidecar has run."""
    heartbeat_age_s: float | None = None
    """Seconds since the supervisor last touched its heartbeat file."""


class SidecarStopped(Event):
    """The sidecar shut down cleanly."""

    TYPE: ClassVar[str] = "stopped"

    spent_usd: float
    """Its spend total."""
    calls: int
    """Model calls it served."""


class GatewaySettled(Event):
    """The gateway's answer to the supervisor's request to settle, once the agent has ended: every model call
    line it emitted for calls begun before the request comes before this one."""

    TYPE: ClassVar[str] = "settled"

    token: str
    """The supervisor's token for its request."""
    inflight: int
    """Model calls still in flight when it answered (0, unless they outlasted its wait)."""
    calls: int
    """Model calls served so far."""


class ModelCall(Event):
    """One model call through the gateway, metered from the response."""

    TYPE: ClassVar[str] = "model_call"

    call: int
    """Its number in the run."""
    path: str
    """The API path."""
    status: int
    """The upstream's HTTP status."""
    stream: bool
    """Whether the response streamed."""
    model: str
    """The model the response names."""
    usage: dict[str, int]
    """input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens."""
    cost_usd: float
    """This call's cost."""
    spent_usd: float
    """The run's spend so far."""
    budget_usd: float
    """The cap the gateway enforces."""
    duration_ms: int
    """How long the call took."""
    stop_reason: str | None = None
    """How the response ended (end_turn, tool_use, max_tokens, ...), when the gateway reports it."""
    tool_uses: list[dict[str, Any]] = Field(default_factory=list)
    """The tool calls the model asked for in it (id, name), when the gateway reports them."""
    tools_offered: int | None = None
    """How many tools the request offered (0 for Claude Code's housekeeping calls), when reported."""
    reserved_usd: float | None = None
    """The worst case the gateway reserved for it before forwarding (input bound and max_tokens)."""
    complete: bool = True
    """False when the response did not end normally: its output is then metered from what was streamed
    (one token per byte, at most max_tokens)."""
    cut: str | None = None
    """Why it did not end normally: `budget` (the gateway cut the stream off when spend crossed the cap),
    `client` (the client went away), `upstream` (the upstream broke off), `cancelled`, `supervisor_lost` or
    `deadline` (the sidecar's watchdog tripped mid-stream)."""


class ModelCallRefused(Event):
    """The gateway refused a request: it was never forwarded."""

    TYPE: ClassVar[str] = "model_call_refused"

    reason: str
    """Why: `budget` (the budget is spent; the run ends), `reservation` (its worst case does not fit beside
    the calls in flight), `endpoint` (not a forwarded method and path: 404), `path` (raw path not in normal
    form), `query`, `request` (not a JSON object), `server_tool` (a server-side tool or MCP server the policy
    does not allow), `url_source` (an image or document the model API would fetch from a host the egress
    allowlist does not allow), `supervisor_lost` (the supervisor's heartbeat stopped: nobody watches the run),
    `deadline` (the run's own deadline passed, supervisor or not)."""
    spent_usd: float
    """Spend so far."""
    budget_usd: float
    """The cap."""
    method: str | None = None
    """The request's method."""
    path: str | None = None
    """The request's raw path and query, as sent (bounded)."""
    detail: str | None = None
    """What was refused: the tool type, the URL."""
    reserve_usd: float | None = None
    """reservation: the call's worst case."""
    outstanding_usd: float | None = None
    """reservation: what the calls in flight had reserved."""


class ModelCallFailed(Event):
    """The gateway could not reach the upstream."""

    TYPE: ClassVar[str] = "model_call_failed"

    path: str
    """The API path."""
    error: str
    """What went wrong."""


class SidecarOutput(Event):
    """A line from the sidecar that was not an event."""

    TYPE: ClassVar[str] = "sidecar_output"

    text: str
    """The line (bounded)."""


class Egress(Event):
    """One connection through the egress proxy: the decision line."""

    TYPE: ClassVar[str] = "egress"

    client: str | None
    """The agent container's address."""
    method: str | None
    """CONNECT, GET, HEAD, ..."""
    host: str | None
    """The requested host."""
    port: int | None
    """The requested port."""
    resolved: str | None
    """The address the proxy resolved and connected to (or refused)."""
    decision: str
    """allow, deny, would_deny (report mode) or error."""
    rule: str | None
    """The rule that decided; None when no rule matched."""
    reason: str | None
    """Why it was denied."""
    bytes_up: int
    """Bytes from the agent."""
    bytes_down: int
    """Bytes to the agent."""
    duration_ms: int | None = None
    """How long the connection lasted."""
    decision_detail: str | None = None
    """More on the decision: which exception let a non-public address through (an allow_addresses entry or
    allow_private), or what failed (unresolvable, upstream unreachable)."""

    def set(self, **fields: Any) -> None:
        """Fill in several fields at once as the connection's decision is made."""
        for name, value in fields.items():
            setattr(self, name, value)


def to_line(event: Event) -> dict[str, Any]:
    """An event as the sidecar prints it: its type under `event`, then its fields."""
    return {"event": event.TYPE, **event.model_dump(mode="json")}
