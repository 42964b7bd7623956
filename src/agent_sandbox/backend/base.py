"""The backend interface: what the supervisor needs from a container platform, and nothing more."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RUN_LABEL = "sandbox.run-id"
ROLE_LABEL = "sandbox.role"
SUPERVISOR_LABEL = "sandbox.supervisor"  # pid:start-time of the supervisor that created the object
STATE_LABEL = "sandbox.state"  # the identity of the state directory whose run created it (liveness.py)


class Mount(BaseModel):
    """A host directory or file made visible inside a container."""

    model_config = ConfigDict(extra="forbid")

    source: str
    """Absolute host path."""
    target: str
    """Path inside the container."""
    read_only: bool = True
    """Mount read-only unless the container must write."""


class NetworkSpec(BaseModel):
    """A network created for one run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Unique name of the network."""
    internal: bool
    """An internal network has no route out of the host."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels; always including sandbox.run-id."""


class ContainerSpec(BaseModel):
    """Everything needed to start one container, including its security settings."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Unique container name."""
    image: str
    """Image reference."""
    command: list[str] = Field(default_factory=list)
    """Arguments to the image's entrypoint."""
    entrypoint: list[str] | None = None
    """Replaces the image's entrypoint when set."""
    user: str
    """uid:gid to run as; never root for agent code."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables."""
    secret_env: dict[str, str] = Field(default_factory=dict)
    """Environment variables whose values never appear in logs, audit events or summaries."""
    mounts: list[Mount] = Field(default_factory=list)
    """Bind mounts."""
    networks: list[str] = Field(default_factory=list)
    """Networks to join, first one at start; empty with no_network means no network at all."""
    aliases: list[str] = Field(default_factory=list)
    """Names other containers on the same networks reach this one by."""
    no_network: bool = False
    """No network interfaces but loopback."""
    read_only_root: bool = True
    """Read-only root filesystem."""
    tmpfs: dict[str, str] = Field(default_factory=dict)
    """tmpfs mounts: path -> mount options."""
    cap_drop: list[str] = Field(default_factory=lambda: ["ALL"])
    """Capabilities dropped."""
    no_new_privileges: bool = True
    """Forbid privilege gain through setuid binaries."""
    memory_bytes: int | None = None
    """Memory limit (swap included: no extra swap is granted)."""
    nano_cpus: int | None = None
    """CPU limit in billionths of a CPU."""
    pids_limit: int | None = None
    """Process and thread limit."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels; always including sandbox.run-id."""
    working_dir: str | None = None
    """Working directory inside the container."""
    extra_hosts: dict[str, str] = Field(default_factory=dict)
    """Static /etc/hosts entries: name -> IP address or `host-gateway`."""
    init: bool = True
    """Docker's init as PID 1 (reaps orphans, passes signals on). False when the entry point is its own init:
    the agent's, whose PID 1 holds the run's deadline (sandbox/init.py)."""
    dns_options: list[str] = Field(default_factory=list)
    """resolv.conf options, e.g. `timeout:1` so that lookups with no answer fail fast."""

    def security_summary(self) -> dict[str, Any]:
        """The settings an auditor wants to see; secret values left out."""
        return {
            "name": self.name, "image": self.image, "user": self.user, "cap_drop": self.cap_drop,
            "no_new_privileges": self.no_new_privileges, "read_only_root": self.read_only_root,
            "tmpfs": sorted(self.tmpfs), "memory_bytes": self.memory_bytes, "nano_cpus": self.nano_cpus,
            "pids_limit": self.pids_limit, "networks": self.networks, "no_network": self.no_network,
            "mounts": [m.model_dump() for m in self.mounts], "env_names": sorted(self.env),
            "secret_env_names": sorted(self.secret_env), "extra_hosts": self.extra_hosts,
        }


class ExitInfo(BaseModel):
    """How a container ended."""

    model_config = ConfigDict(extra="forbid")

    exit_code: int | None
    """Process exit code; None if it never ran or is still running."""
    oom_killed: bool = False
    """The kernel's OOM killer ended it."""
    running: bool = False
    """It is still running."""


class Backend(ABC):
    """A container platform that can run one sandboxed task."""

    name: str = "abstract"
    engine_lost: bool = False
    """Set once the platform stopped answering during the run (it may have come back since)."""

    @abstractmethod
    def create_network(self, spec: NetworkSpec) -> None:
        """Create the network. An internal one also gets the host's firewall closed to it where the backend
        can do that (traffic from it to the host dropped), as defence in depth behind `isolate`; where it
        cannot, a one-line warning says so and the run goes on."""

    @abstractmethod
    def start(self, spec: ContainerSpec) -> str:
        """Create and start a container; returns its id."""

    @abstractmethod
    def isolate(self, container: str, run_id: str, peer: str) -> list[str]:
        """Leave the container's network namespace one route: to `peer` (an IPv4 address on its network,
        the sidecar's), on-link. No default route, no subnet route, no broadcast route, so a connection to
        anything but the peer (the host side of the bridge included) fails at once instead of hanging.
        Returns the routes left, as `ip route` prints them."""

    @abstractmethod
    def address(self, container: str, network: str) -> str:
        """The container's IPv4 address on that network."""

    @abstractmethod
    def output(self, container: str, stderr: bool = False) -> Iterator[bytes]:
        """Follow a container's stdout (or stderr) from its start until it exits."""

    @abstractmethod
    def stats(self, container: str) -> Iterator[dict[str, int]]:
        """Samples of the container's resource use until it stops: memory and peak_memory (bytes),
        cpu_ns (cumulative CPU time) and pids."""

    @abstractmethod
    def wait(self, container: str, timeout: float) -> ExitInfo:
        """Wait up to timeout seconds for the container to exit."""

    @abstractmethod
    def status(self, container: str) -> ExitInfo: ...

    @abstractmethod
    def stop(self, container: str, grace: float) -> None:
        """SIGTERM, then SIGKILL after grace seconds."""

    @abstractmethod
    def remove_run(self, run_id: str) -> list[str]:
        """Remove every container and network labelled with this run id, and the host firewall rules made
        for its networks; returns what was removed."""

    @abstractmethod
    def list_runs(self) -> dict[str, dict[str, Any]]:
        """Run ids that still have labelled objects (or host firewall rules):
        {run_id: {"objects": [...], "supervisor": "pid:start", "state": state id or None}}."""

    @abstractmethod
    def image_info(self, image: str) -> dict[str, Any]:
        """Id, digest and labels of an image."""
