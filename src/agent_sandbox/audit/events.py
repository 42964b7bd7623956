"""Typed payloads of the audit trail: one pydantic model per event type.

The supervisor validates every payload against its type's model before it is written, so the trail's
shape is a contract: docs/audit.md documents each type, and readers (`sandbox show`, the report) rely on it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from agent_sandbox.sidecar.events import (
    Egress,
    Event,
    GatewaySettled,
    ModelCall,
    ModelCallFailed,
    ModelCallRefused,
    SidecarListening,
    SidecarOutput,
    SidecarReady,
    SidecarStopped,
    Watchdog,
)

# --- supervisor ------------------------------------------------------------------------------------------


class RunStarted(Event):
    """The run began: what was asked, under which policy, with which images."""

    TYPE: ClassVar[str] = "run_started"

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


class DiskQuota(Event):
    """How the run's writable directories (the workspace, the check's checkout) are limited in size."""

    TYPE: ClassVar[str] = "disk_quota"

    mode: str
    """`filesystem`: each is an ext4 filesystem of `bytes`, so writing past it fails with ENOSPC; `sampled`:
    the workspace's growth is measured every few seconds (no root or no loop devices)."""
    bytes: int
    """The limit: the policy's `limits.disk`, capped to what the state filesystem can spare."""
    detail: str = ""
    """Why the quota is sampled, or that it was capped."""


class CheckoutPrepared(Event):
    """The task's checkout exists: the workspace is ready, on its branch at the base commit."""

    TYPE: ClassVar[str] = "checkout_prepared"

    base_commit: str
    """The commit it starts from."""
    branch: str
    """The branch it is on."""
    objects: str
    """The host object directory it borrows from (mounted read-only)."""
    mode: str = "copy"
    """`overlay`: a copy-on-write layer of the run's own, in its disk quota, over the base commit's tree, which
    is written once per commit into the state directory's cache and shared read-only by the runs that start
    there; `copy`: every file of the working tree written into the workspace (no root, or no overlayfs)."""
    cached: bool | None = None
    """For an overlay: true when the tree was in the cache already, false when this run built it (which costs
    what a full checkout costs); null for a copy."""
    seconds: float | None = None
    """How long preparing the workspace took (quota filesystem, tree, overlay and `.git`)."""
    detail: str = ""
    """Why the workspace is a copy where an overlay was expected (the mount failed, `SANDBOX_WORKSPACE=copy`)."""


class NetworkCreated(Event):
    """A network for this run."""

    TYPE: ClassVar[str] = "network_created"

    name: str
    """Its name."""
    internal: bool
    """True for the agent's network, which has no route out."""


class ContainerCreated(Event):
    """A container for this run, with its security settings."""

    TYPE: ClassVar[str] = "container_created"

    role: str
    """sidecar, agent or finaliser."""
    security: dict[str, Any]
    """User, capabilities, no-new-privileges, read-only root, limits, networks, mounts, env names."""
    command: list[str] | None = None
    """The agent's command line."""


class NetworkIsolated(Event):
    """A container that runs the agent's code (the agent, the check) was left one route, to the sidecar,
    before any of that code ran."""

    TYPE: ClassVar[str] = "network_isolated"

    container: str
    """The container."""
    default_route: str
    """What was done: the routes removed, and the one left (`<sidecar address> dev eth0 scope link`)."""


class LimitHit(Event):
    """A limit ended the run."""

    TYPE: ClassVar[str] = "limit_hit"

    limit: str
    """timeout, idle, budget, daily_budget, shared_budget, turns, disk, output_flood, egress_flood,
    state_disk (the trail could not be written), error (sidecar died) or interrupted."""
    reason: str | None = None
    """The run's end reason it maps to."""
    message: str | None = None
    """For people."""


class AgentLineTruncated(Event):
    """A line of the agent's output was longer than 1 MiB: its first MiB is kept (in `agent-stream.jsonl`
    and the event it makes), the rest was counted and dropped, never held in memory whole."""

    TYPE: ClassVar[str] = "agent_line_truncated"

    stream: str
    """stdout or stderr."""
    line: int
    """Its number in the agent's output (stdout and stderr together, from 1)."""
    bytes: int
    """Its whole length in bytes, as written."""
    kept: int
    """Bytes kept."""


class ResultVerified(Event):
    """The agent claimed success (a `result` line on its own stream, which any process in its container can
    write): whether the gateway's record of model calls, which nothing in the container can touch, backs the
    claim. Only a backed claim makes the run `completed`; otherwise it ends with reason `error`."""

    TYPE: ClassVar[str] = "result_verified"

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


class AgentLingered(Event):
    """Claude Code printed its result but did not exit; the supervisor stopped it."""

    TYPE: ClassVar[str] = "agent_lingered"

    seconds: float
    """How long it was given."""


class ResourceUsage(Event):
    """Resources the agent container and the supervisor used, sampled during the run."""

    TYPE: ClassVar[str] = "resource_usage"

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


class Finalised(Event):
    """What the finaliser packed."""

    TYPE: ClassVar[str] = "finalised"

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


class CheckRan(Event):
    """The operator's check command ran on a clean checkout of the agent's committed work, in a container of
    its own under the run's policy (the network only through the egress proxy)."""

    TYPE: ClassVar[str] = "check"

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


class PreRan(Event):
    """The pre command ran inside the sandbox before the agent (under the same policy)."""

    TYPE: ClassVar[str] = "pre_command"

    exit_code: int
    """Its exit code (the agent starts anyway, with the task of making the result pass)."""
    output: str
    """The end of its output."""


class FileStat(Event):
    """One changed path."""

    path: str
    """The path."""
    added: int | None
    """Lines added; None for a binary file."""
    deleted: int | None
    """Lines deleted; None for a binary file."""


class Imported(Event):
    """The agent's work is on the host's branch."""

    TYPE: ClassVar[str] = "imported"

    branch: str | None
    """The host branch."""
    head: str | None
    """Its tip."""
    commits: list[str]
    """New commits, oldest first."""
    files: list[FileStat]
    """The diffstat against the base."""


class GateChecked(Event):
    """The diff policy gate's verdict."""

    TYPE: ClassVar[str] = "gate"

    files: int
    """Paths changed."""
    lines: int
    """Lines added plus deleted."""
    violations: list[dict[str, Any]]
    """Rule, path and detail of each violation."""


class Pushed(Event):
    """The push, when one was asked for."""

    TYPE: ClassVar[str] = "push"

    remote: str | None
    """The remote."""
    branch: str | None
    """The branch."""
    pushed: bool
    """Whether it landed."""
    error: str | None
    """Why not."""


class PullRequest(Event):
    """The pull request, when one was asked for."""

    TYPE: ClassVar[str] = "pull_request"

    url: str | None
    """Its URL."""
    error: str | None
    """Why it could not be opened."""


class Teardown(Event):
    """Everything labelled with the run id was removed (or, `after_answer`, is removed once the run answered)."""

    TYPE: ClassVar[str] = "teardown"

    removed: list[str]
    """kind:name of each object removed."""
    error: str | None = None
    """Why teardown could not finish (the engine gone): what is left carries the run's labels, and
    `sandbox gc` removes it."""
    kept: str | None = None
    """The agent's work that could not be imported and is kept for recovery (a path in the run directory)."""
    after_answer: bool = False
    """The removal comes right after the run's answer (a warm daemon's run whose work is imported): `removed`
    is empty here, and whatever the process could not remove is left to `sandbox gc` by its labels."""


class Recovery(Event):
    """A run whose supervisor died (or whose work could not be imported) is being finished by another
    process: `sandbox gc`, or a later `sandbox run`."""

    TYPE: ClassVar[str] = "recovery"

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


class RunEnded(Event):
    """The run is over."""

    TYPE: ClassVar[str] = "run_ended"

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


class AgentInit(Event):
    """Claude Code started its session (as reported on the agent's own stream, like every event of source
    `agent`: claims, not verified; see `result_verified`)."""

    TYPE: ClassVar[str] = "agent_init"

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


class ToolCall(Event):
    """The model asked for a tool, as the agent reports it (a claim: any process in the agent's container can
    write such a line)."""

    TYPE: ClassVar[str] = "tool_call"

    id: str | None
    """The tool use id."""
    name: str | None
    """The tool: Bash, Read, Write, Edit, ..."""
    input: dict[str, Any]
    """Its input: the command, the file path, ... (long values bounded)."""
    message_id: str | None
    """The model response it came in."""


class ToolResult(Event):
    """What the tool returned to the model."""

    TYPE: ClassVar[str] = "tool_result"

    tool_use_id: str | None
    """The tool use it answers."""
    is_error: bool
    """Whether the tool failed."""
    size: int
    """Length of the whole result in characters."""
    excerpt: str
    """Its beginning (bounded)."""


class AssistantText(Event):
    """Text the model wrote."""

    TYPE: ClassVar[str] = "assistant_text"

    text: str
    """The text (bounded)."""
    message_id: str | None
    """The model response it came in."""


class AgentResult(Event):
    """Claude Code's final result event, as the agent reports it: a claim. It makes the run `completed` only
    when the gateway's record backs it (`result_verified`)."""

    TYPE: ClassVar[str] = "result"

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


class AgentEvent(Event):
    """Any other stream-json event."""

    TYPE: ClassVar[str] = "agent_event"

    kind: str | None
    """Its type."""
    subtype: str | None
    """Its subtype."""


class AgentOutput(Event):
    """A line of the agent's stdout that was not stream-json."""

    TYPE: ClassVar[str] = "agent_output"

    text: str
    """The line (bounded)."""


class InvalidEvent(Event):
    """An event whose payload did not match its type's model: kept, not dropped."""

    TYPE: ClassVar[str] = "invalid_event"

    original_type: str
    """The type it claimed."""
    errors: str
    """What did not match."""
    payload: dict[str, Any]
    """The payload as it came."""


# Every event type, by the name the trail gives it.
EVENT_MODELS: dict[str, type[Event]] = {
    m.TYPE: m
    for m in (
        RunStarted,
        DiskQuota,
        CheckoutPrepared,
        NetworkCreated,
        ContainerCreated,
        NetworkIsolated,
        LimitHit,
        AgentLingered,
        AgentLineTruncated,
        ResultVerified,
        ResourceUsage,
        Finalised,
        Imported,
        GateChecked,
        CheckRan,
        PreRan,
        Pushed,
        PullRequest,
        Teardown,
        RunEnded,
        Recovery,
        AgentInit,
        ToolCall,
        ToolResult,
        AssistantText,
        AgentResult,
        AgentEvent,
        AgentOutput,
        SidecarListening,
        SidecarReady,
        SidecarStopped,
        GatewaySettled,
        Watchdog,
        ModelCall,
        ModelCallRefused,
        ModelCallFailed,
        SidecarOutput,
        Egress,
        InvalidEvent,
    )
}
SOURCES = ("supervisor", "agent", "proxy", "gateway")
