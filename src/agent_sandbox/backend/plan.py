"""A run as a backend sees it: a plan of its workloads, in terms no platform owns.

The supervisor says what each workload runs, what it mounts, what it may reach and how much it may use; a
backend turns that into its own objects (Docker: networks, containers, a route-isolation helper and host
firewall rules; Kubernetes: pods, a service and network policies). Nothing here names a network, a label
syntax or a platform's special host name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_sandbox.versions import CLAUDE_CODE_VERSION

Progress = Callable[[str], None]  # where a long step (an image build) reports its lines
Role = Literal["sidecar", "agent", "check", "finaliser"]
SIDECAR_NAME = "sidecar"  # the name the run's own workloads reach the sidecar by


class Reach(StrEnum):
    """What a workload may reach over the network."""

    SIDECAR = "sidecar"
    """The run's sidecar alone (its gateway and proxy ports, by the name `sidecar`): no other address, no
    outside name resolution. The workload's entry point waits until this is in place (`go_ahead`)."""
    OUTSIDE = "outside"
    """The network beyond the machine (the sidecar, which filters what the agent asks of it), and the
    workloads that reach it as `sidecar`."""
    NOTHING = "nothing"
    """No network at all (the finaliser)."""


class Mount(BaseModel):
    """A directory or file of the run's made visible inside a workload."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str
    """Absolute path on the supervisor's machine."""
    target: str
    """Path inside the workload."""
    read_only: bool = True
    """Mount read-only unless the workload must write."""
    propagated: bool = False
    """Mounts made on the source after the workload started appear inside it too (and nothing travels back):
    for a container made before its run's workspace exists (run/held_mounts.py). The source must be a mount
    point of its own, shared."""


class Scratch(BaseModel):
    """A private, size-limited, memory-backed directory that starts empty and goes with the workload."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    path: str
    """Where it appears inside the workload."""
    size_bytes: int
    """Its size limit."""
    exec: bool = False
    """Whether programs may run from it (the agent builds and runs code in /tmp and its home)."""
    owner: tuple[int, int] | None = None
    """uid and gid owning it, mode 0700; None: world-writable like /tmp."""


class Resources(BaseModel):
    """What a workload may use of the machine."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    memory_bytes: int | None = None
    """Memory limit, swap included (no extra swap is granted)."""
    cpus: float | None = None
    """CPU limit in CPUs."""
    pids: int | None = None
    """Process and thread limit."""


class Workload(BaseModel):
    """One program of the run, in its own confinement: the sidecar, the agent, the check or the finaliser."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    role: Role
    """Which of the run's programs this is; a run has at most one of each at a time."""
    image: str
    """Image reference."""
    command: list[str] = Field(default_factory=list)
    """Arguments to the image's entry point."""
    entrypoint: list[str] | None = None
    """Replaces the image's entry point when set."""
    user: str
    """uid:gid to run as; never root for agent code."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables."""
    secret_env: dict[str, str] = Field(default_factory=dict)
    """Environment variables whose values never appear in logs, audit events or summaries. A backend may give
    each as a file instead, its path in `<NAME>_FILE` (Kubernetes: a Secret mounted into the workload alone, out
    of /proc/<pid>/environ): the workload reads either (the sidecar's model key: sidecar/__main__.py)."""
    mounts: list[Mount] = Field(default_factory=list)
    """What of the run's files it sees."""
    scratch: list[Scratch] = Field(default_factory=list)
    """Writable scratch directories; everything else but the writable mounts is read-only."""
    reach: Reach
    """What it may reach over the network."""
    hosts: dict[str, str] = Field(default_factory=dict)
    """Static name -> address entries (the policy's `egress.hosts`; `host-gateway` is this machine)."""
    dns_options: list[str] = Field(default_factory=list)
    """resolv.conf options, e.g. `timeout:1` so that a lookup with no answer fails fast."""
    resources: Resources = Field(default_factory=Resources)
    """Memory, CPU and process limits."""
    working_dir: str | None = None
    """Working directory inside the workload."""
    runtime: str | None = None
    """The container runtime (Docker) or RuntimeClass (Kubernetes) it runs under; None: the platform's default."""
    own_init: bool = False
    """Its entry point is its own PID 1 (the agent's holds the run's deadline: sandbox/init.py); otherwise the
    backend provides one that reaps orphans and passes signals on."""
    follow: bool = False
    """The supervisor reads its output line by line as it runs: no line may be lost to log rotation, and a
    reader that falls behind holds the writer back."""
    go_ahead: str | None = None
    """A file, inside one of its read-only mounts' sources, that the backend creates once the workload's
    confinement is in place (and, started with `hold`, once it is released, with the release's note as its
    content): its entry point waits for it before running anything of the agent's."""


NOTE_PATTERN = r"[A-Za-z0-9_-]{0,32}"  # a go-ahead's note (RunHandle.release): a word, safe in any shell


def check_note(note: str) -> str:
    """A go-ahead's note as RunHandle.release takes it; ValueError for anything but NOTE_PATTERN."""
    if not re.fullmatch(NOTE_PATTERN, note):
        raise ValueError(f"a go-ahead's note is a word of at most 32 characters, not {note!r}")
    return note


class Owner(BaseModel):
    """Who made a run's objects: `sandbox gc` tells a live run from an abandoned one by it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    state: str
    """The identity of the state directory whose run it is (run/liveness.py)."""
    supervisor: str
    """`<pid>_<start time>` of the supervisor process."""


class RunPlan(BaseModel):
    """What a backend needs to know of a run before its first workload starts."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    run_id: str
    """The run's id; every object made for it is labelled with it."""
    owner: Owner
    """Who made it."""


class Started(BaseModel):
    """What a backend made to start a workload, for the audit trail."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    security: dict[str, Any]
    """The workload's security settings as the backend applied them."""
    confinement: list[str] | None = None
    """For `Reach.SIDECAR`: what the backend left the workload (Docker: the one route to the sidecar)."""


class ExitInfo(BaseModel):
    """How a workload ended."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    exit_code: int | None
    """Process exit code; None if it never ran or is still running."""
    oom_killed: bool = False
    """The kernel's OOM killer ended it."""
    running: bool = False
    """It is still running."""


@dataclass(frozen=True)
class ImageSet:
    """The images one run uses."""

    agent: str
    sidecar: str
    claude_code_version: str = CLAUDE_CODE_VERSION
