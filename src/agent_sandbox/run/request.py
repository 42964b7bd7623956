"""The run request: what a caller asks of one run, before anything is checked against the machine.

One model for every caller: `sandbox run` builds it from its options (one option per field, the field's
docstring as the option's help), a sweep from its manifest, the service from its repository configuration
and the task it was given, a ticket through `ticket`/`ticket_text`. run_task (runner.py) validates it
against the repository, the policy and the machine and turns it into the resolved RunSpec (spec.py).

The fields come in two groups that the sweep and the service reuse rather than restate:
- RunSettings: what the operator decides (the policy and its overrides, the commands around the agent,
  the handoff). A sweep manifest, its repository entries and the service's repository configuration are
  RunSettings with fields of their own; a ticket or a service request never sets any of it.
- Assignment: what the agent is set to do, and the ref it starts from (a sweep's entries override them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_sandbox.config.backends import BackendConfig, DockerConfig, KubernetesConfig
from agent_sandbox.errors import UsageError
from agent_sandbox.run.ticket import load_ticket, parse_ticket


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class RunSettings(_Model):
    """How a run goes, as the operator decides it: set by `sandbox run`'s options, a sweep manifest or the
    service's repository configuration, never by a ticket or a service request."""

    policy: str = "default"
    """A preset name or a policy YAML file."""
    model: str | None = None
    """The Claude model; default the policy's agent.model."""
    model_script: str | None = None
    """Play this scripted-model YAML instead of calling the real API (tests and demos)."""
    timeout: int | None = Field(default=None, gt=0)
    """Wall-clock limit in seconds; overrides the policy's limits.wall_seconds."""
    idle_timeout: int | None = Field(default=None, gt=0)
    """Idle limit in seconds; overrides the policy's limits.idle_seconds."""
    max_turns: int | None = Field(default=None, gt=0)
    """Turn limit; overrides the policy's limits.max_turns."""
    pre: str | None = None
    """A command run in the sandbox before the agent, under the same policy (e.g. a deterministic dependency
    updater); its changes are left uncommitted for the agent."""
    check: str | None = None
    """A command run in the sandbox on the agent's work (e.g. the tests); if it fails, the run fails with
    reason check."""
    push: bool = False
    """Push the branch to the remote when the run completes and the change passes the policy's git rules
    (policy: git.push)."""
    remote: str = "origin"
    """The remote to push to."""
    open_pr: bool = False
    """Open a GitHub pull request after the push (GITHUB_TOKEN); implies push."""
    pr_base: str | None = None
    """The pull request's base branch; default the base ref's branch, or the checked-out one."""

    def settings(self) -> dict[str, Any]:
        """Just the RunSettings fields (a sweep manifest or a repository configuration has more)."""
        return {name: getattr(self, name) for name in RunSettings.model_fields}

    def request(self, **fields: Any) -> RunRequest:
        """A run request under these settings; `fields` add the rest (repo, task, ...) and may override any."""
        return RunRequest.model_validate({**self.settings(), **fields})


class Assignment(_Model):
    """What the agent is set to do, and where it starts."""

    task: str | None = None
    """What the agent should do."""
    base: str = "HEAD"
    """The ref the sandbox starts from."""


# The limits a request may override, as RunRequest field -> the policy's `limits` key.
LIMIT_OVERRIDES = {
    "timeout": "wall_seconds",
    "idle_timeout": "idle_seconds",
    "budget_usd": "budget_usd",
    "max_turns": "max_turns",
}


class RunRequest(RunSettings, Assignment):
    """One run, as asked for: the operator's settings, the repository and what to do there."""

    repo: str
    """The git repository to work on (a path on this host)."""
    ticket: str | None = None
    """Take the task from a ticket file: Markdown (first line is the title) or JSON with title and body.
    Untrusted text: it never selects the policy, limits or credentials."""
    ticket_text: str | None = None
    """A ticket's text already in hand (a webhook's issue, a service request's ticket), instead of a file."""
    budget_usd: float | None = Field(default=None, gt=0)
    """Model spend limit in US dollars; overrides the policy's limits.budget_usd."""
    keep: bool = False
    """Keep the workspace checkout in the run directory."""
    branch: str | None = None
    """The branch the work lands on; default sandbox/<run-id> (a sweep's: sandbox/<sweep>/<date>)."""
    replace_branch: bool = False
    """Let the run move an existing branch of that name (a sweep re-run the same day)."""
    follow_up: str | None = None
    """The id of an earlier run whose branch this run continues; its task, its result and its commits are
    given to the agent as context. The task is the new instruction; the policy, model and limits are the
    earlier run's unless given here."""

    backend: Literal["docker", "kubernetes"] | None = None
    """The platform that runs the task; default the host settings' backend (Docker unless they name another)."""
    kube_context: str | None = None
    """With the Kubernetes backend: the kubeconfig context; default the host settings' (or the current one)."""
    namespace: str | None = None
    """With the Kubernetes backend: the namespace of the run's objects; default the host settings'."""
    render: str | None = None
    """With the Kubernetes backend: write the run's objects as YAML into this directory and stop, contacting
    no cluster (docs/kubernetes.md)."""

    def backend_config(self, configured: BackendConfig) -> BackendConfig:
        """The host settings' backend with this request's overrides (--backend, --kube-context, --namespace)."""
        kind = self.backend or configured.kind
        if kind == "docker":
            if self.kube_context or self.namespace or self.render:
                raise UsageError("--kube-context, --namespace and --render go with the Kubernetes backend")
            return configured if isinstance(configured, DockerConfig) else DockerConfig()
        base = configured if isinstance(configured, KubernetesConfig) else KubernetesConfig()
        overrides = {k: v for k, v in (("context", self.kube_context), ("namespace", self.namespace)) if v}
        return base.model_copy(update=overrides)

    def check_follow_up(self) -> None:
        """A follow-up starts from the earlier run's branch and lands on it: it cannot also choose either."""
        if self.follow_up is None:
            return
        if not self.follow_up.strip():
            raise UsageError("--follow-up needs a run id")
        for name, given in (("--base", self.base != "HEAD"), ("a branch", self.branch is not None)):
            if given:
                raise UsageError(f"--follow-up continues the earlier run's branch from its tip: it takes no {name}")
        if self.replace_branch:
            raise UsageError("--follow-up moves the branch forward only: it cannot replace it")

    def task_text(self) -> tuple[str, str | None]:
        """The agent's task, and the ticket's title when it came from one. A ticket is read here: its text
        becomes the task and the title, nothing else."""
        task, title = self.task, None
        if self.ticket is not None or self.ticket_text is not None:
            if task is not None:
                raise UsageError("pass either --task or --ticket, not both")
            t = load_ticket(self.ticket) if self.ticket is not None else parse_ticket(self.ticket_text or "", "ticket")
            task, title = t.as_task(), t.title
        if task is None or not task.strip():
            raise UsageError("a task is required: pass --task TEXT (or --ticket FILE)")
        if self.pre:
            task = (
                f"{task.rstrip()}\n\nBefore you started, the sandbox ran `{self.pre}` in the workspace; its "
                "changes are left uncommitted for you. Make the result pass.\n"
            )
        return task, title

    def limit_overrides(self) -> dict[str, Any]:
        """The policy limits this request overrides, by their `limits` key."""
        return {key: getattr(self, name) for name, key in LIMIT_OVERRIDES.items() if getattr(self, name) is not None}
