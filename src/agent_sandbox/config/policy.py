"""Policies: what a run may do and how far it may go. Loaded from YAML, validated, unknown keys rejected."""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from agent_sandbox.errors import UsageError, validation_message
from agent_sandbox.paths import resource
from agent_sandbox.sidecar.egress import Egress
from agent_sandbox.sidecar.pricing import Price

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)b?$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """'4g' -> bytes. Accepts k, m, g suffixes (powers of 1024) and plain byte counts."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value.strip())
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 512m or 4g)")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


class AgentSettings(BaseModel):
    """How the agent itself is run."""

    model_config = ConfigDict(extra="forbid")

    model: str = "sonnet"
    """Claude model name or alias passed to Claude Code's --model; `--model` overrides it."""
    api_url: str = "https://api.anthropic.com"
    """The model API the gateway forwards to: Anthropic's, or any compatible endpoint a company runs."""
    server_tools: list[Literal["web_search", "web_fetch", "code_execution", "mcp"]] = Field(default_factory=list)
    """Anthropic server-side tools the model API may run for the agent (none by default: the gateway refuses
    requests that offer them). web_search and web_fetch are restricted to the egress allowlist's domains,
    and MCP servers to URLs it allows; code_execution runs code on Anthropic's side, out of the policy's
    reach: allow it only on purpose."""

    runtime: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    """A container runtime with a kernel of its own between the agent's code and the host's: the agent, its check
    and its finaliser run under it (the sidecar does not run the agent's code). Named as the platform names it:
    Docker's runtime (`runsc` for gVisor, `kata-runtime`), Kubernetes' RuntimeClass (`gvisor`, `kata`). None:
    the platform's default (`runc`; on Kubernetes, the backend's `runtime_class`). A platform without it refuses
    the run before anything starts."""

    @field_validator("api_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


class Limits(BaseModel):
    """Kill switches and resource caps, enforced from outside the agent container."""

    model_config = ConfigDict(extra="forbid")

    wall_seconds: int = Field(default=1800, gt=0)
    """Wall-clock limit for the agent, measured by the supervisor (`--timeout`)."""
    idle_seconds: int = Field(default=300, gt=0)
    """The run ends when the agent prints nothing for this long."""
    budget_usd: float = Field(default=5.0, gt=0)
    """Spend limit for model calls in US dollars (`--budget-usd`)."""
    max_turns: int = Field(default=50, gt=0)
    """Most agent turns (`--max-turns`); also passed to Claude Code as an inner layer."""
    cpus: float = Field(default=2.0, gt=0)
    """CPU cores the agent container may use."""
    memory: str = "4g"
    """Memory limit of the agent container (e.g. 512m, 4g); swap is not granted on top."""
    pids: int = Field(default=512, ge=16)
    """Most processes and threads in the agent container."""
    disk: str = "10g"
    """Writable space: caps the tmpfs /tmp and home, and the workspace's growth, which the supervisor
    measures (bind mounts have no quota on most storage drivers)."""

    @field_validator("memory", "disk")
    @classmethod
    def _at_least_64m(cls, v: str, info: ValidationInfo) -> str:
        if parse_size(v) < 64 * 1024**2:
            raise ValueError(f"{info.field_name} must be at least 64m")
        return v

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory)

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk)


class Author(BaseModel):
    """Identity used for commits made inside the sandbox."""

    model_config = ConfigDict(extra="forbid")

    name: str = "sandbox agent"
    """Author and committer name."""
    email: str = "agent@sandbox.invalid"
    """Author and committer email."""


_GITHUB_REVIEWER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})(?:/[A-Za-z0-9_.-]{1,100})?$")


class GitSettings(BaseModel):
    """Git rules of the run: who commits, what the change may touch, and whether it is pushed."""

    model_config = ConfigDict(extra="forbid")

    author: Author = Field(default_factory=Author)
    """Who the agent's commits and the finaliser's commit are by."""
    forbidden_paths: list[str] = Field(default_factory=lambda: [".github/workflows/**", ".git/**"])
    """gitignore-style globs of paths the change must not touch (add, modify or delete)."""
    max_changed_files: int = Field(default=200, gt=0)
    """Most paths the change may touch."""
    max_changed_lines: int = Field(default=5000, gt=0)
    """Most lines added plus deleted."""
    allow_binary: bool = False
    """Whether the change may add or modify binary files."""
    push: bool = False
    """Push the branch for review when the run ends and the gate passes (`--push`)."""
    pr_draft: bool = False
    """Open the pull request (`--open-pr`) as a draft, so nobody is asked to review it before a person has looked."""
    pr_labels: list[str] = Field(default_factory=list)
    """Labels added to the pull request, e.g. `[sandbox, needs-review]` (created by GitHub if the repository lacks
    them, when the token may)."""
    pr_reviewers: list[str] = Field(default_factory=list)
    """GitHub users (`login`) or teams (`org/team`) asked to review a new pull request; a pull request updated by a
    later run is not asked again."""

    @field_validator("pr_labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        for label in v:
            if not label.strip() or len(label) > 50:
                raise ValueError(f"not a GitHub label name: {label!r} (1 to 50 characters)")
        return v

    @field_validator("pr_reviewers")
    @classmethod
    def _reviewers(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _GITHUB_REVIEWER.match(name):
                raise ValueError(f"not a GitHub user or org/team: {name!r}")
        return v


_DEBIAN_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:*-]+)?$")


class ImageExtension(BaseModel):
    """What a team adds to the agent image: Debian packages and setup commands. The extended image is built
    once, on top of the agent image, and cached by a hash of these settings and of the image below."""

    model_config = ConfigDict(extra="forbid")

    packages: list[str] = Field(default_factory=list)
    """Debian packages to install (`name` or `name=version`), e.g. postgresql-client, libpq-dev."""
    setup: list[str] = Field(default_factory=list)
    """Shell commands run as root, in order, when the image is built (not when the agent runs): e.g.
    `pip install --break-system-packages pip-tools`. They reach the network as any image build does, and
    trust the policy's ca_certificates."""

    @field_validator("packages")
    @classmethod
    def _packages(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _DEBIAN_PACKAGE.match(name):
                raise ValueError(
                    f"{name!r} is not a Debian package name (write e.g. libpq-dev, or libpq-dev=15.* for a version)"
                )
        return names

    @field_validator("setup")
    @classmethod
    def _setup(cls, commands: list[str]) -> list[str]:
        if any(not c.strip() for c in commands):
            raise ValueError("a setup command is empty")
        return commands

    @property
    def empty(self) -> bool:
        return not self.packages and not self.setup


class Policy(BaseModel):
    """A complete policy: agent settings, limits and git rules."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    """A short name shown in summaries and reports."""
    description: str = ""
    """What the policy is for."""
    agent: AgentSettings = Field(default_factory=AgentSettings)
    """How the agent is run."""
    limits: Limits = Field(default_factory=Limits)
    """Kill switches and resource caps."""
    egress: Egress = Field(default_factory=Egress)
    """Network access beyond the model gateway."""
    git: GitSettings = Field(default_factory=GitSettings)
    """Git rules: who commits, what the change may touch, and whether it is pushed."""
    image: ImageExtension = Field(default_factory=ImageExtension)
    """Extra Debian packages and setup commands for the agent image (built once, cached by hash)."""
    pricing: dict[str, Price] = Field(default_factory=dict)
    """Price overrides in US dollars per million tokens, by model-name substring, on top of the built-in
    table in pricing.py (e.g. a negotiated rate, or a company endpoint's own models)."""

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form: the same rules give the same hash."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


def presets_dir() -> Path:
    return resource("policies")


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def parse_policy(data: Any, source: str) -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a policy must be a mapping, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise UsageError(validation_message(exc, source)) from None


def is_policy_file(ref: str) -> bool:
    """A path to a policy file, as opposed to a preset's name."""
    return Path(ref).suffix in (".yaml", ".yml") or "/" in ref


def _resolve_ca_certificates(policy: Policy, base: Path, source: str) -> Policy:
    """Paths in egress.ca_certificates made absolute (relative to the policy file) and checked: each must be
    a readable PEM file that TLS libraries accept, so a typo stops the run before anything is created."""
    if not policy.egress.ca_certificates:
        return policy
    resolved = []
    for entry in policy.egress.ca_certificates:
        path = (base / Path(entry).expanduser()).resolve()
        try:
            pem = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"{source}: egress.ca_certificates: cannot read {entry!r} ({path}): "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise UsageError(f"{source}: egress.ca_certificates: {entry!r} holds no PEM certificate")
        try:
            ssl.create_default_context().load_verify_locations(cadata=pem)
        except ssl.SSLError as exc:
            raise UsageError(f"{source}: egress.ca_certificates: {entry!r} is not a valid certificate: {exc}") from None
        resolved.append(str(path))
    egress = policy.egress.model_copy(update={"ca_certificates": resolved})
    return policy.model_copy(update={"egress": egress})


def ca_bundle(policy: Policy) -> str:
    """The policy's extra certificate authorities as one PEM text ('' when there are none)."""
    return "".join(Path(p).read_text().rstrip("\n") + "\n" for p in policy.egress.ca_certificates)


def load_policy(ref: str) -> tuple[Policy, str]:
    """Load a preset by name or a policy file by path. Returns the policy and where it came from."""
    path = Path(ref).expanduser()
    looks_like_file = is_policy_file(ref)
    if looks_like_file:
        if not path.is_file():
            raise UsageError(f"policy file not found: {ref}")
        source = str(path.resolve())
    else:
        path = presets_dir() / f"{ref}.yaml"
        if not path.is_file():
            raise UsageError(
                f"unknown policy {ref!r}",
                hint="presets: " + ", ".join(preset_names()) + "; or pass a path to a YAML file",
            )
        source = f"preset:{ref}"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {exc}") from None
    policy = _resolve_ca_certificates(parse_policy(data, str(path)), path.parent, str(path))
    if not looks_like_file and policy.name == "custom":
        policy = policy.model_copy(update={"name": ref})
    return policy, source
