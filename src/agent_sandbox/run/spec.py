"""The resolved run: one validated RunSpec in, one RunSummary out."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from agent_sandbox.config.policy import Policy
from agent_sandbox.errors import ExitCode
from agent_sandbox.git.gate import Violation
from agent_sandbox.sidecar.egress import EgressHost, EgressSuggestion


class Status(StrEnum):
    """How a run ended, in one word."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"


class Reason(StrEnum):
    """Why a run ended: its status and exit code follow from it."""

    COMPLETED = "completed"
    TIMEOUT = "timeout"
    IDLE = "idle"
    BUDGET = "budget"
    TURNS = "turns"
    POLICY = "policy"
    CHECK = "check"
    ERROR = "error"
    INTERRUPTED = "interrupted"


STATUS_BY_REASON: dict[str, Status] = {
    Reason.COMPLETED: Status.SUCCEEDED,
    Reason.TIMEOUT: Status.KILLED,
    Reason.IDLE: Status.KILLED,
    Reason.BUDGET: Status.KILLED,
    Reason.TURNS: Status.KILLED,
    Reason.INTERRUPTED: Status.KILLED,
    Reason.POLICY: Status.FAILED,
    Reason.CHECK: Status.FAILED,
    Reason.ERROR: Status.FAILED,
}
EXIT_BY_REASON: dict[str, ExitCode] = {
    Reason.COMPLETED: ExitCode.OK,
    Reason.TIMEOUT: ExitCode.TIMEOUT,
    Reason.IDLE: ExitCode.IDLE,
    Reason.BUDGET: ExitCode.BUDGET,
    Reason.TURNS: ExitCode.TURNS,
    Reason.POLICY: ExitCode.POLICY,
    Reason.CHECK: ExitCode.CHECK,
    Reason.ERROR: ExitCode.ERROR,
    Reason.INTERRUPTED: ExitCode.INTERRUPTED,
}
HANDOFF_FAILED = ExitCode.HANDOFF


class Tokens(BaseModel):
    """Tokens metered by the gateway over a run."""

    model_config = ConfigDict(extra="forbid")

    input: int = 0
    """Uncached input tokens."""
    output: int = 0
    """Output tokens."""
    cache_read: int = 0
    """Input tokens read from the prompt cache."""
    cache_write: int = 0
    """Input tokens written to the prompt cache."""


class RunSpec(BaseModel):
    """Everything one run needs, validated before anything is created."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    """Unique id; also names the branch sandbox/<run_id>."""
    repo: str
    """Absolute path of the host repository."""
    base_ref: str
    """The ref the user asked to start from."""
    base_commit: str
    """The commit it resolved to."""
    branch: str
    """The branch the work lands on in the host repository."""
    task: str
    """The task text given to the agent."""
    follow_up: str | None = None
    """The earlier run whose branch this run continues (a follow-up), or None."""
    instruction: str | None = None
    """A follow-up's new instruction alone; `task` is it with the earlier runs' context appended."""
    policy: Policy
    """The effective policy, CLI overrides applied."""
    policy_source: str
    """Where the policy came from: preset:<name> or a file path."""
    model: str
    """The Claude model the agent uses."""
    model_script: str | None = None
    """A scripted-model YAML file; None means the real Anthropic API."""
    upstream_url: str = "https://api.anthropic.com"
    """The model API the gateway forwards to when no script is given."""
    keep: bool = False
    """Keep the workspace checkout and the bundle in the run directory."""
    daily_remaining_usd: float | None = None
    """What was left of the host's daily budget when the run started; None without a daily cap."""
    push: bool = False
    """Push the branch to `remote` when the run completes and the gate passes."""
    remote: str = "origin"
    """The remote to push to."""
    open_pr: bool = False
    """Open a pull request after the push (GitHub REST API, token from GITHUB_TOKEN)."""
    pr_repo: str | None = None
    """owner/name of the repository the pull request is opened on."""
    pr_base: str = "main"
    """The branch the pull request asks to merge into."""
    title: str | None = None
    """A ticket's title: the pull request's title (otherwise the task's first line)."""
    replace_branch: bool = False
    """The run may move an existing branch of its name (a sweep's, re-run the same day)."""
    pre: str | None = None
    """Shell command run inside the sandbox before the agent, under the same policy."""
    check: str | None = None
    """Shell command run inside the sandbox (no network) on the agent's work; failing fails the run."""
    run_dir: str
    """The run's directory in the state directory."""
    warnings: list[str] = Field(default_factory=list)
    """What the operator should know before trusting the result (e.g. uncommitted changes left out)."""


class RunSummary(BaseModel):
    """The outcome of a run; `sandbox run --json` prints exactly this."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """The run id."""
    status: Status
    """succeeded, failed or killed."""
    reason: Reason
    """Why the run ended."""
    message: str = ""
    """A sentence on the outcome, for people."""
    repo: str
    """The host repository."""
    branch: str | None
    """The branch holding the agent's work in the host repository; None when nothing changed."""
    base_commit: str
    """The commit the agent started from."""
    follow_up: str | None = None
    """The earlier run whose branch this run continued (a follow-up), or None."""
    head: str | None = None
    """The tip of the branch."""
    commits: list[str] = Field(default_factory=list)
    """New commits on the branch, oldest first."""
    files_changed: list[str] = Field(default_factory=list)
    """Paths the branch changes relative to the base."""
    cost_usd: float = 0.0
    """Model spend metered by the gateway."""
    model_calls: int = 0
    """Model calls through the gateway."""
    tokens: Tokens = Field(default_factory=Tokens)
    """Tokens metered by the gateway."""
    turns: int = 0
    """Agent turns (model responses in the main conversation)."""
    duration_s: float
    """Wall time of the whole run."""
    exit_code: int
    """The exit code `sandbox run` leaves with."""
    oom_killed: bool = False
    """The agent container was killed for running out of memory."""
    egress_allowed: int = 0
    """Connections the policy allows (including those that then failed upstream)."""
    egress_denied: int = 0
    """Connections the egress proxy refused."""
    egress_would_deny: int = 0
    """Report mode: connections let through that enforce mode would refuse (decision `would_deny`)."""
    egress_hosts_allowed: list[EgressHost] = Field(default_factory=list)
    """Hosts reached with the policy's consent, with the address exceptions that let them through."""
    egress_hosts_denied: list[EgressHost] = Field(default_factory=list)
    """Hosts refused, with every reason."""
    egress_hosts_would_deny: list[EgressHost] = Field(default_factory=list)
    """Report mode: hosts let through that enforce mode would refuse, with every reason."""
    egress_suggestion: EgressSuggestion = Field(default_factory=EgressSuggestion)
    """The `egress.allow` and `egress.allow_addresses` entries the policy would need to allow the denied or
    would-be-denied hosts (deny-rule matches and cloud metadata addresses are never suggested)."""
    violations: list[Violation] = Field(default_factory=list)
    """How the change breaks the policy's git rules; the branch is then kept locally and not pushed."""
    pushed: bool = False
    """The branch was pushed for review."""
    remote: str | None = None
    """Where it was (or was to be) pushed."""
    push_error: str | None = None
    """Why it was not pushed, when a push was asked for."""
    pr_url: str | None = None
    """The pull request, when one was opened."""
    warnings: list[str] = Field(default_factory=list)
    """What the operator should know before trusting the result (e.g. uncommitted changes left out)."""
    kept: str | None = None
    """When the agent's work could not be imported (the engine gone, the state disk full): where it is kept.
    `sandbox gc` imports it onto the branch once the cause is fixed."""
    audit_head: str | None = None
    """SHA-256 of the audit trail's last line: `sandbox audit verify` checks the tail against it."""
    run_dir: str
    """Where the audit trail, stream and report are."""

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"
