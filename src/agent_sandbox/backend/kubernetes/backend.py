"""The Kubernetes backend, on the official client: a run's workloads as pods of one namespace, confined by
NetworkPolicies, fed and emptied through the API server (manifests.py says what each object is).

The calls it makes are few and named (the `Cluster` below), so the unit tests run the backend's logic against
a fake of exactly those, with the client's own models (tests/test_kubernetes_backend.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from agent_sandbox.backend.base import (
    ASK_LIMIT,
    ROLE_LABEL,
    RUN_LABEL,
    STATE_LABEL,
    SUPERVISOR_LABEL,
    Backend,
    RunHandle,
    SidecarStart,
)
from agent_sandbox.backend.kubernetes import manifests as mf
from agent_sandbox.backend.kubernetes import transfer
from agent_sandbox.backend.kubernetes.forward import ExecStream, Forwarder, RelayFailed, relay_command
from agent_sandbox.backend.plan import (
    ExitInfo,
    ImageSet,
    Progress,
    Reach,
    Role,
    RunPlan,
    Started,
    Workload,
    check_note,
)
from agent_sandbox.config.backends import KubernetesConfig
from agent_sandbox.config.policy import Policy
from agent_sandbox.errors import EnvironmentNotReady
from agent_sandbox.sidecar.config import CONFIG_ENV, GATEWAY_PORT, SidecarConfig
from agent_sandbox.sidecar.egress import Egress

log = logging.getLogger(__name__)

KUBE_HINT = (
    "check the kubeconfig and context (`kubectl --context CONTEXT get pods -n NAMESPACE`), see docs/kubernetes.md"
)
POLL = 0.5  # seconds between looks at a pod's state
RELAY_RESTARTS = 5  # times in a row a socket relay whose stream broke is started again
RELAY_STEADY = 60.0  # seconds a relay must have lasted for its restarts to count from zero again
RELAY_BACKOFF = 0.5  # seconds before the first restart; doubled each time, 30 at most
START_TIMEOUT = 300.0  # seconds a pod may take to be scheduled, pull its image and run its stage container
PROBE_TIMEOUT = 30.0  # seconds the network policies may take to be in force for a new pod
DISCARD_JOIN = 30.0
KEEPER = "keeper"  # the pod that reads the working tree off the run's volume (keep_work)
MIRROR_INTERVAL = 1.0  # seconds between looks at a running workload's live inputs (the heartbeat)
KINDS = ("pod", "service", "secret", "persistentvolumeclaim", "networkpolicy", "configmap")
"""Every kind of object a run makes, in the order teardown removes them: the pods first, their network
policies after them (never a pod without its policy), the anchor last."""

# Run in the stage container, in the pod's network namespace, before any code of the workload's: the sidecar's
# gateway must answer, and nothing else may (the API server, a public address).
PROBE_SCRIPT = r"""
import os, socket, sys
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return "open"
    except OSError as exc:
        return "closed (%s)" % (type(exc).__name__,)
want = [("sidecar", sys.argv[1], int(sys.argv[2]), "open")]
api = os.environ.get("KUBERNETES_SERVICE_HOST")
if api:
    want.append(("the API server", api, int(os.environ.get("KUBERNETES_SERVICE_PORT") or 443), "closed"))
want.append(("a public address", "1.1.1.1", 443, "closed"))
ok = True
for name, host, port, expect in want:
    got = reach(host, port)
    print("%s %s:%d %s" % (name, host, port, got))
    ok = ok and got.startswith(expect)
sys.exit(0 if ok else 1)
"""

# Run in a workload's `main` container (RunHandle.ask): one line to a Unix socket there, the answer on stdout.
# By the directory's descriptor, as on Docker: the path need not fit a socket address.
ASK_SCRIPT = r"""
import os, socket, sys, time
path, line, timeout, limit = sys.argv[1], bytes.fromhex(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + timeout
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    d = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    s.connect("/proc/self/fd/%d/%s" % (d, os.path.basename(path)))
    s.sendall(line)
except OSError as exc:
    sys.stderr.write("cannot reach %s: %s\n" % (path, exc))
    sys.exit(3)
got = b""
while len(got) < limit and time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        chunk = s.recv(limit - len(got))
    except OSError:
        break
    if not chunk:
        break
    got += chunk
sys.stdout.buffer.write(got)
"""


class Cluster(Protocol):
    """The calls the backend makes (one namespace). The real one wraps the official client (`ClientCluster`)."""

    def create(self, manifest: dict[str, Any]) -> Any:
        """Create the object; returns the client's model of it as the API server answered."""

    def read_pod(self, name: str) -> Any:
        """The pod's V1Pod, or None when it is not there."""

    def delete(self, kind: str, name: str, grace: int | None = None) -> bool:
        """Delete the object; False when it was not there."""

    def select(self, kind: str, selector: str) -> list[Any]:
        """The objects of a kind whose labels match the selector (their models)."""

    def logs(self, pod: str, container: str) -> Iterator[bytes]:
        """Follow a container's output until it ends."""

    def exec(
        self,
        pod: str,
        container: str,
        command: list[str],
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> tuple[int, str]:
        """Run a command in a running container; stdin is sent, stdout written; returns (exit code, stderr)."""

    def exec_stream(self, pod: str, container: str, command: list[str]) -> ExecStream:
        """Run a command in a running container with its stdin and stdout kept open as a stream of bytes (the
        socket relay: forward.py)."""

    def metrics(self, pod: str) -> dict[str, Any] | None:
        """The pod's metrics.k8s.io sample, or None without a metrics server."""

    def runtime_classes(self) -> list[str] | None:
        """The cluster's RuntimeClasses, or None when the supervisor may not list them."""


def _quantity(text: str) -> float:
    """A Kubernetes quantity (`250m`, `12Ki`, `3n`, `1.5`) as a number."""
    units = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def _main_status(pod: Any) -> ExitInfo:
    """The workload's state from its pod: its `main` container's."""
    if pod is None:
        return ExitInfo(exit_code=None)
    status = pod.status
    for cs in (status.container_statuses or []) if status else []:
        if cs.name != mf.MAIN:
            continue
        term = cs.state.terminated if cs.state else None
        if term is not None:
            return ExitInfo(exit_code=term.exit_code, oom_killed=term.reason == "OOMKilled")
        return ExitInfo(exit_code=None, running=True)
    phase = status.phase if status else None
    # Pending (scheduling, pulling, staging): on its way; Failed before `main` ran (a deadline, an eviction): gone.
    return ExitInfo(exit_code=None, running=phase in (None, "Pending", "Running"))


def _stage_running(pod: Any) -> bool:
    for cs in (pod.status.init_container_statuses or []) if pod is not None and pod.status else []:
        if cs.name == mf.STAGE and cs.state is not None and cs.state.running is not None:
            return True
    return False


def _stage_failed(pod: Any) -> str | None:
    if pod is None:
        return "the pod is gone"
    status = pod.status
    if status is not None and status.phase == "Failed":
        return f"the pod failed: {status.reason or ''} {status.message or ''}".strip()
    for cs in (status.init_container_statuses or []) if status else []:
        waiting = cs.state.waiting if cs.state else None
        if waiting is not None and waiting.reason in (
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "CreateContainerConfigError",
        ):
            return f"{cs.name}: {waiting.reason}: {waiting.message or ''}".strip()
    return None


class KubernetesBackend(Backend):
    """Each run: an anchor owning a claim, a Service, a Secret, three NetworkPolicies and one pod per workload."""

    name = "kubernetes"

    def __init__(self, cluster: Cluster, config: KubernetesConfig) -> None:
        self.cluster = cluster
        self.config = config

    @classmethod
    def connect(cls, config: KubernetesConfig) -> KubernetesBackend:
        try:
            from agent_sandbox.backend.kubernetes.client import ClientCluster
        except ImportError as exc:
            raise EnvironmentNotReady(
                f"the Kubernetes backend needs the official client ({exc})",
                hint="pip install 'agent-sandbox[kubernetes]'",
            ) from None
        return cls(ClientCluster.connect(config), config)

    def open_run(self, plan: RunPlan) -> KubernetesRun:
        return KubernetesRun(self, plan.run_id, plan)

    def attach_run(self, run_id: str) -> KubernetesRun:
        return KubernetesRun(self, run_id, None)

    def list_runs(self) -> dict[str, dict[str, Any]]:
        runs: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            for obj in self.cluster.select(kind, RUN_LABEL):
                labels = obj.metadata.labels or {}
                entry = runs.setdefault(labels[RUN_LABEL], {"objects": [], "supervisor": None, "state": None})
                entry["objects"].append(f"{kind}:{obj.metadata.name}")
                entry["supervisor"] = entry["supervisor"] or labels.get(SUPERVISOR_LABEL)
                entry["state"] = entry["state"] or labels.get(STATE_LABEL)
        return runs

    def images(self, policy: Policy | None = None, progress: Progress | None = None) -> ImageSet:
        imgs = self.config.images
        if not imgs.agent or not imgs.sidecar:
            raise EnvironmentNotReady(
                "the Kubernetes backend needs the images' references in a registry (backend.images.agent and "
                "backend.images.sidecar in the host settings)",
                hint="`sandbox images build`, push both images, and name them (docs/kubernetes.md#images)",
            )
        if policy is not None and (policy.image.packages or policy.image.setup or policy.egress.ca_certificates):
            raise EnvironmentNotReady(
                f"policy {policy.name} extends the agent image (image: or egress.ca_certificates), which the "
                "Kubernetes backend does not build",
                hint="build the extended image with Docker, push it and name it as backend.images.agent",
            )
        runtime = (policy.agent.runtime if policy is not None else None) or self.config.runtime_class
        if runtime:
            known = self.cluster.runtime_classes()
            # A pod naming a missing RuntimeClass is refused by the API server anyway; asking first refuses the
            # run before anything is made, and says what there is.
            if known is not None and runtime not in known:
                raise EnvironmentNotReady(
                    f"the run asks for the RuntimeClass {runtime!r}; this cluster has {', '.join(known) or 'none'}",
                    hint="install the runtime on the nodes and create its RuntimeClass, or drop agent.runtime "
                    "(policy) / runtime_class (backend settings)",
                )
        return ImageSet(agent=imgs.agent, sidecar=imgs.sidecar)

    def image_info(self, image: str) -> dict[str, Any]:
        # The nodes pull by reference; the supervisor's machine need not have the image.
        return {"ref": image, "digests": [image] if "@sha256:" in image else [], "labels": {}}


class _Pod:
    """What the handle knows of one workload's pod."""

    def __init__(self, workload: Workload, vols: list[mf.Volume], manifest: dict[str, Any]) -> None:
        self.workload = workload
        self.vols = vols
        self.manifest = manifest
        self.fetched = False
        self.final: ExitInfo | None = None  # how it ended, kept once the pod itself is deleted
        self.held = False
        self.lock = threading.Lock()
        self.mirror_stop = threading.Event()
        self.sockets: list[tuple[mf.Volume, str]] = []  # Unix sockets of this machine's to relay into the pod
        self.relays: list[Forwarder] = []
        self.relays_closed = False  # no relay starts again once the pod is done with them
        self.relay_lock = threading.Lock()  # not `lock`: the fetch holds that while it closes the relays

    def close_relays(self) -> None:
        """The pod is done with this machine's sockets: their relays end (and the sockets in the pod)."""
        with self.relay_lock:
            self.relays_closed = True
            relays, self.relays = self.relays, []
        for relay in relays:
            relay.close()

    def add_relay(self, relay: Forwarder) -> bool:
        """Keep a relay that started; False (and it is closed) when the pod is done with its relays already."""
        with self.relay_lock:
            if not self.relays_closed:
                self.relays.append(relay)
                return True
        relay.close()
        return False


class _Ended:
    """A relay that could not be started again: over at once (what `_keep_relay` waits on)."""

    closing = False

    def __init__(self, lasted: float) -> None:
        self.ended = threading.Event()
        self.ended.set()
        self.lasted = lasted


class KubernetesRun(RunHandle):
    """One run on a cluster. Objects are named `sbx-<run id>[-<what>]` (manifests.Names), so a handle attached
    later (recovery) finds them without any state of the process that made them."""

    def __init__(self, backend: KubernetesBackend, run_id: str, plan: RunPlan | None) -> None:
        self.backend = backend
        self.cluster = backend.cluster
        self.config = backend.config
        self.run_id = run_id
        self.plan = plan  # None: attached to a run another process made; it starts nothing
        self.names = mf.Names(run_id)
        self.labels = mf.run_labels(run_id, plan.owner if plan else None)
        self.namespace = self.config.namespace
        self.anchor_uid: str | None = None
        self.sidecar_ip: str | None = None
        self._pods: dict[str, _Pod] = {}
        self._uploaded: set[str] = set()  # claim keys an earlier workload put on the run's volume
        self._claimed = False  # the run's volume exists
        self._adopted = False  # taken over from another process (recovery): its claim holds what that one put there
        self._discards: list[threading.Thread] = []
        self._left_fetched: set[str] = set()  # pods of another process's whose outputs were fetched (`_fetch_left`)
        # The sidecar's start, which the agent's (begun alongside it, from another thread) waits for: set once it is
        # over, either way. Only a handle that made the run's anchor starts a sidecar.
        self._prepared = False
        self._sidecar = SidecarStart()
        # Held workloads whose pod waits for their release (a finaliser started ahead: it mounts the run's
        # ReadWriteOnce volume, which the agent's pod may hold on another node until it is gone).
        self._deferred: dict[str, Workload] = {}

    def _selector(self) -> str:
        return f"{RUN_LABEL}={mf.run_labels(self.run_id, None)[RUN_LABEL]}"

    # --- before the workloads --------------------------------------------------------------------------------

    def prepare(self) -> list[dict[str, Any]]:
        assert self.plan is not None, "an attached run makes nothing"
        made = self.cluster.create(mf.anchor(self.names, self.namespace, self.labels, self.plan.owner))
        self.anchor_uid = str(made.metadata.uid)
        self._prepared = True
        # The isolation comes before any pod: no pod of the run is ever without it.
        records = []
        for np in mf.isolation_policies(self.names, self.namespace, self.labels, self.anchor_uid):
            self.cluster.create(np)
            records.append({"name": np["metadata"]["name"], "internal": True})
        return records

    def _claim(self, size_bytes: int) -> None:
        assert self.anchor_uid is not None
        size = self.config.workspace.size or str(size_bytes)
        self.cluster.create(
            mf.claim(
                self.names, self.namespace, self.labels, self.anchor_uid, size, self.config.workspace.storage_class
            )
        )
        self._claimed = True

    # --- workloads ---------------------------------------------------------------------------------------------

    def start(self, workload: Workload, hold: bool = False) -> Started:
        if workload.role == "sidecar":
            return self._sidecar.run(lambda: self._start(workload, hold))
        if workload.reach is Reach.SIDECAR and self._prepared:
            self._sidecar.wait(START_TIMEOUT)
        vols = mf.volumes(workload, self._uploaded, lambda p: Path(p).is_file())
        if hold and workload.go_ahead and self._claimed and any(v.on_claim for v in vols):
            assert self.anchor_uid is not None
            # Its pod is made at its release: the run's volume is the agent's until then, maybe on another node.
            self._deferred[workload.role] = workload
            manifest = mf.pod(
                self.names, self.namespace, self.labels, self.anchor_uid, workload, vols, self.config, self.sidecar_ip
            )
            log.info("pod_deferred role=%s until=release", workload.role)
            return Started(security=mf.security_summary(manifest))
        return self._start(workload, hold)

    def _start(self, workload: Workload, hold: bool, note: str = "") -> Started:
        assert self.plan is not None, "an attached run starts nothing"
        if self.anchor_uid is None:
            raise RuntimeError("prepare() makes the run's anchor before any workload starts")
        w = workload
        vols = mf.volumes(w, self._uploaded, lambda p: Path(p).is_file())
        sockets = _sockets(w, vols)
        if any(v.on_claim for v in vols) and not self._claimed:
            self._claim(mf.claim_size(w))
        if w.secret_env:
            self.cluster.create(
                mf.secret(self.names, self.namespace, self.labels, self.anchor_uid, w.role, w.secret_env)
            )
        if w.reach is Reach.OUTSIDE:
            # The sidecar's own policy, from the egress rules it is given to enforce, before its pod exists.
            self.cluster.create(
                mf.sidecar_policy(
                    self.names, self.namespace, self.labels, self.anchor_uid, sidecar_egress(w), self.config
                )
            )
            made = self.cluster.create(mf.service(self.names, self.namespace, self.labels, self.anchor_uid))
            self.sidecar_ip = str(made.spec.cluster_ip)
        elif w.reach is Reach.SIDECAR and self.sidecar_ip is None:
            raise RuntimeError(f"the {w.role} reaches the sidecar, which has not started")
        manifest = mf.pod(
            self.names, self.namespace, self.labels, self.anchor_uid, w, vols, self.config, self.sidecar_ip
        )
        self.cluster.create(manifest)
        pod = self._pods[w.role] = _Pod(w, vols, manifest)
        pod.sockets = sockets
        name = self.names.pod(w.role)
        self._await_stage(name)
        uploads = [v for v in vols if v.upload]
        if self._adopted and any(v.on_claim for v in uploads):
            uploads = self._resume_claim(name, uploads)
        self._upload(name, mf.STAGE, uploads)
        self._uploaded.update(v.key for v in vols if v.on_claim)
        confinement = None
        if w.reach is Reach.SIDECAR:
            confinement = self._probe(name)
        if w.go_ahead and hold:
            pod.held = True
        else:
            self._go(pod, note)
        if any(v.live for v in vols):
            threading.Thread(target=self._mirror, args=(pod,), name=f"mirror-{w.role}", daemon=True).start()
        log.info("pod_started name=%s image=%s", name, w.image)
        security = mf.security_summary(manifest)
        if sockets:
            security["relayed_sockets"] = [f"{v.target}/{sock}" for v, sock in sockets]
        return Started(security=security, confinement=confinement)

    def _resume_claim(self, name: str, vols: list[mf.Volume]) -> list[mf.Volume]:
        """A run taken over (recovery): what its claim holds from the other process's workloads stays, where its
        upload completed (the working tree with the agent's work, the objects, the inputs); a volume the workload
        writes and the supervisor fetches (the finaliser's out/, whose stale result must not be read back), and
        whatever is half there, are replaced by this machine's copy. Returns the volumes still to upload."""
        keep = [v.key for v in vols if v.on_claim and not v.download]
        replace = [v.key for v in vols if v.on_claim and v.download]
        with transfer.spooled() as out:
            rc, err = self.cluster.exec(name, mf.STAGE, transfer.claim_resume_command(keep, replace), stdout=out)
            out.seek(0)
            kept = set(out.read().decode(errors="replace").split())
        if rc != 0:
            raise RuntimeError(f"could not look at the run's volume from pod {name}: {err.strip()[-300:]}")
        log.info("claim_resumed pod=%s kept=%s", name, ",".join(sorted(kept & set(keep))))
        return [v for v in vols if not (v.on_claim and v.key in kept)]

    def _await_stage(self, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            pod = self.cluster.read_pod(name)
            if _stage_running(pod):
                return
            if why := _stage_failed(pod):
                raise RuntimeError(f"pod {name} did not start: {why}")
            time.sleep(POLL)
        raise RuntimeError(f"pod {name} was not running after {START_TIMEOUT:.0f}s (scheduling, image pull)")

    def _upload(self, name: str, container: str, vols: list[mf.Volume]) -> None:
        if not vols:
            return
        with transfer.spooled() as buf:
            size = transfer.pack_inputs(vols, buf)
            buf.seek(0)
            rc, err = self.cluster.exec(name, container, transfer.upload_command(size), stdin=buf)
        if rc != 0:
            raise RuntimeError(f"could not put the inputs into pod {name}: {err.strip()[-300:]}")

    def _probe(self, name: str) -> list[str]:
        """The pod's network, from inside, before any of its code runs: the sidecar answers, nothing else does."""
        assert self.sidecar_ip is not None
        command = ["python3", "-I", "-c", PROBE_SCRIPT, self.sidecar_ip, str(GATEWAY_PORT)]
        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            with transfer.spooled() as out:
                rc, err = self.cluster.exec(name, mf.STAGE, command, stdout=out)
                out.seek(0)
                lines = out.read().decode(errors="replace").splitlines()
            if rc == 0:
                return lines
            # New pods may start before the network plugin has applied their policies, and the sidecar may still
            # be starting: look again until the deadline, then refuse the run.
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"the network policies do not confine pod {name} (does the cluster's network plugin enforce "
                    f"NetworkPolicy?): {'; '.join(lines) or err.strip()[-300:]}"
                )
            time.sleep(1.0)

    def _go(self, pod: _Pod, note: str = "") -> None:
        """End the stage container (after writing the go-ahead, with `note` in it, if the workload waits for one):
        `main` runs."""
        markers = []
        notes = {}
        if pod.workload.go_ahead:
            markers.append(self._in_pod(pod, pod.workload.go_ahead))
            notes[markers[-1]] = note
        markers.append(transfer.staged_marker())
        rc, err = self.cluster.exec(
            self.names.pod(pod.workload.role), mf.STAGE, transfer.touch_command(*markers, notes=notes)
        )
        if rc != 0:
            raise RuntimeError(f"could not give {pod.workload.role} its go-ahead: {err.strip()[-300:]}")
        pod.held = False
        if pod.sockets:
            self._relay(pod)

    def _relay(self, pod: _Pod) -> None:
        """This machine's Unix sockets in the workload's mounts (a sweep's budget broker), each made reachable in
        the pod by a relay (sidecar/relay.py) that `exec` runs in its `carrier` (which has the volume writable;
        `main` sees the socket through its read-only mount), listening before this returns. The relay runs as
        the pod's user, in the pod's own emptyDir: no other pod reaches it."""
        name = self.names.pod(pod.workload.role)
        self._await_container(name, mf.CARRIER)
        for v, sock in pod.sockets:
            relay = self._start_relay(pod, name, v, sock)
            log.info("socket_relayed pod=%s socket=%s/%s target=%s", name, v.target, sock, relay.target)
            threading.Thread(
                target=self._keep_relay, args=(pod, name, v, sock, relay), name=f"keep-relay-{name}", daemon=True
            ).start()

    def _start_relay(self, pod: _Pod, name: str, v: mf.Volume, sock: str) -> Forwarder:
        """One relay of the socket into the pod, listening once this returns (RelayFailed otherwise)."""
        stream = self.cluster.exec_stream(name, mf.CARRIER, relay_command(f"{mf.transfer_path(v)}/{sock}"))
        relay = Forwarder(stream, str(Path(v.source) / sock), f"{name}:{v.target}/{sock}")
        if not pod.add_relay(relay):
            raise RelayFailed(f"the socket relay {relay.label} was not wanted any more")
        relay.start()
        return relay

    def _keep_relay(self, pod: _Pod, name: str, v: mf.Volume, sock: str, first: Forwarder) -> None:
        """Start the relay again when its stream breaks (an API server restarted, a connection dropped) while the
        pod still wants it: calls in flight then are refused (fail closed), the next ones pass again. At most
        RELAY_RESTARTS times in a row without a relay that lasted RELAY_STEADY."""
        relay: Forwarder | _Ended = first
        failures = 0
        while True:
            relay.ended.wait()
            began = time.monotonic()
            with pod.relay_lock:
                if pod.relays_closed or relay.closing:
                    return
                if isinstance(relay, Forwarder) and relay in pod.relays:
                    pod.relays.remove(relay)
            if relay.lasted >= RELAY_STEADY:
                failures = 0
            failures += 1
            if failures > RELAY_RESTARTS:
                log.warning("socket_relay_abandoned relay=%s:%s/%s restarts=%d", name, v.target, sock, RELAY_RESTARTS)
                return
            time.sleep(min(RELAY_BACKOFF * 2 ** (failures - 1), 30.0))
            try:
                if not self.status(pod.workload.role).running:
                    return
                relay = self._start_relay(pod, name, v, sock)
            except Exception as exc:  # one more failure; the next attempt, or none, follows
                log.warning("socket_relay_restart_failed relay=%s:%s/%s error=%r", name, v.target, sock, exc)
                relay = _Ended(time.monotonic() - began)
                continue
            log.info("socket_relay_restarted relay=%s attempt=%d", relay.label, failures)

    def _await_container(self, name: str, container: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            pod = self.cluster.read_pod(name)
            statuses = (pod.status.container_statuses or []) if pod is not None and pod.status else []
            for cs in statuses:
                if cs.name == container and cs.state is not None:
                    if cs.state.running is not None:
                        return
                    if cs.state.terminated is not None:
                        raise RuntimeError(f"container {container} of pod {name} ended before it was used")
            if pod is None or (pod.status is not None and pod.status.phase in ("Failed", "Succeeded")):
                raise RuntimeError(f"pod {name} ended before its {container} container was used")
            time.sleep(POLL)
        raise RuntimeError(f"container {container} of pod {name} was not running after {START_TIMEOUT:.0f}s")

    def _in_pod(self, pod: _Pod, host_path: str) -> str:
        for v in pod.vols:
            if host_path.startswith(v.source.rstrip("/") + "/"):
                return f"{mf.transfer_path(v)}/{host_path[len(v.source.rstrip('/')) + 1 :]}"
        raise RuntimeError(f"the go-ahead {host_path} is in none of the {pod.workload.role}'s mounts")

    def release(self, role: Role, note: str = "") -> None:
        check_note(note)
        deferred = self._deferred.pop(role, None)
        if deferred is not None:
            self._start(deferred, hold=False, note=note)
            return
        pod = self._pods.get(role)
        if pod is None or not pod.held:
            raise RuntimeError(f"{role} was not started to wait for a go-ahead, or has had it")
        self._go(pod, note)

    def _mirror(self, pod: _Pod) -> None:
        """Keep the workload's live inputs (the heartbeat the sidecar watches) in step with this machine's."""
        live = [v for v in pod.vols if v.live]
        name = self.names.pod(pod.workload.role)

        def signature() -> list[tuple[str, float, int]]:
            sig = []
            for v in live:
                for p in sorted(Path(v.source).rglob("*")) if Path(v.source).is_dir() else [Path(v.source)]:
                    with contextlib.suppress(OSError):
                        st = p.stat()
                        sig.append((str(p), st.st_mtime, st.st_size))
            return sig

        last = signature()
        while not pod.mirror_stop.wait(MIRROR_INTERVAL):
            now = signature()
            if now == last:
                continue
            try:
                self._upload(name, mf.CARRIER, live)
                last = now
            except Exception as exc:  # the pod ended, or the API server hiccupped: the next change tries again
                log.info("mirror_failed pod=%s error=%r", name, exc)
                if not _main_status(self.cluster.read_pod(name)).running:
                    return

    # --- following and ending ------------------------------------------------------------------------------------

    def output(self, role: Role, stderr: bool = False) -> Iterator[bytes]:
        if stderr:
            return iter(())  # the kubelet keeps one stream: everything is on stdout
        return self._follow(role)

    def _follow(self, role: Role) -> Iterator[bytes]:
        name = self.names.pod(role)
        while True:  # until `main` has started (its stage may still be running)
            info = self.status(role)
            pod = self.cluster.read_pod(name)
            started = pod is not None and any(
                cs.name == mf.MAIN and cs.state is not None and (cs.state.running or cs.state.terminated)
                for cs in (pod.status.container_statuses or [] if pod.status else [])
            )
            if started:
                break
            if not info.running:
                return
            time.sleep(POLL)
        yield from self.cluster.logs(name, mf.MAIN)

    def stats(self, role: Role) -> Iterator[dict[str, int]]:
        peak = 0
        cpu_ns = 0.0
        last = time.monotonic()
        while self.status(role).running:
            sample = self.cluster.metrics(self.names.pod(role))
            now = time.monotonic()
            if sample is None:
                return  # no metrics server: no figures (the audit trail says none were taken)
            for c in sample.get("containers", []):
                if c.get("name") != mf.MAIN:
                    continue
                usage = c.get("usage", {})
                memory = int(_quantity(usage.get("memory", "0")))
                peak = max(peak, memory)
                # metrics.k8s.io gives a rate: the CPU time is its sum over the samples.
                cpu_ns += _quantity(usage.get("cpu", "0")) * 1e9 * (now - last)
                yield {"memory": memory, "peak_memory": peak, "cpu_ns": int(cpu_ns), "pids": 0}
            last = now
            time.sleep(POLL * 4)

    def status(self, role: Role) -> ExitInfo:
        pod = self._pods.get(role)
        if pod is not None and pod.final is not None:
            return pod.final
        return _main_status(self.cluster.read_pod(self.names.pod(role)))

    def wait(self, role: Role, timeout: float) -> ExitInfo:
        deadline = time.monotonic() + timeout
        info = self.status(role)
        while info.running and time.monotonic() < deadline:
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
            info = self.status(role)
        if not info.running:
            self._fetch(role)
        return info

    def _fetch(self, role: Role) -> None:
        """Bring the workload's outputs home (once), then let its carrier end."""
        pod = self._pods.get(role)
        if pod is None:
            self._fetch_left(role)
            return
        with pod.lock:
            if pod.fetched:
                return
            pod.mirror_stop.set()
            pod.close_relays()
            name = self.names.pod(role)
            out = [v for v in pod.vols if v.download]
            carrier = any(v.download or v.live for v in pod.vols)
            if out:
                with transfer.spooled() as buf:
                    rc, err = self.cluster.exec(name, mf.CARRIER, transfer.download_command(out), stdout=buf)
                    if rc != 0:
                        log.warning("outputs_not_fetched pod=%s error=%s", name, err.strip()[-300:])
                    else:
                        buf.seek(0)
                        try:
                            transfer.unpack_outputs(buf, out, self.config.max_transfer_bytes)
                        except transfer.TooLarge as exc:
                            log.warning("outputs_refused pod=%s error=%s", name, exc)
            if carrier:
                with contextlib.suppress(Exception):
                    self.cluster.exec(name, mf.CARRIER, transfer.touch_command(transfer.fetched_marker()))
            pod.fetched = True

    def _fetch_left(self, role: str) -> None:
        """A pod another process made (recovery): its outputs (the sidecar's transcript and its own copy of its
        lines), where its annotation says, fetched once before the pod goes. The annotation is the cluster's
        word: only a directory of this run's own (`<run id>/<name>`, under the key its path hashes to) is
        written, as untrusted content. Never fatal: the pod's log is what is left."""
        if role != "sidecar":
            return  # the others' outputs (a dead finaliser's out/) would be stale: the recovery makes its own
        name = self.names.pod("sidecar")
        if name in self._left_fetched:
            return
        self._left_fetched.add(name)
        try:
            pod = self.cluster.read_pod(name)
            out = _left_outputs(pod, self.run_id)
            if not out:
                return
            with transfer.spooled() as buf:
                rc, err = self.cluster.exec(name, mf.CARRIER, transfer.download_command(out), stdout=buf)
                if rc != 0:
                    raise RuntimeError(err.strip()[-300:])
                buf.seek(0)
                written = transfer.unpack_outputs(buf, out, self.config.max_transfer_bytes)
            log.info("left_outputs_fetched pod=%s files=%d", name, len(written))
            self.cluster.exec(name, mf.CARRIER, transfer.touch_command(transfer.fetched_marker()))
        except Exception as exc:
            log.info("left_outputs_not_fetched pod=%s error=%r", name, exc)

    def stop(self, role: Role, grace: float) -> None:
        name = self.names.pod(role)
        if not self.status(role).running:
            if role not in self._pods:
                self._fetch_left(role)  # ended on its own, its carrier still holding its outputs
            return
        # SIGTERM to the workload's PID 1 (its own init, or its program), as Docker's stop does...
        with contextlib.suppress(Exception):
            self.cluster.exec(name, mf.MAIN, ["kill", "-TERM", "1"])
        info = self.wait(role, grace)
        if info.running:
            # ...then SIGKILL, which only the kubelet can send from outside: the pod goes, its outputs first.
            self._fetch(role)
            pod = self._pods.get(role)
            if pod is not None:
                pod.final = ExitInfo(exit_code=137)
            self.cluster.delete("pod", name, grace=0)

    def ask(self, role: Role, socket: str, line: bytes, timeout: float) -> bytes | None:
        """Through `exec` in the workload's `main` container (ASK_SCRIPT): the socket is in the pod."""
        name = self.names.pod(role)
        if not self.status(role).running:
            return None
        command = ["python3", "-I", "-c", ASK_SCRIPT, socket, line.hex(), f"{timeout:g}", str(ASK_LIMIT)]
        try:
            with transfer.spooled() as out:
                rc, err = self.cluster.exec(name, mf.MAIN, command, stdout=out)
                out.seek(0)
                answer = out.read(ASK_LIMIT)
        except Exception as exc:  # the pod went, the API server did not answer: no answer either
            log.info("ask_failed pod=%s socket=%s error=%r", name, socket, exc)
            return None
        if rc != 0:
            log.info("ask_unanswered pod=%s socket=%s rc=%d error=%s", name, socket, rc, err.strip()[-200:])
            return None
        return answer

    def discard(self, *roles: Role, network: bool = False) -> None:
        def remove() -> None:
            try:
                for role in roles:
                    self._fetch(role)
                    pod = self._pods.get(role)
                    if pod is not None and pod.final is None:
                        pod.final = self.status(role)
                    self.cluster.delete("pod", self.names.pod(role), grace=0)
                if network and "sidecar" in roles:
                    self.cluster.delete("service", self.names.service)
            except Exception as exc:  # teardown removes it (or gc does): nothing depends on this
                log.info("discard_deferred run_id=%s roles=%s error=%r", self.run_id, ",".join(roles), exc)

        thread = threading.Thread(target=remove, name="discard", daemon=True)
        thread.start()
        self._discards.append(thread)

    def remove_workloads(self) -> list[str]:
        """The run's pods go, and with them the sidecar's Service, Secret and policy; its anchor, claim (the agent's
        work) and isolation stay, and this handle takes them over (`_adopt`): a finaliser started next runs on the
        claim, under the anchor, denied every network like any pod of the run."""
        for thread in self._discards:
            thread.join(DISCARD_JOIN)
        for pod in self._pods.values():
            pod.mirror_stop.set()
            pod.close_relays()
        removed: list[str] = []
        selector = self._selector()
        for obj in self.cluster.select("pod", selector):
            role = (obj.metadata.labels or {}).get(ROLE_LABEL)
            if role and role not in self._pods:
                self._fetch_left(role)
            if self.cluster.delete("pod", obj.metadata.name, grace=0):
                removed.append(f"pod:{obj.metadata.name}")
        # A ReadWriteOnce claim is attached where its last pod ran: the next pod may need it elsewhere.
        self._await_gone(selector)
        self._pods.clear()
        for kind in ("service", "secret"):
            for obj in self.cluster.select(kind, selector):
                if self.cluster.delete(kind, obj.metadata.name):
                    removed.append(f"{kind}:{obj.metadata.name}")
        sidecar_policy = self.names.policy("sidecar")
        if self.cluster.delete("networkpolicy", sidecar_policy):
            removed.append(f"networkpolicy:{sidecar_policy}")
        self.sidecar_ip = None
        self._adopt(selector)
        if removed:
            log.info("workloads_removed run_id=%s removed=%s", self.run_id, ",".join(removed))
        return removed

    def _adopt(self, selector: str) -> None:
        """Take the run over: its anchor (made if it is gone, as `prepare` would: the supervisor died before it),
        its isolation (what of it is missing, before any pod), and its claim, whose content `_resume_claim` keeps."""
        if self.plan is None:
            return  # an attached handle starts nothing: there is nothing to take over for
        anchors = [a for a in self.cluster.select("configmap", selector) if a.metadata.name == self.names.anchor]
        if anchors:
            self.anchor_uid = str(anchors[0].metadata.uid)
        else:
            made = self.cluster.create(mf.anchor(self.names, self.namespace, self.labels, self.plan.owner))
            self.anchor_uid = str(made.metadata.uid)
        present = {np.metadata.name for np in self.cluster.select("networkpolicy", selector)}
        for np in mf.isolation_policies(self.names, self.namespace, self.labels, self.anchor_uid):
            if np["metadata"]["name"] not in present:
                self.cluster.create(np)
        self._claimed = any(
            c.metadata.name == self.names.claim for c in self.cluster.select("persistentvolumeclaim", selector)
        )
        self._uploaded.clear()  # what the claim holds is looked at when the next pod is staged
        self._adopted = True
        log.info("run_adopted run_id=%s anchor=%s claim=%s", self.run_id, self.anchor_uid, self._claimed)

    def keep_work(self, dest: Path) -> None:
        """The working tree the agent's workloads used on the run's volume (uploaded from dest), fetched as a tar
        through a pod of its own (`keeper`: the run's last claim workload's pod, with the working tree alone,
        denied every network, whose `main` never runs) and unpacked as untrusted in place of dest's content."""
        for thread in self._discards:
            thread.join(DISCARD_JOIN)
        key = mf.volume_key(str(dest))
        users = [p.workload for p in self._pods.values() if any(v.on_claim and v.key == key for v in p.vols)]
        if not users:
            if self._adopted and self._claimed:
                raise RuntimeError("the run's volume may hold the agent's work, but no workload here mounted it")
            return  # nothing of the agent's went onto a volume: dest is as it was
        assert self.anchor_uid is not None
        mount = next(m for m in users[-1].mounts if m.source == str(dest))
        # A copy of a workload of the run's (its image, user and limits), not a role of the run: it only stages.
        keeper = users[-1].model_copy(
            update={
                "role": KEEPER,
                "mounts": [mount.model_copy(update={"read_only": True})],
                "env": {},
                "secret_env": {},
                "scratch": [],
                "go_ahead": None,
                "reach": Reach.NOTHING,
                "hosts": {},
            }
        )
        vols = mf.volumes(keeper, {key})
        name = self.names.pod(keeper.role)
        self.cluster.create(
            mf.pod(self.names, self.namespace, self.labels, self.anchor_uid, keeper, vols, self.config, None)
        )
        try:
            self._await_stage(name)
            with transfer.spooled() as buf:
                rc, err = self.cluster.exec(name, mf.STAGE, transfer.download_command(vols), stdout=buf)
                if rc != 0:
                    raise RuntimeError(f"could not read the working tree from pod {name}: {err.strip()[-300:]}")
                buf.seek(0)
                written = transfer.replace_tree(buf, vols[0], dest, self.config.max_transfer_bytes)
            log.info("work_kept run_id=%s dest=%s files=%d", self.run_id, dest, len(written))
        finally:
            with contextlib.suppress(Exception):
                self.cluster.delete("pod", name, grace=0)

    def teardown(self) -> list[str]:
        for thread in self._discards:
            thread.join(DISCARD_JOIN)
        for pod in self._pods.values():
            pod.mirror_stop.set()
            pod.close_relays()
        removed: list[str] = []
        selector = self._selector()
        for kind in KINDS:
            objects = self.cluster.select(kind, selector)
            for obj in objects:
                if self.cluster.delete(kind, obj.metadata.name, grace=0 if kind == "pod" else None):
                    removed.append(f"{kind}:{obj.metadata.name}")
            if kind == "pod":
                self._await_gone(selector)
        if removed:
            log.info("teardown run_id=%s removed=%s", self.run_id, ",".join(removed))
        return removed

    def _await_gone(self, selector: str, timeout: float = 30.0) -> None:
        """Until the run's pods are gone: their network policies are removed only after them."""
        deadline = time.monotonic() + timeout
        while self.cluster.select("pod", selector) and time.monotonic() < deadline:
            time.sleep(POLL)


def _left_outputs(pod: Any, run_id: str) -> list[mf.Volume]:
    """The outputs a pod's annotation names (mf.OUTPUTS_ANNOTATION), each only if it is a directory of this run
    on this machine (`.../<run id>/<name>`, no symbolic link on the way) under the key its path hashes to."""
    meta = getattr(pod, "metadata", None)
    raw = (getattr(meta, "annotations", None) or {}).get(mf.OUTPUTS_ANNOTATION)
    try:
        entries = json.loads(raw) if raw else []
    except ValueError:
        return []
    out = []
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict):
            continue
        source, key = str(e.get("source", "")), str(e.get("key", ""))
        path = Path(source)
        if not (path.is_absolute() and path.parent.name == run_id and mf.volume_key(source) == key):
            continue
        if ".." in path.parts or not path.is_dir() or path.resolve() != path:
            continue
        out.append(
            mf.Volume(
                key=key,
                source=source,
                target="",
                read_only=False,
                file=False,
                on_claim=bool(e.get("on_claim")),
                upload=False,
                download=True,
                live=False,
            )
        )
    return out


def _sockets(w: Workload, vols: list[mf.Volume]) -> list[tuple[mf.Volume, str]]:
    """The Unix sockets of this machine's in the workload's read-only mounted directories (a sweep's budget
    broker), which a relay makes reachable in its pod. Only the sidecar's (a pod of its own, whose volumes no
    other pod mounts) are: one on the run's volume would be within reach of the agent's workloads. A writable
    mount's are the workload's own (the sidecar's control socket, in its pod): nothing to relay."""
    found = []
    for v in vols:
        source = Path(v.source)
        if v.file or not v.read_only or not source.is_dir():
            continue
        for entry in sorted(source.iterdir()):
            if not entry.is_socket():
                continue
            if v.on_claim or w.reach is not Reach.OUTSIDE:
                raise RuntimeError(
                    f"{v.target} of the {w.role} holds a Unix socket ({entry.name}): only the sidecar's pod may "
                    "be given one (a relay in its own pod, which no workload of the agent's reaches)"
                )
            found.append((v, entry.name))
    return found


def sidecar_egress(w: Workload) -> Egress:
    """The egress rules the sidecar enforces (its SidecarConfig): the NetworkPolicy under it opens no more."""
    raw = w.env.get(CONFIG_ENV)
    return SidecarConfig.model_validate_json(raw).egress if raw else Egress()
