"""Typed payloads of the audit trail: one pydantic model per event type.

The supervisor validates every payload against its type's model before it is written, so the trail's
shape is a contract: docs/audit.md documents each type, and readers (`sandbox show`, the report) rely on it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _P(BaseModel):
    # Attribute docstrings become field descriptions: docs/audit.md is generated from them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


# --- supervisor ------------------------------------------------------------------------------------------

class RunStarted(_P):
    """The run began: what was asked, under which policy, with which images."""

    spec: dict[str, Any]
    """The resolved RunSpec without the task (policy included)."""
    task: str
    """The task text."""
    policy_hash: str
    """SHA-256 of the effective policy's canonical JSON."""
    images: dict[str, Any]
    """Per role: reference, id, digests and labels of the image."""
    claude_code_version: str
    """The Claude Code CLI in the agent image."""
    backend: str
    """The container backend."""


class DiskQuota(_P):
    """How the run's writable directories (the workspace, the check's checkout) are limited in size."""

    mode: str
    """`filesystem`: each is an ext4 filesystem of `bytes`, so writing past it fails with ENOSPC; `sampled`:
    the workspace's growth is measured every few seconds (no root or no loop devices)."""
    bytes: int
    """The limit: the policy's `limits.disk`, capped to what the state filesystem can spare."""
    detail: str = ""
    """Why the quota is sampled, or that it was capped."""


class CheckoutPrepared(_P):
    """The task's checkout exists."""

    base_commit: str
    """The commit it starts from."""
    branch: str
    """The branch it is on."""
    objects: str
    """The host object directory it borrows from (mounted read-only)."""


class NetworkCreated(_P):
    """A network for this run."""

    name: str
    """Its name."""
    internal: bool
    """True for the agent's network, which has no route out."""


class ContainerCreated(_P):
    """A container for this run, with its security settings."""

    role: str
    """sidecar, agent or finaliser."""
    security: dict[str, Any]
    """User, capabilities, no-new-privileges, read-only root, limits, networks, mounts, env names."""
    command: list[str] | None = None
    """The agent's command line."""


class NetworkIsolated(_P):
    """A container that runs the agent's code (the agent, the check) was left one route, to the sidecar,
    before any of that code ran."""

    container: str
    """The container."""
    default_route: str
    """What was done: the routes removed, and the one left (`<sidecar address> dev eth0 scope link`)."""


class LimitHit(_P):
    """A limit ended the run."""

    limit: str
    """timeout, idle, budget, daily_budget, shared_budget, turns, disk, output_flood, egress_flood,
    state_disk (the trail could not be written), error (sidecar died) or interrupted."""
    reason: str | None = None
    """The run's end reason it maps to."""
    message: str | None = None
    """For people."""


class AgentLineTruncated(_P):
    """A line of the agent's output was longer than 1 MiB: its first MiB is kept (in `agent-stream.jsonl`
    and the event it makes), the rest was counted and dropped, never held in memory whole."""

    stream: str
    """stdout or stderr."""
    line: int
    """Its number in the agent's output (stdout and stderr together, from 1)."""
    bytes: int
    """Its whole length in bytes, as written."""
    kept: int
    """Bytes kept."""


class ResultVerified(_P):
    """The agent claimed success (a `result` line on its own stream, which any process in its container can
    write): whether the gateway's record of model calls, which nothing in the container can touch, backs the
    claim. Only a backed claim makes the run `completed`; otherwise it ends with reason `error`."""

    backed: bool
    """Whether the claim stands."""
    detail: str
    """Why, or why not (no model call, more turns claimed than calls served, tool calls still running, a
    model call that began after the result, a last call that asked for tools)."""
    gateway_calls: int
    """Successful model calls the gateway recorded."""
    claimed_turns: int | None
    """Turns the agent's result claims."""
    last_stop_reason: str | None
    """How the gateway's last model call ended (when the gateway reports it)."""


class AgentLingered(_P):
    """Claude Code printed its result but did not exit; the supervisor stopped it."""

    seconds: float
    """How long it was given."""


class ResourceUsage(_P):
    """Resources the agent container and the supervisor used, sampled during the run."""

    samples: int
    """Number of samples of the agent container."""
    peak_memory_bytes: int
    """Highest memory use of the agent container."""
    cpu_seconds: float
    """CPU time of the agent container."""
    peak_pids: int
    """Most processes and threads at once in the agent container."""
    supervisor_rss_bytes: int
    """The supervisor's resident memory at the end."""
    supervisor_cpu_seconds: float
    """The supervisor's CPU time (user + system)."""


class Finalised(_P):
    """What the finaliser packed."""

    status: str
    """packed, unchanged or error."""
    head: str | None = None
    """The tip of the agent's work."""
    finaliser_commit: str | None = None
    """The commit it made of uncommitted work, if any."""
    bundle: str | None = None
    """The bundle's file name."""
    detail: str = ""
    """What went wrong, if anything."""


class CheckRan(_P):
    """The operator's check command ran on a clean checkout of the agent's committed work, in a container of
    its own under the run's policy (the network only through the egress proxy)."""

    exit_code: int
    """Its exit code, as the engine reports the check container's (the result file lies where the checked
    code can write, so only its output is taken from it): anything but 0 fails the run with reason check
    (124: it ran out of time; 130: interrupted)."""
    output: str
    """The end of its output."""
    head: str
    """The commit it checked: the head of the branch that is handed back."""
    interrupted: bool = False
    """A signal stopped the run during the check, or before it began: the work is on the branch, unchecked."""


class PreRan(_P):
    """The pre command ran inside the sandbox before the agent (under the same policy)."""

    exit_code: int
    """Its exit code (the agent starts anyway, with the task of making the result pass)."""
    output: str
    """The end of its output."""


class FileStat(_P):
    """One changed path."""

    path: str
    """The path."""
    added: int | None
    """Lines added; None for a binary file."""
    deleted: int | None
    """Lines deleted; None for a binary file."""


class Imported(_P):
    """The agent's work is on the host's branch."""

    branch: str | None
    """The host branch."""
    head: str | None
    """Its tip."""
    commits: list[str]
    """New commits, oldest first."""
    files: list[FileStat]
    """The diffstat against the base."""


class GateChecked(_P):
    """The diff policy gate's verdict."""

    files: int
    """Paths changed."""
    lines: int
    """Lines added plus deleted."""
    violations: list[dict[str, Any]]
    """Rule, path and detail of each violation."""


class Pushed(_P):
    """The push, when one was asked for."""

    remote: str | None
    """The remote."""
    branch: str | None
    """The branch."""
    pushed: bool
    """Whether it landed."""
    error: str | None
    """Why not."""


class PullRequest(_P):
    """The pull request, when one was asked for."""

    url: str | None
    """Its URL."""
    error: str | None
    """Why it could not be opened."""


class Teardown(_P):
    """Everything labelled with the run id was removed."""

    removed: list[str]
    """kind:name of each object removed."""
    error: str | None = None
    """Why teardown could not finish (the engine gone): what is left carries the run's labels, and
    `sandbox gc` removes it."""
    kept: str | None = None
    """The agent's work that could not be imported and is kept for recovery (a path in the run directory)."""


class Recovery(_P):
    """A run whose supervisor died (or whose work could not be imported) is being finished by another
    process: `sandbox gc`, or a later `sandbox run`."""

    by: str
    """Which command recovers it, and its process id."""
    why: str
    """Why the run needed recovering."""
    dropped_bytes: int = 0
    """A last audit line the dead supervisor had only half written, dropped so that the chain goes on."""
    gateway_lines: int = 0
    """Lines of the sidecar's log the supervisor never recorded (model calls and egress after it died),
    recorded now, after this event, from the sidecar's own numbered copy of its lines (its container's log
    where there is none). Model calls are all there; egress decision lines beyond 64 MiB are not."""
    gateway_lines_lost: int = 0
    """Numbered lines that were not there to record: egress lines past that bound, or lines rotated out of the
    container's log."""
    agent_lines: int = 0
    """Lines of the agent's output the supervisor never read, recorded now from its container log."""


class RunEnded(_P):
    """The run is over."""

    status: str
    """succeeded, failed or killed."""
    reason: str
    """completed, timeout, idle, budget, turns, policy, error or interrupted."""
    message: str
    """For people."""
    exit_code: int
    """The exit code of `sandbox run`."""
    agent_exit_code: int | None
    """Claude Code's exit code."""
    oom_killed: bool
    """The OOM killer struck in the agent container."""
    error: str | None
    """An internal error, if one ended the run."""
    interrupted: bool
    """SIGINT or SIGTERM to the supervisor."""
    cost_usd: float
    """Model spend."""
    branch: str | None
    """The branch with the work."""
    pushed: bool = False
    """Whether it was pushed."""
    pr_url: str | None = None
    """The pull request."""


# --- agent (from Claude Code's stream-json) ---------------------------------------------------------------

class AgentInit(_P):
    """Claude Code started its session (as reported on the agent's own stream, like every event of source
    `agent`: claims, not verified; see `result_verified`)."""

    session_id: str | None
    """Its session id."""
    model: str | None
    """The model it resolved."""
    cwd: str | None
    """Its working directory."""
    tools: int
    """Number of tools offered to the model."""
    permission_mode: str | None
    """Its permission mode."""
    claude_code_version: str | None
    """Its own version, as it reports it."""


class ToolCall(_P):
    """The model asked for a tool, as the agent reports it (a claim: any process in the agent's container can
    write such a line)."""

    id: str | None
    """The tool use id."""
    name: str | None
    """The tool: Bash, Read, Write, Edit, ..."""
    input: dict[str, Any]
    """Its input: the command, the file path, ... (long values bounded)."""
    message_id: str | None
    """The model response it came in."""


class ToolResult(_P):
    """What the tool returned to the model."""

    tool_use_id: str | None
    """The tool use it answers."""
    is_error: bool
    """Whether the tool failed."""
    size: int
    """Length of the whole result in characters."""
    excerpt: str
    """Its beginning (bounded)."""


class AssistantText(_P):
    """Text the model wrote."""

    text: str
    """The text (bounded)."""
    message_id: str | None
    """The model response it came in."""


class AgentResult(_P):
    """Claude Code's final result event, as the agent reports it: a claim. It makes the run `completed` only
    when the gateway's record backs it (`result_verified`)."""

    subtype: str | None
    """success, error_max_turns, error_during_execution, ..."""
    is_error: bool
    """Whether it ended in error."""
    num_turns: int | None
    """Turns, as Claude Code counts them."""
    total_cost_usd: float | None
    """Cost, as Claude Code estimates it (the gateway's figure is the one that counts)."""
    duration_ms: int | None
    """Its own duration."""
    permission_denials: list[Any]
    """Tool uses it refused."""
    result: str
    """The final text (bounded)."""


class AgentEvent(_P):
    """Any other stream-json event."""

    kind: str | None
    """Its type."""
    subtype: str | None
    """Its subtype."""


class AgentOutput(_P):
    """A line of the agent's stdout that was not stream-json."""

    text: str
    """The line (bounded)."""


# --- sidecar ---------------------------------------------------------------------------------------------

class SidecarReady(_P):
    """The sidecar is serving."""

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


class Watchdog(_P):
    """The sidecar's backstop changed state: with the supervisor's heartbeat stale (`supervisor_lost`) or the
    run's deadline passed (`deadline`) it refuses every model call and connection and cuts those open;
    `restored` when a paused supervisor's heartbeat came back."""

    state: str
    """supervisor_lost, deadline or restored."""
    detail: str
    """For people: how old the heartbeat is, or how long the sidecar has run."""
    heartbeat_age_s: float | None = None
    """Seconds since the supervisor last touched its heartbeat file."""


class SidecarStopped(_P):
    """The sidecar shut down cleanly."""

    spent_usd: float
    """Its spend total."""
    calls: int
    """Model calls it served."""


class ModelCall(_P):
    """One model call through the gateway, metered from the response."""

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


class ModelCallRefused(_P):
    """The gateway refused a request: it was never forwarded."""

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


class ModelCallFailed(_P):
    """The gateway could not reach the upstream."""

    path: str
    """The API path."""
    error: str
    """What went wrong."""


class SidecarOutput(_P):
    """A line from the sidecar that was not an event."""

    text: str
    """The line (bounded)."""


class Egress(_P):
    """One connection through the egress proxy: the decision line."""

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


class InvalidEvent(_P):
    """An event whose payload did not match its type's model: kept, not dropped."""

    original_type: str
    """The type it claimed."""
    errors: str
    """What did not match."""
    payload: dict[str, Any]
    """The payload as it came."""


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "run_started": RunStarted, "disk_quota": DiskQuota, "checkout_prepared": CheckoutPrepared,
    "network_created": NetworkCreated,
    "container_created": ContainerCreated, "network_isolated": NetworkIsolated, "limit_hit": LimitHit,
    "agent_lingered": AgentLingered, "agent_line_truncated": AgentLineTruncated,
    "result_verified": ResultVerified, "resource_usage": ResourceUsage, "finalised": Finalised,
    "imported": Imported, "gate": GateChecked, "check": CheckRan, "pre_command": PreRan, "push": Pushed,
    "pull_request": PullRequest,
    "teardown": Teardown, "run_ended": RunEnded, "recovery": Recovery,
    "agent_init": AgentInit, "tool_call": ToolCall, "tool_result": ToolResult, "assistant_text": AssistantText,
    "result": AgentResult, "agent_event": AgentEvent, "agent_output": AgentOutput,
    "ready": SidecarReady, "stopped": SidecarStopped, "watchdog": Watchdog, "model_call": ModelCall,
    "model_call_refused": ModelCallRefused, "model_call_failed": ModelCallFailed, "sidecar_output": SidecarOutput,
    "egress": Egress, "invalid_event": InvalidEvent,
}
SOURCES = ("supervisor", "agent", "proxy", "gateway")
