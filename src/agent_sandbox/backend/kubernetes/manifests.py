"""A run's Kubernetes objects as plain manifests: pure functions of the run's plan, a workload and the backend's
configuration, so that every object is unit-tested and checked against the cluster's OpenAPI schemas without a
cluster (tests/test_kubernetes_manifests.py). The client sends these dicts as they are.

A run is:
- an anchor (a ConfigMap `sbx-<run id>`), which owns every other object of the run: deleting it deletes the run;
- three NetworkPolicies, made before any pod: every pod of the run denied everything, then the agent's
  workloads allowed the sidecar's two ports alone, and the sidecar allowed the cluster's DNS and the public
  internet (minus private, link-local and metadata ranges, unless the policy's `allow_addresses` or
  `allow_private` open some);
- the run's volume (a PersistentVolumeClaim): the working tree, the host repository's objects and the run's
  inputs, shared by the agent, the check and the finaliser one after another, as the bind mounts are with Docker;
- the sidecar's pod, its Service (the one name, `sidecar`, the agent reaches) and its Secret (the model key,
  given to that pod alone);
- one pod per workload of the agent's image (agent, check, finaliser).

Each pod has, besides the workload (container `main`): an init container `stage` that receives the workload's
inputs from the supervisor (a tar stream through the API server: no host path reaches a node) and, for a
workload confined to the sidecar, is where the confinement is checked before the go-ahead is written; and a
container `carrier` that holds the workload's outputs until the supervisor has fetched them, and keeps its
live inputs (the heartbeat) in step.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from agent_sandbox.backend.base import ROLE_LABEL, RUN_LABEL, STATE_LABEL, SUPERVISOR_LABEL
from agent_sandbox.backend.plan import SIDECAR_NAME, Owner, Reach, Role, Workload
from agent_sandbox.config.backends import KubernetesConfig
from agent_sandbox.sidecar.config import GATEWAY_PORT, PROXY_PORT
from agent_sandbox.sidecar.egress import METADATA, Egress, parse_address_entry

Manifest = dict[str, Any]

KUBERNETES_VERSION = "1.31"
"""The oldest Kubernetes release the manifests are written for; the tests validate them against its schemas."""
REACH_LABEL = "sandbox.reach"
OUTPUTS_ANNOTATION = "sandbox.outputs"
"""On a pod: its outputs (key, host path, on the claim), so that a process that did not make it (recovery) can
fetch them (the sidecar's records) before the pod goes."""
MANAGED_BY = ("app.kubernetes.io/managed-by", "agent-sandbox")
MAIN, STAGE, CARRIER = "main", "stage", "carrier"
TRANSFER = "/sandbox-transfer"
"""Where the stage and carrier containers see the pod's volumes (each at TRANSFER/<key>)."""
STAGED = "staged"
"""The file in TRANSFER whose appearance ends the stage container: the inputs are in (and the go-ahead, if any)."""
FETCHED = "fetched"
"""The file in TRANSFER whose appearance ends the carrier container: the outputs are home."""
CONTROL_VOLUME = "transfer"
CLAIM_VOLUME = "run"
SECRET_VOLUME = "secret-env"
SECRETS_PATH = "/sandbox/secrets"
"""Where a workload's secret environment is mounted (its `main` alone, read-only): a file per variable, named
after it; the variable itself is not set, `<NAME>_FILE` names its file instead (SECRET_FILE_SUFFIX)."""
SECRET_FILE_SUFFIX = "_FILE"
SECRET_MODE = 0o440
"""The Secret's files: owned by root and the pod's fsGroup (the workload's own group, which the kubelet gives a
secret volume and its read bits whatever defaultMode says), readable by nobody else."""
NO_RESOLVER = "127.0.0.1"
"""The nameserver of the pods that resolve nothing: nothing listens there, so a lookup fails at once."""
DEFAULT_DEADLINE = 24 * 3600
"""activeDeadlineSeconds of a pod whose workload declares no deadline of its own (the sidecar)."""
DEADLINE_ENV = "SANDBOX_DEADLINE_SECONDS"
"""The deadline a workload of the agent's image keeps itself (sandbox/entrypoint.sh); its pod's is a minute more."""
HELPER_RESOURCES = {"limits": {"cpu": "200m", "memory": "128Mi"}, "requests": {"cpu": "10m", "memory": "16Mi"}}
"""What the stage and carrier containers may use: tar and a shell loop."""
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"
"""The anchor's uid in manifests rendered without a cluster (--render), where the API server has given none."""
PLACEHOLDER_IP = "192.0.2.1"
"""The Service's cluster IP in manifests rendered without a cluster (a documentation address, never routed)."""

# Everything the sidecar may not reach unless the policy opens it: what sidecar/egress.py calls non-public
# (private, shared, loopback, link-local with the metadata services, documentation, benchmarking, multicast and
# reserved ranges; IPv6's unique-local, link-local, mapped and NAT64 ranges, which reach IPv4 space).
PRIVATE_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
PRIVATE_V6 = (
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:db8::/32",
    "2002::/16",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)
NEVER_PRIVATE = ("0.0.0.0/8", "127.0.0.0/8", "::/128", "::1/128")
"""Ranges allow_private does not open (unspecified and loopback: the proxy refuses them whatever it says)."""


def _label_value(value: str) -> str:
    """A label value Kubernetes accepts (63 characters of [A-Za-z0-9._-], alphanumeric at both ends)."""
    value = re.sub(r"[^A-Za-z0-9._-]", "_", value)[:63]
    return value.strip("._-") or "none"


@dataclass(frozen=True)
class Names:
    """The names of one run's objects: derived from the run id alone, so a handle attached later (recovery)
    finds them without any state of the process that made them."""

    run_id: str

    @property
    def prefix(self) -> str:
        return f"sbx-{self.run_id}".lower()

    @property
    def anchor(self) -> str:
        return self.prefix

    @property
    def claim(self) -> str:
        return f"{self.prefix}-run"

    @property
    def service(self) -> str:
        return f"{self.prefix}-{SIDECAR_NAME}"

    def pod(self, role: Role) -> str:
        return f"{self.prefix}-{role}"

    def secret(self, role: Role) -> str:
        return f"{self.prefix}-{role}-env"

    def policy(self, what: str) -> str:
        return f"{self.prefix}-{what}"


def run_labels(run_id: str, owner: Owner | None) -> dict[str, str]:
    """The labels every object of the run carries."""
    labels = {RUN_LABEL: _label_value(run_id), MANAGED_BY[0]: MANAGED_BY[1]}
    if owner is not None:
        labels[SUPERVISOR_LABEL] = _label_value(owner.supervisor)
        labels[STATE_LABEL] = _label_value(owner.state)
    return labels


def _meta(name: str, namespace: str, labels: dict[str, str], anchor_uid: str | None, names: Names) -> Manifest:
    meta: Manifest = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if anchor_uid is not None:
        # Owned by the anchor: the garbage collector deletes the object with it.
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": names.anchor, "uid": anchor_uid}]
    return meta


def anchor(names: Names, namespace: str, labels: dict[str, str], owner: Owner) -> Manifest:
    """The run's anchor: every other object of the run names it as its owner."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(names.anchor, namespace, labels, None, names),
        "immutable": True,
        "data": {"run-id": names.run_id, "supervisor": owner.supervisor, "state": owner.state},
    }


def claim(
    names: Names, namespace: str, labels: dict[str, str], anchor_uid: str, size: str, storage_class: str | None
) -> Manifest:
    """The run's volume: working tree, objects and inputs of the agent's workloads."""
    spec: Manifest = {
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": size}},
    }
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(names.claim, namespace, labels, anchor_uid, names),
        "spec": spec,
    }


def secret(
    names: Names, namespace: str, labels: dict[str, str], anchor_uid: str, role: Role, values: dict[str, str]
) -> Manifest:
    """A workload's secret environment (the sidecar's model key): mounted into that pod alone, as files."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(names.secret(role), namespace, {**labels, ROLE_LABEL: role}, anchor_uid, names),
        "type": "Opaque",
        "immutable": True,
        "stringData": dict(values),
    }


def service(names: Names, namespace: str, labels: dict[str, str], anchor_uid: str) -> Manifest:
    """The sidecar's stable address: the agent's pods reach the gateway and the proxy at its cluster IP, pinned
    as `sidecar` in their /etc/hosts (they resolve no names)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.service, namespace, {**labels, ROLE_LABEL: "sidecar"}, anchor_uid, names),
        "spec": {
            "type": "ClusterIP",
            "selector": {RUN_LABEL: labels[RUN_LABEL], ROLE_LABEL: "sidecar"},
            "ports": [
                {"name": "gateway", "port": GATEWAY_PORT, "targetPort": GATEWAY_PORT, "protocol": "TCP"},
                {"name": "proxy", "port": PROXY_PORT, "targetPort": PROXY_PORT, "protocol": "TCP"},
            ],
        },
    }


# --- network policies ------------------------------------------------------------------------------------


def _ip_block(cidr: str, exceptions: Iterable[str] = ()) -> Manifest:
    block: Manifest = {"cidr": cidr}
    if excepted := sorted(set(exceptions)):
        block["except"] = excepted
    return {"ipBlock": block}


def _inside(outer: str, inner: Iterable[str]) -> list[str]:
    """The ranges of `inner` that lie strictly inside `outer` (an ipBlock's `except` must)."""
    net = ipaddress.ip_network(outer)
    found = []
    for text in inner:
        sub = ipaddress.ip_network(text)
        if sub.version == net.version and sub != net and sub.subnet_of(net):  # type: ignore[arg-type]  # same version checked
            found.append(str(sub))
    return found


def _metadata_hosts() -> list[str]:
    return [f"{a}/{a.max_prefixlen}" for a in sorted(METADATA, key=lambda a: (a.version, int(a)))]


def public_egress(egress: Egress) -> list[Manifest]:
    """The `to` peers of the sidecar's egress beyond the cluster's DNS: the public internet, and what the policy's
    `allow_private` and `allow_addresses` open. The cloud metadata addresses stay closed unless an
    allow_addresses entry names exactly that address, as in the proxy (sidecar/egress.py check_address)."""
    metadata = _metadata_hosts()
    peers = [_ip_block("0.0.0.0/0", PRIVATE_V4), _ip_block("::/0", PRIVATE_V6)]
    opened: list[tuple[str, bool]] = []  # (range, names a metadata address exactly)
    if egress.allow_private:
        opened += [(r, False) for r in (*PRIVATE_V4, *PRIVATE_V6) if r not in NEVER_PRIVATE]
    for text in egress.allow_addresses:
        entry = parse_address_entry(text)
        if entry.network.is_loopback:
            continue  # loopback in the sidecar is the sidecar itself: no network policy is involved
        opened.append((str(entry.network), entry.single))
    for cidr, exact in opened:
        exceptions = [] if exact else _inside(cidr, metadata)
        peers.append(_ip_block(cidr, exceptions))
    return peers


def _policy_object(
    names: Names, namespace: str, labels: dict[str, str], anchor_uid: str, what: str, spec: Manifest
) -> Manifest:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(names.policy(what), namespace, labels, anchor_uid, names),
        "spec": spec,
    }


_PORTS = [{"protocol": "TCP", "port": GATEWAY_PORT}, {"protocol": "TCP", "port": PROXY_PORT}]


def _selectors(labels: dict[str, str]) -> tuple[Manifest, Manifest]:
    run = labels[RUN_LABEL]
    sidecar = {"matchLabels": {RUN_LABEL: run, ROLE_LABEL: "sidecar"}}
    confined = {"matchLabels": {RUN_LABEL: run, REACH_LABEL: Reach.SIDECAR.value}}
    return sidecar, confined


def isolation_policies(names: Names, namespace: str, labels: dict[str, str], anchor_uid: str) -> list[Manifest]:
    """The run's first NetworkPolicies, made before any pod. Policies only ever add what a pod may do, so the first
    denies every pod of the run everything (the finaliser keeps exactly that: no network); the second allows the
    workloads confined to the sidecar (`sandbox.reach=sidecar`: the agent, the check) its two ports, and nothing
    else: no DNS, no other pod, no node, no address outside."""
    sidecar, confined = _selectors(labels)
    return [
        _policy_object(
            names,
            namespace,
            labels,
            anchor_uid,
            "deny-all",
            {
                "podSelector": {"matchLabels": {RUN_LABEL: labels[RUN_LABEL]}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [],
                "egress": [],
            },
        ),
        _policy_object(
            names,
            namespace,
            labels,
            anchor_uid,
            "to-sidecar",
            {
                "podSelector": confined,
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": sidecar}], "ports": _PORTS}],
            },
        ),
    ]


def sidecar_policy(
    names: Names, namespace: str, labels: dict[str, str], anchor_uid: str, egress: Egress, config: KubernetesConfig
) -> Manifest:
    """The sidecar's NetworkPolicy, made with its pod: its clients (the run's confined workloads) on its two
    ports in; the cluster's DNS (for the proxy's lookups) and the public internet out (public_egress)."""
    sidecar, confined = _selectors(labels)
    dns = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": config.dns.namespace}},
                "podSelector": {"matchLabels": dict(config.dns.labels)},
            }
        ],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }
    return _policy_object(
        names,
        namespace,
        labels,
        anchor_uid,
        "sidecar",
        {
            "podSelector": sidecar,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": confined}], "ports": _PORTS}],
            "egress": [dns, {"to": public_egress(egress)}],
        },
    )


# --- pods ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Volume:
    """One mount of a workload as its pod has it."""

    key: str
    """Its name: the pod volume's name (an emptyDir), or its directory on the run's claim; and TRANSFER/<key> in
    the stage and carrier containers."""
    source: str
    """The path on the supervisor's machine."""
    target: str
    """Where the workload sees it."""
    read_only: bool
    """The workload may not write it."""
    file: bool
    """A single file, mounted from its volume by subPath."""
    on_claim: bool
    """It lives on the run's claim (the agent's workloads, which share it one after another) rather than in an
    emptyDir of this pod (the sidecar, which may run on another node than the claim)."""
    upload: bool
    """Its content goes in from the supervisor before the workload runs."""
    download: bool
    """Its content comes back to the supervisor when the workload ends (a writable mount that is not the
    workload's working directory: the bundle, the check's result, the sidecar's records)."""
    live: bool
    """Kept in step with the supervisor's copy while the workload runs (a read-only emptyDir input: the
    heartbeat)."""

    @property
    def subpath(self) -> str | None:
        """What of its volume the workload mounts."""
        base = self.key if self.on_claim else None
        if self.file:
            name = PurePosixPath(self.source).name
            return f"{base}/{name}" if base else name
        return base


def transfer_path(v: Volume) -> str:
    """Where the stage and carrier containers see the volume's content."""
    return f"{TRANSFER}/{CLAIM_VOLUME}/{v.key}" if v.on_claim else f"{TRANSFER}/{v.key}"


def volume_key(source: str) -> str:
    """A stable name for a host path: its last part (for whoever reads the manifests) and a hash of all of it."""
    stem = re.sub(r"[^a-z0-9-]", "-", PurePosixPath(source).name.lower()).strip("-")[:40] or "v"
    return f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


def volumes(w: Workload, uploaded: Iterable[str] = (), is_file: Any = None) -> list[Volume]:
    """The workload's mounts as pod volumes. `uploaded`: the claim keys an earlier workload of the run put there
    already (the working tree carries over, as a bind mount does); `is_file(source)` tells a file from a
    directory (the supervisor's machine knows)."""
    done = set(uploaded)
    found = []
    for m in w.mounts:
        key = volume_key(m.source)
        on_claim = w.reach is not Reach.OUTSIDE
        file = bool(is_file(m.source)) if is_file is not None else False
        found.append(
            Volume(
                key=key,
                source=m.source,
                target=m.target,
                read_only=m.read_only,
                file=file,
                on_claim=on_claim,
                upload=not (on_claim and key in done),
                download=not m.read_only and m.target != w.working_dir,
                live=not on_claim and m.read_only,
            )
        )
    return found


def _user(w: Workload) -> tuple[int, int]:
    uid, _, gid = w.user.partition(":")
    ids = int(uid), int(gid or uid)
    if ids[0] == 0:
        raise ValueError(f"the {w.role} would run as root ({w.user}): Kubernetes runs no workload as root")
    return ids


def _quantity_cpu(cpus: float) -> str:
    return f"{round(cpus * 1000)}m"


def _security_context(read_only_root: bool = True) -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _host_aliases(w: Workload, sidecar_ip: str | None) -> list[Manifest]:
    by_ip: dict[str, list[str]] = {}
    for name, address in w.hosts.items():
        try:
            ip = str(ipaddress.ip_address(address))
        except ValueError:
            raise ValueError(
                f"egress.hosts maps {name} to {address!r}: on Kubernetes an entry must be an IP address "
                "(`host-gateway`, the Docker host, has no meaning in a cluster)"
            ) from None
        by_ip.setdefault(ip, []).append(name)
    if sidecar_ip is not None:
        by_ip.setdefault(sidecar_ip, []).append(SIDECAR_NAME)
    return [{"ip": ip, "hostnames": sorted(hosts)} for ip, hosts in sorted(by_ip.items())]


def _dns(w: Workload) -> tuple[str, Manifest]:
    options = []
    for opt in w.dns_options:
        name, sep, value = opt.partition(":")
        options.append({"name": name, "value": value} if sep else {"name": name})
    if w.reach is Reach.OUTSIDE:
        return "ClusterFirst", {"options": options} if options else {}
    # No resolver: the agent's workloads know the sidecar by /etc/hosts and resolve nothing else.
    config: Manifest = {"nameservers": [NO_RESOLVER], "searches": []}
    if options:
        config["options"] = options
    return "None", config


def deadline(w: Workload) -> int:
    """The pod's activeDeadlineSeconds: the workload's own deadline and a minute, else DEFAULT_DEADLINE."""
    try:
        return int(float(w.env[DEADLINE_ENV])) + 60
    except (KeyError, ValueError):
        return DEFAULT_DEADLINE


def _wait_for(marker: str) -> list[str]:
    # A shell loop, not a sleep for good: the file's appearance (written through `exec`) ends the container.
    return ["sh", "-c", f'until [ -e "{TRANSFER}/{marker}" ]; do sleep 0.2; done']


def pod(
    names: Names,
    namespace: str,
    labels: dict[str, str],
    anchor_uid: str,
    w: Workload,
    vols: Sequence[Volume],
    config: KubernetesConfig,
    sidecar_ip: str | None = None,
) -> Manifest:
    """The workload as a pod: `main` runs it, `stage` (init) receives its inputs, `carrier` holds its outputs."""
    uid, gid = _user(w)
    env: list[Manifest] = [{"name": k, "value": v} for k, v in w.env.items()]
    # The secrets as files, not variables: a variable is in /proc/<pid>/environ of every process the workload
    # starts, and in whatever dumps its environment; the file is in one read-only mount of `main` alone.
    env += [{"name": k + SECRET_FILE_SUFFIX, "value": f"{SECRETS_PATH}/{k}"} for k in sorted(w.secret_env)]
    r = w.resources
    limits: dict[str, str] = {}
    if r.memory_bytes:
        limits["memory"] = str(r.memory_bytes)
    if r.cpus:
        limits["cpu"] = _quantity_cpu(r.cpus)
    pod_volumes: list[Manifest] = [{"name": CONTROL_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}]
    if any(v.on_claim for v in vols):
        pod_volumes.append({"name": CLAIM_VOLUME, "persistentVolumeClaim": {"claimName": names.claim}})
    main_mounts: list[Manifest] = []
    for v in vols:
        if not v.on_claim:
            pod_volumes.append({"name": v.key, "emptyDir": {}})
        mount: Manifest = {
            "name": CLAIM_VOLUME if v.on_claim else v.key,
            "mountPath": v.target,
            "readOnly": v.read_only,
        }
        if v.subpath:
            mount["subPath"] = v.subpath
        main_mounts.append(mount)
    if w.secret_env:
        pod_volumes.append(
            {
                "name": SECRET_VOLUME,
                "secret": {
                    "secretName": names.secret(w.role),
                    "items": [{"key": k, "path": k} for k in sorted(w.secret_env)],
                    "defaultMode": SECRET_MODE,
                },
            }
        )
        main_mounts.append({"name": SECRET_VOLUME, "mountPath": SECRETS_PATH, "readOnly": True})
    for i, s in enumerate(w.scratch):
        # Memory-backed and size-limited, like Docker's tmpfs (and counted against the pod's memory the same way).
        name = f"scratch-{i}"
        pod_volumes.append({"name": name, "emptyDir": {"medium": "Memory", "sizeLimit": str(s.size_bytes)}})
        main_mounts.append({"name": name, "mountPath": s.path})

    def transfer_mounts(selected: list[Volume]) -> list[Manifest]:
        # The claim's root, not its subPaths: the kubelet would make a missing subPath directory as root, which
        # the workload's user could not write; the stage container makes them as that user instead.
        out: list[Manifest] = [{"name": CONTROL_VOLUME, "mountPath": TRANSFER}]
        if any(v.on_claim for v in selected):
            out.append({"name": CLAIM_VOLUME, "mountPath": f"{TRANSFER}/{CLAIM_VOLUME}"})
        out += [{"name": v.key, "mountPath": transfer_path(v)} for v in selected if not v.on_claim]
        return out

    def helper(name: str, marker: str, selected: list[Volume]) -> Manifest:
        return {
            "name": name,
            "image": w.image,
            "command": _wait_for(marker),
            "securityContext": _security_context(),
            "resources": HELPER_RESOURCES,
            "volumeMounts": transfer_mounts(selected),
        }

    main: Manifest = {
        "name": MAIN,
        "image": w.image,
        "env": env,
        "securityContext": _security_context(),
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": main_mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if w.entrypoint is not None:
        main["command"] = list(w.entrypoint)
    if w.command:
        main["args"] = list(w.command)
    if w.working_dir:
        main["workingDir"] = w.working_dir
    if w.role == "sidecar":
        main["ports"] = [
            {"name": "gateway", "containerPort": GATEWAY_PORT, "protocol": "TCP"},
            {"name": "proxy", "containerPort": PROXY_PORT, "protocol": "TCP"},
        ]
    # Claim directories are made (once, by the first pod that mounts them) by the stage container, so every pod
    # that uses the claim has one, inputs or not.
    staged = [v for v in vols if v.upload or v.on_claim]
    containers = [main]
    carried = [v for v in vols if v.download or v.live]
    if carried:
        containers.append(helper(CARRIER, FETCHED, carried))
    dns_policy, dns_config = _dns(w)
    spec: Manifest = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": deadline(w),
        "terminationGracePeriodSeconds": 5,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "fsGroup": gid,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [helper(STAGE, STAGED, staged)],
        "containers": containers,
        "volumes": pod_volumes,
        "dnsPolicy": dns_policy,
    }
    if dns_config:
        spec["dnsConfig"] = dns_config
    if aliases := _host_aliases(w, sidecar_ip if w.reach is Reach.SIDECAR else None):
        spec["hostAliases"] = aliases
    # The policy's runtime for the workloads that run or read the agent's code; the backend's default otherwise.
    if runtime := w.runtime or config.runtime_class:
        spec["runtimeClassName"] = runtime
    if config.images.pull_secret:
        spec["imagePullSecrets"] = [{"name": config.images.pull_secret}]
    pod_labels = {**labels, ROLE_LABEL: w.role, REACH_LABEL: w.reach.value}
    meta = _meta(names.pod(w.role), namespace, pod_labels, anchor_uid, names)
    outputs = [{"key": v.key, "source": v.source, "on_claim": v.on_claim} for v in vols if v.download]
    if outputs:
        meta["annotations"] = {OUTPUTS_ANNOTATION: json.dumps(outputs, sort_keys=True)}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def security_summary(manifest: Manifest) -> dict[str, Any]:
    """What an auditor wants to see of a pod (for the audit trail's container_created); no secret values."""
    spec = manifest["spec"]
    main = spec["containers"][0]
    return {
        "name": manifest["metadata"]["name"],
        "kind": "Pod",
        "image": main["image"],
        "user": f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}",
        "cap_drop": main["securityContext"]["capabilities"]["drop"],
        "no_new_privileges": not main["securityContext"]["allowPrivilegeEscalation"],
        "read_only_root": main["securityContext"]["readOnlyRootFilesystem"],
        "seccomp": spec["securityContext"]["seccompProfile"]["type"],
        "runtime_class": spec.get("runtimeClassName"),
        "service_account_token": spec["automountServiceAccountToken"],
        "resources": main["resources"]["limits"],
        "active_deadline_seconds": spec["activeDeadlineSeconds"],
        "dns_policy": spec["dnsPolicy"],
        "host_aliases": spec.get("hostAliases", []),
        "mounts": [{k: m[k] for k in ("mountPath", "readOnly") if k in m} for m in main["volumeMounts"]],
        "env_names": sorted(e["name"] for e in main["env"]),
        "secret_env_names": sorted(
            item["key"]
            for v in spec["volumes"]
            if "secret" in v and any(m["name"] == v["name"] for m in main["volumeMounts"])
            for item in v["secret"].get("items", [])
        ),
        "labels": manifest["metadata"]["labels"],
    }


def claim_size(w: Workload) -> int:
    """Bytes to ask for the run's volume: the working tree may grow to the run's disk limit (the finaliser's
    SANDBOX_DISK_LIMIT) and the bundle as much again, besides the objects; never under 10 GiB."""
    try:
        limit = int(w.env.get("SANDBOX_DISK_LIMIT") or 0)
    except ValueError:
        limit = 0
    scratch = max((s.size_bytes for s in w.scratch), default=0)
    return 2 * max(limit, scratch, 10 * 1024**3)


def render_run(
    names: Names,
    owner: Owner,
    workloads: Sequence[Workload],
    config: KubernetesConfig,
    egress: Egress,
    is_file: Any = None,
) -> list[Manifest]:
    """Every object of a run whose workloads start in this order, as the backend makes them, without a cluster:
    the anchor's uid and the Service's cluster IP (which the API server assigns) are placeholders, and secret
    values are left out (`sandbox run --render`, the tests)."""
    labels = run_labels(names.run_id, owner)
    ns = config.namespace
    uid = PLACEHOLDER_UID
    out = [anchor(names, ns, labels, owner), *isolation_policies(names, ns, labels, uid)]
    uploaded: set[str] = set()
    claimed = False
    for w in workloads:
        vols = volumes(w, uploaded, is_file)
        if any(v.on_claim for v in vols) and not claimed:
            claimed = True
            size = config.workspace.size or str(claim_size(w))
            out.append(claim(names, ns, labels, uid, size, config.workspace.storage_class))
        if w.secret_env:
            out.append(secret(names, ns, labels, uid, w.role, dict.fromkeys(w.secret_env, "<secret>")))
        if w.reach is Reach.OUTSIDE:
            out += [sidecar_policy(names, ns, labels, uid, egress, config), service(names, ns, labels, uid)]
        out.append(pod(names, ns, labels, uid, w, vols, config, PLACEHOLDER_IP))
        uploaded.update(v.key for v in vols if v.on_claim)
    return out
