"""The declared state of a run while it is watched."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agent_sandbox.run.spec import Tokens
from agent_sandbox.sidecar.egress import DecisionTally


@dataclass
class RunState:
    """What the supervisor learns while the agent runs (and the check after it): the state its limit and
    result decisions work on, rebuilt from the trail when a run is recovered."""

    reason: str | None = None  # set when the supervisor ends the run itself
    message: str = ""
    result: dict[str, Any] | None = None
    result_at: float | None = None
    lingered: bool = False  # stopped for lingering after its result
    last_activity: float = field(default_factory=time.monotonic)
    turns: set[str] = field(default_factory=set)
    spent_usd: float = 0.0
    model_calls: int = 0
    budget_refused: bool = False
    sidecar_gone: bool = False
    sidecar_ready: bool = False  # its `ready` line came: the agent's go-ahead came earlier, on `listening`
    egress_allowed: int = 0
    egress_denied: int = 0
    egress_would_deny: int = 0
    egress_lines: DecisionTally = field(default_factory=DecisionTally)  # the decision lines, for the summary
    tokens: Tokens = field(default_factory=Tokens)
    # The agent's output, bounded (output_flood), and what the gateway saw, which decides `completed`.
    sidecar_bytes: int = 0  # the sidecar's lines, bounded like the agent's output (egress_flood)
    egress_unrecorded: int = 0
    output_bytes: int = 0
    output_lines: int = 0
    flooded: bool = False
    open_tools: dict[str, str] = field(default_factory=dict)  # tool calls the agent reported without a result
    open_at_result: list[str] = field(default_factory=list)
    gateway_calls: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (read at, model_call)
    inflight_at_settle: int = 0  # model calls the gateway still had in flight when it settled after the agent
