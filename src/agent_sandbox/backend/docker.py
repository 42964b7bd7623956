"""The Docker backend, on the Docker SDK."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import Mount as DockerMount
from pydantic import BaseModel, ConfigDict, Field

from agent_sandbox.backend.base import (
    ROLE_LABEL,
    RUN_LABEL,
    STATE_LABEL,
    SUPERVISOR_LABEL,
    Backend,
    NotHeld,
    RunHandle,
    SidecarStart,
    ask_unix,
    mounted_path,
)
from agent_sandbox.backend.images import ImageSet, Progress, ensure_policy_image, require_images
from agent_sandbox.backend.plan import (
    SIDECAR_NAME,
    ExitInfo,
    Mount,
    Reach,
    Role,
    RunPlan,
    Scratch,
    Started,
    Workload,
    check_note,
)
from agent_sandbox.config.backends import DockerConfig
from agent_sandbox.config.policy import Policy
from agent_sandbox.errors import EnvironmentNotReady
from agent_sandbox.paths import mountinfo_path

log = logging.getLogger(__name__)

DOCKER_HINT = "start a Docker engine (`make docker` runs scripts/ensure-docker) or set DOCKER_HOST"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
STATS_INTERVAL = 0.5  # seconds between resource samples of a running container
SIDECAR_START_WAIT = 120.0  # seconds a workload that reaches the sidecar waits for the sidecar's container to start
DISCARD_JOIN = 30.0  # seconds teardown waits for a discard under way before removing what is left itself
# How long a call waits for an engine that stopped answering (a dockerd restart takes seconds to a minute)
# before the run gives up on it; once given up on, later calls (teardown) fail at once.
ENGINE_WAIT = 120.0
ENGINE_WAIT_ENV = "SANDBOX_ENGINE_WAIT_SECONDS"


def engine_wait(configured: float | None = None) -> float:
    if configured is not None:
        return configured
    try:
        return max(0.0, float(os.environ.get(ENGINE_WAIT_ENV) or ENGINE_WAIT))
    except ValueError:
        return ENGINE_WAIT


ISOLATE_ENV = "SANDBOX_ISOLATION"  # `helper`: isolate with a helper container even where nsenter would do


def isolation_method() -> str:
    """How the agent's network namespace is cut down to one route: `nsenter` (the host's tools, as root, on
    the engine's own machine) or `helper` (a container of NET_ADMIN alone in the namespace)."""
    if os.environ.get(ISOLATE_ENV) == "helper" or os.geteuid() != 0:
        return "helper"
    if not all(shutil.which(tool) for tool in ("nsenter", "ip", "awk", "sed", "grep", "sort", "wc")):
        return "helper"
    host = os.environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        return "helper"  # a remote engine: its containers' processes are not ours to enter
    return "nsenter"


def _is_containers_process(pid: int, container_id: str) -> bool:
    """Whether process `pid` of this machine is in the cgroup of that container (cgroup v1 `/docker/<id>`,
    v2 `docker-<id>.scope` or `/docker/<id>`)."""
    if pid <= 0:
        return False
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    return container_id in cgroups


def _peer_groups(mountinfo: str, tag: str) -> dict[str, set[str]]:
    """Mount point -> the peer groups its topmost mount is `tag` of (`shared` or `master`), from a mountinfo."""
    out: dict[str, set[str]] = {}
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        optional = fields[6 : fields.index("-", 6)]
        out[fields[4]] = {f.split(":", 1)[1] for f in optional if f.startswith(f"{tag}:")}
    return out


def propagation_gap(pid: int, container_id: str, mounts: list[Mount]) -> str | None:
    """Why a mount made later on a propagated mount's source (Mount.propagated) would not reach the container,
    or None when it would: the container's mount must be a slave of the source's own peer group. An engine in
    another mount namespace (a snap, a VM, another machine) would leave the container's view empty."""
    wanted = [m for m in mounts if m.propagated]
    if not wanted:
        return None
    if not _is_containers_process(pid, container_id):
        return "the engine's containers are not processes of this machine"
    try:
        ours = _peer_groups(Path("/proc/self/mountinfo").read_text(), "shared")
        theirs = _peer_groups(Path(f"/proc/{pid}/mountinfo").read_text(), "master")
    except OSError as exc:
        return f"mount table unreadable: {exc}"
    for m in wanted:
        source = os.path.realpath(m.source)
        if not ours.get(mountinfo_path(source)):
            return f"{source} is not a shared mount point"
        if not ours[mountinfo_path(source)] & theirs.get(mountinfo_path(m.target), set()):
            return f"mounts on {source} do not reach the container's {m.target}"
    return None


class EngineUnavailable(EnvironmentNotReady):
    """The Docker engine stopped answering mid-run and did not come back in time."""


class NetworkSpec(BaseModel):
    """A Docker network created for one run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Unique name of the network."""
    internal: bool
    """An internal network has no route out of the host."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels; always including sandbox.run-id."""


class ContainerSpec(BaseModel):
    """Everything needed to start one container, including its security settings: a workload of the plan as
    Docker runs it."""

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
    runtime: str | None = None
    """The engine's container runtime to use (`runsc`, `kata-runtime`); None: the engine's default."""
    attach: bool = False
    """Attach to its output before it starts, so that no line is missed, and read it from the container's
    own stream, so that a slow reader holds the writer back (a flood waits in the container) instead of the
    log file rotating lines away unread."""

    def security_summary(self) -> dict[str, Any]:
        """The settings an auditor wants to see; secret values left out."""
        return {
            "name": self.name,
            "image": self.image,
            "user": self.user,
            "cap_drop": self.cap_drop,
            "no_new_privileges": self.no_new_privileges,
            "read_only_root": self.read_only_root,
            "tmpfs": sorted(self.tmpfs),
            "memory_bytes": self.memory_bytes,
            "nano_cpus": self.nano_cpus,
            "pids_limit": self.pids_limit,
            "networks": self.networks,
            "no_network": self.no_network,
            "mounts": [m.model_dump() for m in self.mounts],
            "env_names": sorted(self.env),
            "secret_env_names": sorted(self.secret_env),
            "runtime": self.runtime or "default",
            "extra_hosts": self.extra_hosts,
        }


# Run by a helper in the container's network namespace, as root with NET_ADMIN alone, before any of the
# container's own code runs. It leaves one route, to the peer (the sidecar), on-link: no default route, no
# subnet route (which would reach the host side of the bridge, the network's .1), no subnet broadcast route;
# then checks that exactly that is left and prints it. Idempotent: it finds the interface by its address,
# not by a route it may already have removed. The local table keeps the container's own address.
ISOLATE_SCRIPT = r"""
set -eu
peer=$1
devs=$(ip -o -4 addr show scope global | awk '{print $2}' | sort -u)
[ "$(echo $devs | wc -w)" = 1 ] || { echo "expected one network interface, found: $devs" >&2; exit 1; }
dev=$devs
ip -4 route flush table main
ip -6 route flush table main 2>/dev/null || true
ip -4 route show table local type broadcast dev "$dev" | while read -r _type addr _rest; do
  ip -4 route del table local broadcast "$addr" dev "$dev"
done
ip -4 route add "$peer/32" dev "$dev" scope link
routes=$(ip -4 route show table main | sed 's/ *$//')
[ "$routes" = "$peer dev $dev scope link" ] || { echo "unexpected routes left: $routes" >&2; exit 1; }
if ip -6 route show table main 2>/dev/null | grep -q .; then echo "IPv6 routes left" >&2; exit 1; fi
if ip -4 route show table local type broadcast dev "$dev" | grep -q .; then echo "broadcast routes left" >&2; exit 1; fi
echo "$routes"
"""


class HostFirewall:
    """Host iptables rules that drop what arrives from a run's internal bridge: to the host itself (INPUT)
    and towards any other interface (DOCKER-USER, else FORWARD; traffic between the bridge's own containers,
    agent to sidecar, stays allowed). Defence in depth behind the route isolation: even a namespace that got a
    route back, or a broadcast sent with SO_BINDTODEVICE, reaches no host service or published port. Each
    rule carries the comment `sandbox.run-id=<id>`, by which teardown and `sandbox gc` find and remove it."""

    TOOLS = ("iptables", "ip6tables")
    COMMENT = "sandbox.run-id="
    _COMMENT_RE = re.compile(r'--comment "?sandbox\.run-id=([A-Za-z0-9._-]+)"?')
    _RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

    def unavailable(self) -> str | None:
        """Why no rules can be set here, or None."""
        if os.geteuid() != 0:
            return "not running as root"
        if not shutil.which("iptables"):
            return "iptables is not installed"
        return None

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        # -w: wait for the xtables lock that concurrent runs (and the Docker engine) take.
        return subprocess.run([tool, "-w", "10", *args], capture_output=True, text=True, timeout=30)

    def _forward_chain(self, tool: str) -> str:
        return "DOCKER-USER" if self._run(tool, "-S", "DOCKER-USER").returncode == 0 else "FORWARD"

    def add(self, bridge: str, run_id: str) -> list[str]:
        """Insert the rules; returns them as `tool chain`. RuntimeError when iptables (IPv4) refuses."""
        if not self._RUN_ID_RE.match(run_id):
            raise RuntimeError(f"unexpected run id {run_id!r}")
        comment = ["-m", "comment", "--comment", f"{self.COMMENT}{run_id}"]
        added = []
        for tool in self.TOOLS:
            if not shutil.which(tool):
                continue
            rules = [("INPUT", ["-i", bridge]), (self._forward_chain(tool), ["-i", bridge, "!", "-o", bridge])]
            for chain, match in rules:
                res = self._run(tool, "-I", chain, "1", *match, *comment, "-j", "DROP")
                if res.returncode != 0:
                    if tool == "iptables":
                        raise RuntimeError(f"{tool} -I {chain}: {res.stderr.strip()[:200]}")
                    # IPv6 is off in the run's containers; its rules are a bonus where ip6tables works.
                    log.info("host_firewall_skipped tool=%s chain=%s error=%s", tool, chain, res.stderr.strip())
                    continue
                added.append(f"{tool} {chain}")
        return added

    def rules(self) -> list[tuple[str, str, str]]:
        """(tool, rule as `iptables -S` prints it, run id) of every rule this class made."""
        if self.unavailable():
            return []
        found = []
        for tool in self.TOOLS:
            if not shutil.which(tool):
                continue
            # One listing of the whole filter table (a call per chain costs as much again each).
            res = self._run(tool, "-S")
            for line in res.stdout.splitlines() if res.returncode == 0 else []:
                m = self._COMMENT_RE.search(line)
                if m and line.split(" ", 2)[:2] in (["-A", c] for c in ("INPUT", "DOCKER-USER", "FORWARD")):
                    found.append((tool, line, m.group(1)))
        return found

    def remove(self, run_id: str) -> list[str]:
        """Delete this run's rules; returns what was deleted. Failures are logged, never raised: teardown
        goes on, and `sandbox gc` finds what is left."""
        removed = []
        for tool, line, rid in self.rules():
            if rid != run_id:
                continue
            args = shlex.split(line)
            res = self._run(tool, "-D", *args[1:])
            if res.returncode == 0:
                removed.append(f"firewall:{tool} {args[1]}")
            elif "does a matching rule exist" not in res.stderr and "Bad rule" not in res.stderr:
                log.warning(
                    "host_firewall_remove_failed run_id=%s rule=%r error=%s", run_id, line, res.stderr.strip()[:200]
                )
        return removed


def connect_client() -> docker.DockerClient:
    """A client that has answered a ping, or EnvironmentNotReady."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EnvironmentNotReady(
            f"Docker is not reachable: {str(exc).splitlines()[0][:200]}", hint=DOCKER_HINT
        ) from None
    return client


def _figures(raw: Any) -> dict[str, int] | None:
    """A stats frame as the supervisor's figures; None for a frame without them (a stopped container, or one
    from before its cgroup had figures)."""
    if not isinstance(raw, dict) or str(raw.get("read", "")).startswith("0001-01-01"):
        return None
    mem = raw.get("memory_stats") or {}
    if not mem:
        return None
    return {
        "memory": int(mem.get("usage") or 0),
        # cgroup v1 reports the peak itself; v2 does not, so the caller keeps a running maximum.
        "peak_memory": int(mem.get("max_usage") or mem.get("usage") or 0),
        "cpu_ns": int(((raw.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0),
        "pids": int((raw.get("pids_stats") or {}).get("current") or 0),
    }


CGROUP_ROOT = Path("/sys/fs/cgroup")
# What a sample reads, by cgroup version: (memory now, memory's peak, CPU time, processes).
CGROUP_FILES = {
    2: ("memory.current", "memory.peak", "cpu.stat", "pids.current"),
    1: (
        "memory/memory.usage_in_bytes",
        "memory/memory.max_usage_in_bytes",
        "cpuacct/cpuacct.usage",
        "pids/pids.current",
    ),
}


def cgroup_files(pid: int, container_id: str) -> list[Path] | None:
    """The files of the container's cgroup a sample reads (CGROUP_FILES), where its process is one of this
    machine's; None otherwise (an engine elsewhere: Docker's own figures then)."""
    if not _is_containers_process(pid, container_id):
        return None
    try:
        lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    except OSError:
        return None
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        path = next((p for h, c, p in lines if h == "0"), None)
        files = [CGROUP_ROOT / path.lstrip("/") / f for f in CGROUP_FILES[2]] if path else []
    else:
        paths = {name: p for _h, c, p in lines for name in c.split(",") if c}
        files = []
        for rel in CGROUP_FILES[1]:
            controller, name = rel.split("/")
            if controller not in paths:
                return None
            files.append(CGROUP_ROOT / controller / paths[controller].lstrip("/") / name)
    # The peak is optional (cgroup v2 before Linux 5.19 has none).
    return files if files and all(f.exists() for f in (files[0], files[2], files[3])) else None


def cgroup_figures(files: list[Path]) -> dict[str, int] | None:
    """A sample read from the container's cgroup (cgroup_files); None once the cgroup is gone."""
    try:
        memory = int(files[0].read_text())
        peak = int(files[1].read_text()) if files[1].exists() else memory
        cpu = files[2].read_text()
        if files[2].name == "cpu.stat":
            cpu_ns = 1000 * next(int(ln.split()[1]) for ln in cpu.splitlines() if ln.startswith("usage_usec "))
        else:
            cpu_ns = int(cpu)
        pids = int(files[3].read_text())
    except (OSError, ValueError, StopIteration):
        return None
    return {"memory": memory, "peak_memory": max(peak, memory), "cpu_ns": cpu_ns, "pids": pids}


def _id(value: str | None) -> str:
    """An id the engine just gave: the SDK types it optional, an object it returned always has one."""
    if not value:
        raise RuntimeError("the Docker engine returned an object without an id")
    return value


class DockerBackend(Backend):
    """Each run: an internal network for the agent's workloads (left a single route, to the sidecar, and closed
    to the host by firewall rules), an egress network for the sidecar, and one container per workload."""

    name = "docker"

    def __init__(self, client: docker.DockerClient, config: DockerConfig | None = None) -> None:
        self.client = client
        self.engine_wait = engine_wait((config or DockerConfig()).engine_wait_seconds)
        self.firewall = HostFirewall()
        self._firewall_warned = False
        # Container id -> its attached output streams (stdout: False, stderr: True) not yet handed out.
        self._attached: dict[str, dict[bool, Any]] = {}
        # Container id -> when it was started or taken over (before it could end): `wait` reads its end from the
        # engine's events from then on.
        self._watched: dict[str, float] = {}
        self._engine_gone = False
        self._runtimes: list[str] | None = None  # the engine's container runtimes, once asked
        self._engine_id: str | None = None

    @classmethod
    def connect(cls, config: DockerConfig | None = None) -> DockerBackend:
        return cls(connect_client(), config)

    def images(self, policy: Policy | None = None, progress: Progress | None = None) -> ImageSet:
        images = require_images(self.client)
        if policy is None:
            return images
        if policy.agent.runtime:
            self._require_runtime(policy.agent.runtime)  # refused before the run makes anything
        return ensure_policy_image(self.client, images, policy, progress or (lambda _line: None))

    def _get(self, container: str) -> Container:
        return self._engine(self.client.containers.get, container)

    def _engine(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Make an engine call, waiting (up to ENGINE_WAIT) for an engine that is restarting."""
        deadline: float | None = None
        while True:
            try:
                return call(*args, **kwargs)
            except requests.exceptions.ConnectionError as exc:
                now = time.monotonic()
                if deadline is None:
                    self.engine_lost = True
                    deadline = now + (0 if self._engine_gone else self.engine_wait)
                    log.warning("engine_unreachable waiting_s=%.0f error=%s", deadline - now, str(exc)[:200])
                if now >= deadline:
                    self._engine_gone = True
                    raise EngineUnavailable(
                        f"the Docker engine stopped answering and did not come back within "
                        f"{self.engine_wait:.0f}s: {str(exc)[:200]}",
                        hint=DOCKER_HINT,
                    ) from None
                time.sleep(1.0)

    def open_run(self, plan: RunPlan) -> DockerRun:
        return DockerRun(
            self,
            plan.run_id,
            {RUN_LABEL: plan.run_id, SUPERVISOR_LABEL: plan.owner.supervisor, STATE_LABEL: plan.owner.state},
        )

    def attach_run(self, run_id: str) -> DockerRun:
        return DockerRun(self, run_id, None)

    def create_network(self, spec: NetworkSpec) -> None:
        network = self._engine(
            self.client.networks.create,
            spec.name,
            driver="bridge",
            internal=spec.internal,
            labels=spec.labels,
            check_duplicate=True,
        )
        log.info("network_created name=%s internal=%s", spec.name, spec.internal)
        if spec.internal:
            self._close_host_firewall(network, spec.labels.get(RUN_LABEL, ""))

    def _close_host_firewall(self, network: Any, run_id: str) -> None:
        network.reload()
        bridge = (network.attrs.get("Options") or {}).get(BRIDGE_NAME_OPTION) or f"br-{network.id[:12]}"
        why = self.firewall.unavailable()
        if why is None and not os.path.exists(f"/sys/class/net/{bridge}"):
            why = f"its bridge {bridge} is not an interface of this machine (a remote Docker engine?)"
        if why is None:
            try:
                added = self.firewall.add(bridge, run_id)
                log.info("host_firewall_closed bridge=%s rules=%s", bridge, ",".join(added))
                return
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                why = f"iptables failed: {exc}"
        if not self._firewall_warned:  # once per process: a sweep of fifty runs needs one line, not fifty
            self._firewall_warned = True
            log.warning(
                "no host firewall for the run's internal network (%s); the agent's route isolation still holds", why
            )

    def start_container(self, spec: ContainerSpec) -> str:
        mounts = [
            DockerMount(
                target=m.target,
                source=m.source,
                type="bind",
                read_only=m.read_only,
                propagation="rslave" if m.propagated else None,
            )
            for m in spec.mounts
        ]
        kwargs: dict[str, Any] = dict(
            image=spec.image,
            name=spec.name,
            command=spec.command or None,
            entrypoint=spec.entrypoint,
            user=spec.user,
            environment={**spec.env, **spec.secret_env},
            mounts=mounts,
            labels=spec.labels,
            read_only=spec.read_only_root,
            tmpfs=spec.tmpfs or None,
            cap_drop=spec.cap_drop,
            security_opt=["no-new-privileges:true"] if spec.no_new_privileges else None,
            working_dir=spec.working_dir,
            detach=True,
            privileged=False,
            init=spec.init,
            log_config={"type": "json-file", "config": {"max-size": "64m", "max-file": "2"}},
        )
        if spec.runtime:
            self._require_runtime(spec.runtime)
            kwargs["runtime"] = spec.runtime
        if spec.extra_hosts:
            kwargs["extra_hosts"] = spec.extra_hosts
        if spec.dns_options:
            kwargs["dns_opt"] = spec.dns_options
        if spec.memory_bytes:
            # memswap equal to memory: no swap on top of the limit, so a memory bomb meets the OOM killer.
            kwargs.update(mem_limit=spec.memory_bytes, memswap_limit=spec.memory_bytes)
        if spec.nano_cpus:
            kwargs["nano_cpus"] = spec.nano_cpus
        if spec.pids_limit:
            kwargs["pids_limit"] = spec.pids_limit
        if spec.no_network:
            kwargs["network_mode"] = "none"
        elif spec.networks:
            kwargs["network"] = spec.networks[0]
            kwargs["networking_config"] = {
                spec.networks[0]: self.client.api.create_endpoint_config(aliases=spec.aliases or None)
            }
        container = self._create(spec.name, kwargs)
        cid = _id(container.id)
        self.watch_exit(cid)
        try:
            for extra in spec.networks[1:]:
                network = self._engine(self.client.networks.get, extra)
                self._engine(network.connect, container, aliases=spec.aliases or None)
            if spec.attach:
                self.attach(cid)
            container.start()
        except Exception:
            for stream in self._attached.pop(cid, {}).values():
                stream.close()
            container.remove(force=True)
            raise
        log.info("container_started name=%s image=%s", spec.name, spec.image)
        return cid

    def attach(self, container: str) -> None:
        """Follow the container's output from now on (`output`): attached before its start, or, for one made
        ahead and held (fleet/pool.py), before its go-ahead, so that nothing it writes is missed."""
        self._attached[container] = {
            err: self.client.api.attach(container, stdout=not err, stderr=err, stream=True, logs=False)
            for err in (False, True)
        }

    def engine_id(self) -> str:
        if self._engine_id is None:
            self._engine_id = str(self._engine(self.client.info).get("ID") or "")
        return self._engine_id

    def _require_runtime(self, runtime: str) -> None:
        """EnvironmentNotReady unless the engine has that runtime: the policy asked for it, and running the
        agent's code under another would quietly drop a boundary."""
        if self._runtimes is None:
            self._runtimes = sorted((self._engine(self.client.info).get("Runtimes") or {}).keys())
        if runtime not in self._runtimes:
            raise EnvironmentNotReady(
                f"the policy asks for the container runtime {runtime!r}; this Docker engine has "
                f"{', '.join(self._runtimes) or 'none listed'}",
                hint="install and register it with the engine (gVisor: `runsc install`, then restart dockerd), "
                "or drop agent.runtime from the policy",
            )

    def _create(self, name: str, kwargs: dict[str, Any]) -> Container:
        """Create a container, waiting for a restarting engine. A create cut off by the engine going away may
        have happened all the same: the half-made container of that name is removed and the create repeated."""
        try:
            return self._engine(self.client.containers.create, **kwargs)
        except docker.errors.APIError as exc:
            if exc.status_code != 409 or not self.engine_lost:
                raise
            log.info("container_recreated name=%s after the engine came back", name)
            self._engine(self.client.api.remove_container, name, force=True)
            return self._engine(self.client.containers.create, **kwargs)

    def address(self, container: str, network: str) -> str:
        networks = (self._get(container).attrs.get("NetworkSettings") or {}).get("Networks") or {}
        ip = (networks.get(network) or {}).get("IPAddress") or ""
        if not ip:
            raise RuntimeError(f"container {container[:12]} has no IPv4 address on network {network}")
        return ip

    def own_name_and_address(self, container: str, network: str) -> tuple[str, str]:
        """The container's host name and its address on the network (what Docker's own /etc/hosts names)."""
        attrs = self._get(container).attrs
        hostname = str((attrs.get("Config") or {}).get("Hostname") or "")
        return hostname, self.address(container, network)

    def isolate(self, container: str, run_id: str, peer: str) -> list[str]:
        """Leave the container's network namespace a single route, to the peer (ISOLATE_SCRIPT). It runs before
        any of the container's own code: the agent's entrypoint waits for the supervisor's go-ahead."""
        peer = str(ipaddress.IPv4Address(peer))
        target = self._get(container)
        how = isolation_method()
        pid = int((target.attrs.get("State") or {}).get("Pid") or 0)
        if how == "nsenter" and not _is_containers_process(pid, _id(target.id)):
            # An engine in another machine or PID namespace (Docker Desktop, rootless): its pid is not a process
            # of ours, and entering whatever has that number here would cut the wrong namespace.
            how = "helper"
        routes = self._isolate_nsenter(pid, peer) if how == "nsenter" else self._isolate_helper(target, run_id, peer)
        log.info("network_isolated container=%s method=%s routes=%s", target.name, how, routes)
        return routes

    def _isolate_nsenter(self, pid: int, peer: str) -> list[str]:
        # The host's own tools, entering the container's network namespace alone: nothing of the container's
        # filesystem runs, and no third container is started (a helper costs a fifth of a second).
        proc = subprocess.run(
            ["nsenter", f"--target={pid}", "--net", "--", "sh", "-c", ISOLATE_SCRIPT, "isolate", peer],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"could not isolate the agent's network: {proc.stderr.strip()[-300:]}")
        return proc.stdout.splitlines()

    def _isolate_helper(self, target: Container, run_id: str, peer: str) -> list[str]:
        # A helper joins the container's network namespace with NET_ADMIN and nothing else: for a supervisor
        # that is not root (or a host without nsenter and ip).
        if target.image is None:
            raise RuntimeError(f"container {target.name} has no image to isolate it with")
        helper = self.client.containers.run(
            _id(target.image.id),
            entrypoint=["sh", "-c", ISOLATE_SCRIPT, "isolate", peer],
            user="0:0",
            network_mode=f"container:{target.id}",
            cap_drop=["ALL"],
            cap_add=["NET_ADMIN"],
            security_opt=["no-new-privileges:true"],
            read_only=True,
            labels={
                **{k: v for k, v in target.labels.items() if k in (RUN_LABEL, STATE_LABEL, SUPERVISOR_LABEL)},
                RUN_LABEL: run_id,
                ROLE_LABEL: "isolate",
            },
            detach=True,
        )
        try:
            result = helper.wait(timeout=60)
            if result.get("StatusCode") != 0:
                logs = helper.logs().decode(errors="replace")[-300:]
                raise RuntimeError(f"could not isolate the agent's network: {logs}")
            routes: list[str] = helper.logs(stdout=True, stderr=False).decode(errors="replace").splitlines()
        finally:
            helper.remove(force=True)
        return routes

    def output(self, container: str, stderr: bool = False) -> Iterator[bytes]:
        """The container's output as it comes: the stream attached at start, once, for a container started
        with `attach`; otherwise (and for later calls) its log, followed."""
        streams = self._attached.get(container)
        attached = streams.pop(stderr, None) if streams is not None else None
        if streams == {}:
            del self._attached[container]
        if attached is not None:
            try:
                yield from attached
            finally:
                attached.close()
            return
        c = self._get(container)
        yield from c.logs(stream=True, follow=True, stdout=not stderr, stderr=stderr)

    def stats(self, container: str) -> Iterator[dict[str, int]]:
        # Where the container's processes are this machine's, its cgroup's own files, read every STATS_INTERVAL:
        # at once, and with the kernel's peak. The engine's figures come from a collector that ticks once a
        # second: a short agent on a busy engine (another container's figures keep it ticking) would end
        # before its first.
        try:
            attrs = self._get(container).attrs
            files = cgroup_files(int((attrs.get("State") or {}).get("Pid") or 0), str(attrs.get("Id") or ""))
        except (docker.errors.NotFound, docker.errors.APIError, requests.exceptions.RequestException):
            return
        if files is not None:
            # The files go with the container's cgroup, at its end: no engine is asked again (one gone away
            # mid-run would otherwise end the sampler with an error).
            while (sample := cgroup_figures(files)) is not None:
                yield sample
                time.sleep(STATS_INTERVAL)
            return
        # Elsewhere, one-shot samples, one every STATS_INTERVAL: the streaming endpoint's first frame waits a
        # second for a CPU delta; a one-shot answer comes at the collector's next tick.
        try:
            while True:
                sample = _figures(self.client.api.stats(container, stream=False, one_shot=True))
                if sample is not None:
                    yield sample
                elif not self.status(container).running:
                    return
                if self.wait(container, STATS_INTERVAL).exit_code is not None:
                    return
        except (docker.errors.NotFound, docker.errors.APIError, requests.exceptions.RequestException):
            return

    def status(self, container: str) -> ExitInfo:
        try:
            c = self._get(container)
        except docker.errors.NotFound:
            return ExitInfo(exit_code=None)
        state = c.attrs.get("State", {})
        running = bool(state.get("Running"))
        return ExitInfo(
            exit_code=None if running else state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            running=running,
        )

    def watch_exit(self, container_id: str) -> None:
        """Have `wait` take the container's end from the engine's events (see _ended): it has not ended yet."""
        self._watched[container_id] = time.time()

    def wait(self, container: str, timeout: float) -> ExitInfo:
        with contextlib.suppress(requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout):
            self._get(container).wait(timeout=timeout)
        return self.status(container)

    def wait_ended(self, container: str, timeout: float) -> ExitInfo:
        """`wait`, for a container whose end decides what comes next (a run's workloads): from its `die` event
        where this backend saw it start (`watch_exit`)."""
        since = self._watched.get(container)
        if since is not None:
            deadline = time.monotonic() + timeout
            info = self._ended(container, since, timeout)
            if info is not None:
                return info
            timeout = max(0.1, deadline - time.monotonic())
        return self.wait(container, timeout)

    def _ended(self, container_id: str, since: float, timeout: float) -> ExitInfo | None:
        """The container's end as its `die` event says (and an `oom` event before it), or None (no such event
        within `timeout`: `wait` asks the usual way). The engine sends `die` once the container's processes are all
        gone, then tears its network down, and only then calls it stopped, which is when `wait` and `inspect`
        answer: 50 ms later for a container on a bridge, on the run's critical path."""
        oom = False
        try:
            stream = self.client.api.events(
                since=int(since) - 1,
                until=int(time.time() + timeout) + 1,
                filters={"type": "container", "container": container_id, "event": ["die", "oom"]},
                decode=True,
            )
            try:
                for event in stream:
                    action = event.get("Action") or event.get("status")
                    if action == "oom":
                        oom = True
                    elif action == "die":
                        code = ((event.get("Actor") or {}).get("Attributes") or {}).get("exitCode")
                        return ExitInfo(exit_code=int(str(code)), oom_killed=oom, running=False)
            finally:
                stream.close()
        except (docker.errors.APIError, requests.exceptions.RequestException, ValueError, TypeError) as exc:
            log.info("exit_event_unread container=%s error=%r", container_id, exc)
        return None

    def stop(self, container: str, grace: float) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            c = self._get(container)
            self._engine(c.stop, timeout=max(0, round(grace)))

    def remove_container(self, ref: str) -> bool:
        """Remove a container, running or not; False when it was not there (or another remover has it)."""
        try:
            self._engine(self.client.api.remove_container, ref, force=True, v=True)
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: its removal is already in progress elsewhere
                raise
            return False

    def _remove_network(self, network: Any) -> bool:
        for attempt in range(20):
            try:
                self._engine(network.remove)
                return True
            except docker.errors.NotFound:
                return False
            except docker.errors.APIError as exc:
                # "has active endpoints": a container on it is still being removed.
                if exc.status_code not in (403, 409, 500) or attempt == 19:
                    raise
                time.sleep(0.1)
        return False

    def remove_networks(self, run_id: str) -> list[str]:
        """Remove the run's networks (side by side), then its firewall rules; returns what was removed."""
        removed: list[str] = []
        networks = self._engine(self.client.networks.list, filters={"label": f"{RUN_LABEL}={run_id}"})
        with ThreadPoolExecutor(max(1, len(networks))) as pool:
            for n, gone in zip(networks, pool.map(self._remove_network, networks), strict=True):
                if gone:
                    removed.append(f"network:{n.name}")
        # After the networks: a rule that outlived its bridge matches nothing, while a bridge without its
        # rules would be open. gc finds rules whose networks are gone (list_runs).
        removed += self.firewall.remove(run_id)
        return removed

    def remove_host_objects(self, run_id: str) -> list[str]:
        return self.firewall.remove(run_id)

    def remove_run(self, run_id: str) -> list[str]:
        """Remove the run's containers, then its networks, each kind side by side. Safe to race with another
        remover (a second gc): what the other removed is skipped, and a network whose containers are still
        going is retried."""
        removed: list[str] = []
        flt = {"label": f"{RUN_LABEL}={run_id}"}
        containers = self._engine(self.client.api.containers, all=True, filters=flt)
        with ThreadPoolExecutor(4) as pool:
            names = {c["Id"]: (c.get("Names") or [c["Id"][:12]])[0].lstrip("/") for c in containers}
            for cid, gone in zip(names, pool.map(self.remove_container, names), strict=True):
                if gone:
                    removed.append(f"container:{names[cid]}")
        removed += self.remove_networks(run_id)
        if removed:
            log.info("teardown run_id=%s removed=%s", run_id, ",".join(removed))
        return removed

    def list_runs(self) -> dict[str, dict[str, Any]]:
        # ignore_removed: the SDK inspects each listed container, and other runs' short-lived containers
        # (isolation helpers, finalisers) may be gone by then.
        runs: dict[str, dict[str, Any]] = {}
        flt = {"label": RUN_LABEL}
        containers = self._engine(self.client.containers.list, all=True, filters=flt, ignore_removed=True)
        found = [(c.labels, f"container:{c.name}") for c in containers]
        found += [(n.attrs.get("Labels") or {}, f"network:{n.name}") for n in self.client.networks.list(filters=flt)]
        found += [({RUN_LABEL: rid}, f"firewall:{tool} {line.split()[1]}") for tool, line, rid in self.firewall.rules()]
        for labels, name in found:
            entry = runs.setdefault(labels[RUN_LABEL], {"objects": [], "supervisor": None, "state": None})
            entry["objects"].append(name)
            entry["supervisor"] = entry["supervisor"] or labels.get(SUPERVISOR_LABEL)
            entry["state"] = entry["state"] or labels.get(STATE_LABEL)
        return runs

    def image_info(self, image: str) -> dict[str, Any]:
        img = self.client.images.get(image)
        return {"ref": image, "id": img.id, "digests": img.attrs.get("RepoDigests", []), "labels": img.labels}


def hosts_text(names: dict[str, str], own: tuple[str, str]) -> str:
    """An /etc/hosts as Docker writes one (loopback, the container's own name), with `names` added."""
    hostname, address = own
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if hostname and address:
        lines.append(f"{address}\t{hostname}")
    for name, ip in names.items():
        if ip == "host-gateway":
            raise RuntimeError(f"{name}: host-gateway is for the sidecar's hosts, not a confined workload's")
        lines.append(f"{ipaddress.ip_address(ip)}\t{name}")
    return "\n".join(lines) + "\n"


# Container names by role (the finaliser's predates the role's name).
_SUFFIX: dict[str, str] = {"finaliser": "finalise"}


def _tmpfs(scratch: Scratch) -> str:
    opts = f"rw,nosuid,nodev,{'exec' if scratch.exec else 'noexec'},size={scratch.size_bytes}"
    if scratch.owner is not None:
        opts += f",uid={scratch.owner[0]},gid={scratch.owner[1]},mode=0700"
    return opts


class DockerRun(RunHandle):
    """One run on Docker. Containers are named `sbx-<run id>-<role>`, so a handle attached later (recovery)
    finds them without any state of the process that made them."""

    def __init__(self, backend: DockerBackend, run_id: str, labels: dict[str, str] | None) -> None:
        self.backend = backend
        self.run_id = run_id
        self.labels = labels  # None: attached to a run another process made; it starts nothing
        self.prefix = f"sbx-{run_id}"
        self.internal, self.egress = f"{self.prefix}-int", f"{self.prefix}-egress"
        self._ids: dict[str, str] = {}
        self._go_ahead: dict[str, str] = {}  # role -> the go-ahead file of a workload started with `hold`
        self._discards: list[threading.Thread] = []
        self._mounts: dict[str, list[Mount]] = {}  # role -> its bind mounts, where `ask` finds its sockets
        # The sidecar's start, which a workload that reaches it may wait for (started alongside it, from another
        # thread): set once it is over, either way. Only a handle that made the run's networks starts a sidecar.
        self._prepared = False
        self._sidecar = SidecarStart()
        self._failed: set[Role] = set()  # roles whose last start failed part-way

    def _name(self, role: Role) -> str:
        return f"{self.prefix}-{_SUFFIX.get(role, role)}"

    def _ref(self, role: Role) -> str:
        return self._ids.get(role) or self._name(role)

    def prepare(self) -> list[dict[str, Any]]:
        assert self.labels is not None, "an attached run makes nothing"
        specs = [
            NetworkSpec(name=name, internal=internal, labels=self.labels)
            for name, internal in ((self.internal, True), (self.egress, False))
        ]
        # Both at once: the engine creates networks side by side, and the internal one's firewall rules follow it.
        with ThreadPoolExecutor(len(specs)) as pool:
            list(pool.map(self.backend.create_network, specs))
        self._prepared = True
        return [{"name": spec.name, "internal": spec.internal} for spec in specs]

    def adopt(self, sidecar: Workload, held: Sequence[Workload] = ()) -> Started:
        assert self.labels is not None, "an attached run makes nothing"
        self._prepared = True
        self._mounts["sidecar"] = list(sidecar.mounts)
        spec = self.container_spec(sidecar)
        self._ids["sidecar"] = spec.name
        for w in held:
            # Made ahead, confined and held (their start and go-ahead are the run's to give): the agent's output
            # is followed from now, before anything in it runs.
            assert w.go_ahead is not None, f"the pool's {w.role} waits for no go-ahead"
            self._mounts[w.role] = list(w.mounts)
            # By its id: its end is read from the engine's events for that container alone (`wait`).
            self._ids[w.role] = cid = _id(self.backend._get(self._name(w.role)).id)
            self.backend.watch_exit(cid)
            self._go_ahead[w.role] = w.go_ahead
            if w.follow:
                self.backend.attach(self._ids[w.role])
        return self._sidecar.run(lambda: Started(security=spec.security_summary()))

    def container_spec(self, w: Workload, hosts_file: str | None = None) -> ContainerSpec:
        """The workload as a Docker container. One that reaches the sidecar alone gets `hosts_file` as its
        /etc/hosts (read-only), which names the sidecar's address once it has one (`start`)."""
        assert self.labels is not None, "an attached run starts nothing"
        networks: list[str] = []
        aliases: list[str] = []
        hosts = dict(w.hosts)
        mounts = list(w.mounts)
        if w.reach is Reach.OUTSIDE:
            networks, aliases = [self.internal, self.egress], [SIDECAR_NAME]
        elif w.reach is Reach.SIDECAR:
            networks = [self.internal]
            if hosts_file:
                mounts.append(Mount(source=hosts_file, target="/etc/hosts", read_only=True))
        r = w.resources
        return ContainerSpec(
            name=self._name(w.role),
            image=w.image,
            command=w.command,
            entrypoint=w.entrypoint,
            user=w.user,
            env=w.env,
            secret_env=w.secret_env,
            mounts=mounts,
            networks=networks,
            aliases=aliases,
            no_network=w.reach is Reach.NOTHING,
            tmpfs={s.path: _tmpfs(s) for s in w.scratch},
            memory_bytes=r.memory_bytes,
            nano_cpus=int(r.cpus * 1e9) if r.cpus else None,
            pids_limit=r.pids,
            labels={**self.labels, ROLE_LABEL: w.role},
            working_dir=w.working_dir,
            extra_hosts=hosts if w.reach is not Reach.SIDECAR else {},
            init=not w.own_init,
            dns_options=w.dns_options,
            runtime=w.runtime,
            attach=w.follow,
        )

    def start(self, workload: Workload, hold: bool = False) -> Started:
        self._mounts[workload.role] = list(workload.mounts)
        if workload.role == "sidecar":
            return self._sidecar.run(lambda: self._start(workload, hold))
        return self._start(workload, hold)

    def _start(self, workload: Workload, hold: bool) -> Started:
        if workload.role in self._failed or workload.role in self._ids:
            # What an earlier start of the role left (a finaliser started ahead that failed, or ended while held)
            # gives way to this one.
            self.backend.remove_container(self._name(workload.role))
            self._failed.discard(workload.role)
        try:
            return self._start_workload(workload, hold)
        except BaseException:
            self._failed.add(workload.role)
            raise

    def _start_workload(self, workload: Workload, hold: bool) -> Started:
        if workload.go_ahead:
            # The go-ahead's file, made now while there is room for it (release writes it, and renames it).
            part = Path(f"{workload.go_ahead}.part")
            part.touch()
            os.chmod(part, 0o644)  # the workload reads its note, whatever the supervisor's umask
        if workload.reach is not Reach.SIDECAR:
            spec = self.container_spec(workload)
            self._ids[workload.role] = cid = self.backend.start_container(spec)
            self._check_propagation(workload, cid)
            if workload.go_ahead:
                self._go_ahead[workload.role] = workload.go_ahead
                if not hold:
                    self.release(workload.role)
            return Started(security=spec.security_summary())
        # Its container starts while the sidecar's does (the supervisor starts both at once): its /etc/hosts, a
        # file of the run's mounted read-only, gets the sidecar's address once the sidecar has one. Nothing of
        # the workload's own runs before the go-ahead, which comes after that and after its isolation.
        if not workload.go_ahead:
            raise RuntimeError(f"the {workload.role} reaches the sidecar but has no go-ahead to wait for")
        hosts_file = Path(workload.go_ahead).with_name(f"{workload.role}.hosts")
        hosts_file.unlink(missing_ok=True)
        hosts_file.touch()
        os.chmod(hosts_file, 0o644)  # whatever the supervisor's umask: the workload's user resolves with it
        spec = self.container_spec(workload, str(hosts_file))
        self._ids[workload.role] = cid = self.backend.start_container(spec)
        self._check_propagation(workload, cid)
        sidecar_ip = self._sidecar_address()
        own = self.backend.own_name_and_address(cid, self.internal)
        names = {SIDECAR_NAME: sidecar_ip, **workload.hosts}
        hosts_file.write_text(hosts_text(names, own))  # in place: the mount holds this inode
        routes = self.backend.isolate(cid, self.run_id, sidecar_ip)
        self._go_ahead[workload.role] = workload.go_ahead
        if not hold:
            self.release(workload.role)
        return Started(security={**spec.security_summary(), "extra_hosts": names}, confinement=routes)

    def _check_propagation(self, workload: Workload, cid: str) -> None:
        """RuntimeError unless the mounts the run makes later on its propagated mounts' sources reach it."""
        if any(m.propagated for m in workload.mounts):
            pid = int((self.backend._get(cid).attrs.get("State") or {}).get("Pid") or 0)
            gap = propagation_gap(pid, cid, workload.mounts)
            if gap is not None:
                raise RuntimeError(f"the {workload.role}'s container cannot receive its run's mounts: {gap}")

    def _sidecar_address(self) -> str:
        """The sidecar's address on the internal network; waits for its start when this handle is making it."""
        if self._prepared:
            self._sidecar.wait(SIDECAR_START_WAIT)
        return self.backend.address(self._ref("sidecar"), self.internal)

    def release(self, role: Role, note: str = "") -> None:
        check_note(note)
        path = self._go_ahead.pop(role, None)
        if path is None:
            raise RuntimeError(f"{role} was not started to wait for a go-ahead, or has had it")
        if role != "agent" and not self.status(role).running:
            # Held for a long while (the finaliser started ahead): killed or stopped meanwhile, it would take its
            # go-ahead to no one. (The agent's is given right after its start, which checked it.)
            self._failed.add(role)
            raise NotHeld(f"the {role} ended before its go-ahead")
        # Its entry point waits for this file (in a mount it can only read) before running anything. Written
        # whole under another name first, made when the workload started: the workload never reads half a
        # note, and on a full disk the go-ahead still comes, without its note.
        part = f"{path}.part"
        try:
            # Unbuffered: a full disk fails the write itself (then the go-ahead comes without its note), never a
            # flush at close.
            fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                try:
                    if os.write(fd, note.encode()) != len(note):
                        raise OSError("short write")
                except OSError as exc:
                    log.warning("go_ahead_note_lost role=%s error=%r", role, exc)
                    os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))
            finally:
                os.close(fd)
            os.replace(part, path)
        except OSError:
            self._failed.add(role)  # a start of the role again removes this one first
            raise

    def discard(self, *roles: Role, network: bool = False) -> None:
        refs = [self._ref(role) for role in roles]

        def remove() -> None:
            t0 = time.monotonic()
            try:
                with ThreadPoolExecutor(max(1, len(refs))) as pool:
                    list(pool.map(self.backend.remove_container, refs))
                removed = self.backend.remove_networks(self.run_id) if network else []
                log.info(
                    "discarded run_id=%s roles=%s networks=%d seconds=%.2f",
                    self.run_id,
                    ",".join(roles),
                    len(removed),
                    time.monotonic() - t0,
                )
            except Exception as exc:  # teardown removes it (or gc does): nothing depends on this
                log.info("discard_deferred run_id=%s roles=%s error=%r", self.run_id, ",".join(roles), exc)

        thread = threading.Thread(target=remove, name="discard", daemon=True)
        thread.start()
        self._discards.append(thread)

    def output(self, role: Role, stderr: bool = False) -> Iterator[bytes]:
        return self.backend.output(self._ref(role), stderr)

    def stats(self, role: Role) -> Iterator[dict[str, int]]:
        return self.backend.stats(self._ref(role))

    def wait(self, role: Role, timeout: float) -> ExitInfo:
        return self.backend.wait_ended(self._ref(role), timeout)

    def status(self, role: Role) -> ExitInfo:
        return self.backend.status(self._ref(role))

    def stop(self, role: Role, grace: float) -> None:
        self.backend.stop(self._ref(role), grace)

    def ask(self, role: Role, socket: str, line: bytes, timeout: float) -> bytes | None:
        # Bind mounts: the socket is in the host's directory, reached by its descriptor (ask_unix).
        path = mounted_path(self._mounts.get(role, []), socket)
        return ask_unix(path, line, timeout) if path is not None else None

    def remove_workloads(self) -> list[str]:
        # The work is in the host's directory, which no container or network holds: all of it goes, and the
        # finaliser starts with no network of the run's.
        return self.teardown()

    def teardown(self) -> list[str]:
        for thread in self._discards:
            thread.join(DISCARD_JOIN)
        return self.backend.remove_run(self.run_id)

    def keep_work(self, dest: Path) -> None:
        # The workspace is the host's directory, bind-mounted: the working tree is there already.
        return None
