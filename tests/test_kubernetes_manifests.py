"""The Kubernetes backend's objects (backend/kubernetes/manifests.py) for every policy preset: the run's full
topology as the backend makes it, each object valid against the official OpenAPI schemas of Kubernetes
(kubernetes-validate, strict: no unknown field), and the containment it promises: the NetworkPolicies exactly,
the hardening of every pod, labels and owner references. No cluster is needed (test_kubernetes_e2e.py has one)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from agent_sandbox.backend.base import ROLE_LABEL, RUN_LABEL
from agent_sandbox.backend.kubernetes import manifests as mf
from agent_sandbox.backend.plan import ImageSet, Owner, Reach, Workload
from agent_sandbox.config.backends import KubernetesConfig
from agent_sandbox.config.policy import Policy, load_policy, preset_names
from agent_sandbox.run.spec import RunSpec
from agent_sandbox.run.workloads import Recipes, Users
from agent_sandbox.sidecar.config import GATEWAY_PORT, PROXY_PORT, SidecarConfig
from agent_sandbox.sidecar.egress import Egress

RUN_ID = "20250101-120000-abc123"
OWNER = Owner(state="0123456789abcdef", supervisor="4242_1735732800.25")
CONFIG = KubernetesConfig(namespace="sandboxes", runtime_class="gvisor")
IMAGES = ImageSet(agent="registry.example/agent-sandbox/agent:1", sidecar="registry.example/agent-sandbox/sidecar:1")
PORTS = [{"protocol": "TCP", "port": GATEWAY_PORT}, {"protocol": "TCP", "port": PROXY_PORT}]


def workloads(tmp_path: Path, policy: Policy) -> list[Workload]:
    """The run's workloads as the supervisor plans them (run/workloads.py), in the order they start."""
    run_dir = tmp_path / "runs" / RUN_ID
    for sub in ("in", "out", "model", "heartbeat", "workspace", "check"):
        (run_dir / sub).mkdir(parents=True)
    objects = tmp_path / "repo" / ".git" / "objects"
    objects.mkdir(parents=True)
    spec = RunSpec(
        run_id=RUN_ID,
        repo=str(tmp_path / "repo"),
        base_ref="main",
        base_commit="0" * 40,
        branch=f"sandbox/{RUN_ID}",
        task="do it",
        policy=policy,
        policy_source="preset",
        model="claude-sonnet-4-5",
        run_dir=str(run_dir),
        check="pytest -q",
    )
    users = Users((1000, 1000), "1000:1000", "1001:1001")
    recipes = Recipes(spec, IMAGES, run_dir, objects, users)
    config = SidecarConfig(
        run_id=RUN_ID, upstream_url="https://api.anthropic.com", budget_usd=1.0, egress=policy.egress
    )
    return [
        recipes.sidecar(config, "sk-real-key", []),
        recipes.agent(1920),
        recipes.finaliser("completed", 420),
        recipes.check("f" * 40, 900),
    ]


def topology(tmp_path: Path, policy: Policy, config: KubernetesConfig = CONFIG) -> list[dict[str, Any]]:
    return mf.render_run(mf.Names(RUN_ID), OWNER, workloads(tmp_path, policy), config, policy.egress, os.path.isfile)


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


PRESETS = preset_names()


def test_every_preset_is_covered() -> None:
    assert {"default", "strict", "dependency-update"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_object_is_valid_against_the_kubernetes_schemas(tmp_path: Path, preset: str) -> None:
    for obj in topology(tmp_path, load_policy(preset)[0]):
        # Raises ValidationError on a wrong type, a missing required field or (strict) an unknown one.
        kubernetes_validate.validate(obj, mf.KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_topology_of_a_run(tmp_path: Path, preset: str) -> None:
    objects = topology(tmp_path, load_policy(preset)[0])
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    p = f"sbx-{RUN_ID}"
    assert kinds == sorted(
        [
            ("ConfigMap", p),
            ("NetworkPolicy", f"{p}-deny-all"),
            ("NetworkPolicy", f"{p}-to-sidecar"),
            ("NetworkPolicy", f"{p}-sidecar"),
            ("PersistentVolumeClaim", f"{p}-run"),
            ("Secret", f"{p}-sidecar-env"),
            ("Service", f"{p}-sidecar"),
            ("Pod", f"{p}-sidecar"),
            ("Pod", f"{p}-agent"),
            ("Pod", f"{p}-finaliser"),
            ("Pod", f"{p}-check"),
        ]
    )
    # The sidecar is a pod of its own, never a container of the agent's (a pod shares one network namespace).
    for name, pod in by_kind(objects, "Pod").items():
        images = {c["image"] for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]}
        assert len(images) == 1, name
    # Every object carries the run's labels; all but the anchor are owned by it, so deleting it deletes the run.
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == "sandboxes"
        assert meta["labels"][RUN_LABEL] == RUN_ID
        assert meta["labels"]["sandbox.supervisor"] == OWNER.supervisor
        assert meta["labels"]["sandbox.state"] == OWNER.state
        if obj["kind"] == "ConfigMap":
            assert "ownerReferences" not in meta
        else:
            assert meta["ownerReferences"] == [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": p, "uid": mf.PLACEHOLDER_UID}
            ]


def test_objects_come_in_the_order_that_keeps_every_pod_confined(tmp_path: Path) -> None:
    objects = topology(tmp_path, Policy())
    order = [(o["kind"], o["metadata"]["name"].rsplit("-", 1)[-1]) for o in objects]
    first_pod = next(i for i, (kind, _) in enumerate(order) if kind == "Pod")
    assert order.index(("NetworkPolicy", "all")) < first_pod
    assert order.index(("NetworkPolicy", "sidecar")) < first_pod
    assert order[0] == ("ConfigMap", "abc123")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_pod_is_hardened_to_the_restricted_level(tmp_path: Path, preset: str) -> None:
    policy = load_policy(preset)[0]
    for name, pod in by_kind(topology(tmp_path, policy), "Pod").items():
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False
        assert spec["restartPolicy"] == "Never"
        assert spec["hostNetwork"] is spec["hostPID"] is spec["hostIPC"] is False
        assert spec["runtimeClassName"] == "gvisor"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] in (1000, 1001)
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert 0 < spec["activeDeadlineSeconds"] <= mf.DEFAULT_DEADLINE
        # No host path, no hostPort: nothing of the node reaches the pod. A Secret only as the sidecar's key.
        for volume in spec["volumes"]:
            kinds = {"emptyDir", "persistentVolumeClaim"} | ({"secret"} if name.endswith("-sidecar") else set())
            assert set(volume) - {"name"} <= kinds, volume
        for c in spec["containers"] + spec["initContainers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["privileged"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["runAsNonRoot"] is True
            assert c["resources"]["limits"]["memory"] and c["resources"]["limits"]["cpu"]
            assert all("hostPort" not in p for p in c.get("ports", []))
        main = spec["containers"][0]
        if pod["metadata"]["labels"][ROLE_LABEL] == "agent":
            assert main["resources"]["limits"] == {
                "memory": str(policy.limits.memory_bytes),
                "cpu": f"{round(policy.limits.cpus * 1000)}m",
            }


@pytest.mark.parametrize("preset", PRESETS)
def test_the_model_key_is_a_file_of_a_secret_that_only_the_sidecars_main_mounts(tmp_path: Path, preset: str) -> None:
    """The key reaches the sidecar as a read-only file of a Secret volume, never as an environment variable
    (`secretKeyRef` would put it in /proc/<pid>/environ): its `main` alone mounts it, no other container of its
    pod, no pod of the agent's image; the sidecar finds it by the non-secret KEY_FILE_ENV."""
    from agent_sandbox.sidecar.config import KEY_ENV, KEY_FILE_ENV

    objects = topology(tmp_path, load_policy(preset)[0])
    secrets = by_kind(objects, "Secret")
    assert list(secrets) == [f"sbx-{RUN_ID}-sidecar-env"]
    assert list(secrets[f"sbx-{RUN_ID}-sidecar-env"]["stringData"]) == [KEY_ENV]
    assert "sk-real-key" not in str(objects)  # rendered without the value
    for name, pod in by_kind(objects, "Pod").items():
        spec = pod["spec"]
        containers = spec["containers"] + spec["initContainers"]
        # No secret reaches any container by reference, and no key by name as a variable.
        assert "valueFrom" not in str(containers) and "secretKeyRef" not in str(pod), name
        assert all(e["name"] != KEY_ENV for c in containers for e in c.get("env", []))
        secret_volumes = [v for v in spec["volumes"] if "secret" in v]
        mounting = {c["name"] for c in containers for m in c.get("volumeMounts", []) if m["name"] == mf.SECRET_VOLUME}
        if not name.endswith("-sidecar"):
            assert secret_volumes == [] and mounting == set(), name
            assert KEY_FILE_ENV not in str(pod)
            continue
        assert secret_volumes == [
            {
                "name": mf.SECRET_VOLUME,
                "secret": {
                    "secretName": f"sbx-{RUN_ID}-sidecar-env",
                    "items": [{"key": KEY_ENV, "path": KEY_ENV}],
                    "defaultMode": 0o440,
                },
            }
        ]
        assert mounting == {mf.MAIN}  # not the stage or carrier containers, which the supervisor execs into
        main = spec["containers"][0]
        assert [m for m in main["volumeMounts"] if m["name"] == mf.SECRET_VOLUME] == [
            {"name": mf.SECRET_VOLUME, "mountPath": mf.SECRETS_PATH, "readOnly": True}
        ]
        assert {"name": KEY_FILE_ENV, "value": f"{mf.SECRETS_PATH}/{KEY_ENV}"} in main["env"]
        assert KEY_FILE_ENV == KEY_ENV + mf.SECRET_FILE_SUFFIX  # the name the sidecar reads (upstream_key)
        # Only the sidecar's user reads it: its group is the pod's fsGroup, the sidecar's own, and it is non-root.
        sc = spec["securityContext"]
        assert sc["fsGroup"] == sc["runAsGroup"] == 1001 and sc["runAsUser"] == 1001
        # The audit trail still says which secret the pod gets (never its value).
        summary = mf.security_summary(pod)
        assert summary["secret_env_names"] == [KEY_ENV]
        assert KEY_FILE_ENV in summary["env_names"] and KEY_ENV not in summary["env_names"]
        assert {"mountPath": mf.SECRETS_PATH, "readOnly": True} in summary["mounts"]


def test_the_agents_workloads_know_only_the_sidecar_and_resolve_nothing(tmp_path: Path) -> None:
    pods = by_kind(topology(tmp_path, Policy()), "Pod")
    for role in ("agent", "check"):
        spec = pods[f"sbx-{RUN_ID}-{role}"]["spec"]
        assert pods[f"sbx-{RUN_ID}-{role}"]["metadata"]["labels"][mf.REACH_LABEL] == "sidecar"
        assert spec["hostAliases"] == [{"ip": mf.PLACEHOLDER_IP, "hostnames": ["sidecar"]}]
        assert spec["dnsPolicy"] == "None"
        assert spec["dnsConfig"]["nameservers"] == [mf.NO_RESOLVER]
    fin = pods[f"sbx-{RUN_ID}-finaliser"]
    assert fin["metadata"]["labels"][mf.REACH_LABEL] == "nothing"
    assert "hostAliases" not in fin["spec"] and fin["spec"]["dnsPolicy"] == "None"
    sidecar = pods[f"sbx-{RUN_ID}-sidecar"]
    assert sidecar["metadata"]["labels"][mf.REACH_LABEL] == "outside"
    assert sidecar["spec"]["dnsPolicy"] == "ClusterFirst"


def _expected_public(egress: Egress) -> list[dict[str, Any]]:
    return [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": sorted(mf.PRIVATE_V4)}},
        {"ipBlock": {"cidr": "::/0", "except": sorted(mf.PRIVATE_V6)}},
    ]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_network_policies_of_every_preset(tmp_path: Path, preset: str) -> None:
    policy = load_policy(preset)[0]
    assert not policy.egress.allow_private and not policy.egress.allow_addresses  # the presets open no range
    nps = by_kind(topology(tmp_path, policy), "NetworkPolicy")
    run = {RUN_LABEL: RUN_ID}
    sidecar = {"matchLabels": {**run, ROLE_LABEL: "sidecar"}}
    confined = {"matchLabels": {**run, mf.REACH_LABEL: "sidecar"}}
    assert nps[f"sbx-{RUN_ID}-deny-all"]["spec"] == {
        "podSelector": {"matchLabels": run},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [],
        "egress": [],
    }
    assert nps[f"sbx-{RUN_ID}-to-sidecar"]["spec"] == {
        "podSelector": confined,
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": sidecar}], "ports": PORTS}],
    }
    assert nps[f"sbx-{RUN_ID}-sidecar"]["spec"] == {
        "podSelector": sidecar,
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": confined}], "ports": PORTS}],
        "egress": [
            {
                "to": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
            },
            {"to": _expected_public(policy.egress)},
        ],
    }


def test_the_closed_ranges_cover_every_non_public_kind_the_proxy_refuses() -> None:
    import ipaddress

    from agent_sandbox.sidecar.egress import METADATA, address_kind

    nets = [ipaddress.ip_network(r) for r in (*mf.PRIVATE_V4, *mf.PRIVATE_V6)]
    samples = [
        *map(str, METADATA),
        "10.1.2.3",
        "172.20.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "127.0.0.1",
        "169.254.1.1",
        "0.0.0.0",
        "224.0.0.1",
        "fc00::1",
        "fe80::1",
        "::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
    ]
    for text in samples:
        addr = ipaddress.ip_address(text)
        assert address_kind(text) is not None, text
        assert any(addr in n for n in nets if n.version == addr.version), text
    for public in ("1.1.1.1", "8.8.8.8", "2606:4700::1111"):
        addr = ipaddress.ip_address(public)
        assert not any(addr in n for n in nets if n.version == addr.version), public


def test_allow_addresses_and_allow_private_open_ranges_but_never_the_metadata_service(tmp_path: Path) -> None:
    egress = Egress(allow_addresses=["10.20.0.0/16", "169.254.0.0/16", "169.254.169.254", "127.0.0.1"])
    peers = mf.public_egress(egress)
    assert peers[:2] == _expected_public(egress)
    assert peers[2:] == [
        {"ipBlock": {"cidr": "10.20.0.0/16"}},
        # A range that holds metadata addresses opens everything in it but them...
        {"ipBlock": {"cidr": "169.254.0.0/16", "except": ["169.254.169.254/32", "169.254.170.2/32"]}},
        # ...an entry naming one exactly opens it; loopback (the sidecar itself) needs no policy.
        {"ipBlock": {"cidr": "169.254.169.254/32"}},
    ]
    private = mf.public_egress(Egress(allow_private=True))
    opened = {p["ipBlock"]["cidr"]: p["ipBlock"].get("except", []) for p in private[2:]}
    assert "127.0.0.0/8" not in opened and "::1/128" not in opened and "10.0.0.0/8" in opened
    assert opened["169.254.0.0/16"] == ["169.254.169.254/32", "169.254.170.2/32"]
    assert opened["100.64.0.0/10"] == ["100.100.100.200/32"]
    assert opened["fc00::/7"] == ["fd00:ec2::254/128"]
    policy = Policy.model_validate({"egress": {"allow_private": True, "allow_addresses": ["10.20.0.0/16"]}})
    for obj in topology(tmp_path, policy):
        kubernetes_validate.validate(obj, mf.KUBERNETES_VERSION, strict=True)


def test_the_inputs_travel_in_and_the_outputs_back_without_host_paths(tmp_path: Path) -> None:
    ws = workloads(tmp_path, Policy())
    uploaded: set[str] = set()
    plan = {}
    for w in ws:
        vols = mf.volumes(w, uploaded, os.path.isfile)
        uploaded.update(v.key for v in vols if v.on_claim)
        plan[w.role] = {v.target: (v.on_claim, v.upload, v.download, v.live) for v in vols}
    # The sidecar's mounts are emptyDirs of its own pod: its records come back, the heartbeat is kept in step.
    assert plan["sidecar"] == {
        "/sandbox/model-out": (False, True, True, False),
        "/sandbox/heartbeat": (False, True, False, True),
    }
    # The agent puts the working tree, the objects and its inputs on the run's volume...
    assert plan["agent"] == {
        "/workspace": (True, True, False, False),
        "/sandbox/host-objects": (True, True, False, False),
        "/sandbox/in": (True, True, False, False),
    }
    # ...where the finaliser finds them; only its bundle (out/) comes back, and the check's result.
    assert plan["finaliser"]["/workspace"] == (True, False, False, False)
    assert plan["finaliser"]["/sandbox/out"] == (True, True, True, False)
    assert plan["check"]["/sandbox/check"] == (True, True, True, False)


def test_a_docker_only_hosts_entry_and_a_root_workload_are_refused(tmp_path: Path) -> None:
    policy = Policy.model_validate({"egress": {"hosts": {"internal.example": "host-gateway"}}})
    with pytest.raises(ValueError, match="host-gateway"):
        topology(tmp_path, policy)
    w = workloads(tmp_path / "b", Policy())[1].model_copy(update={"user": "0:0"})
    with pytest.raises(ValueError, match="root"):
        mf.pod(mf.Names(RUN_ID), "ns", {RUN_LABEL: RUN_ID}, "u", w, [], CONFIG)


def test_the_workspace_size_and_class_come_from_the_config(tmp_path: Path) -> None:
    config = KubernetesConfig(workspace={"storage_class": "fast", "size": "50Gi"}, images={"pull_secret": "regcred"})
    objects = topology(tmp_path, Policy(), config)
    claim = by_kind(objects, "PersistentVolumeClaim")[f"sbx-{RUN_ID}-run"]["spec"]
    assert claim["storageClassName"] == "fast" and claim["resources"]["requests"]["storage"] == "50Gi"
    for pod in by_kind(objects, "Pod").values():
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert "runtimeClassName" not in pod["spec"]
    default = by_kind(topology(tmp_path / "d", Policy()), "PersistentVolumeClaim")[f"sbx-{RUN_ID}-run"]["spec"]
    assert "storageClassName" not in default
    assert int(default["resources"]["requests"]["storage"]) >= 2 * Policy().limits.disk_bytes


def test_reach_labels_match_the_plan(tmp_path: Path) -> None:
    for w in workloads(tmp_path, Policy()):
        assert w.reach in (Reach.SIDECAR, Reach.OUTSIDE, Reach.NOTHING)


def test_sandbox_run_renders_the_full_topology_without_a_cluster(
    tmp_path: Path, make_repo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from agent_sandbox.cli.main import main

    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_CONFIG", str(tmp_path / "none.yaml"))
    script = tmp_path / "script.yaml"
    script.write_text("turns:\n  - text: done\n")
    out = tmp_path / "rendered"
    args = ["run", "--repo", str(make_repo()), "--task", "t", "--model-script", str(script), "--check", "true"]
    res = CliRunner().invoke(main, [*args, "--backend", "kubernetes", "--namespace", "sbx", "--render", str(out)])
    assert res.exit_code == 0, res.output
    import yaml

    objects = [yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))]
    assert [o["kind"] for o in objects].count("Pod") == 4 and len(objects) == 10  # no key: no Secret
    for obj in objects:
        assert obj["metadata"]["namespace"] == "sbx"
        kubernetes_validate.validate(obj, mf.KUBERNETES_VERSION, strict=True)
    assert not (tmp_path / "state" / "runs").exists()  # nothing of a run was made
    res = CliRunner().invoke(main, [*args, "--render", str(out)])
    assert res.exit_code != 0 and "Kubernetes backend" in res.output


def test_the_policys_runtime_is_the_runtime_class_of_the_pods_that_run_the_agents_code(tmp_path: Path) -> None:
    """agent.runtime (e.g. Kata) wins over the backend's runtime_class for the agent, check and finaliser; the
    sidecar, which runs none of the agent's code, keeps the backend's."""
    policy = Policy.model_validate({"agent": {"runtime": "kata"}})
    pods = by_kind(topology(tmp_path, policy), "Pod")
    classes = {pod["metadata"]["labels"][ROLE_LABEL]: pod["spec"].get("runtimeClassName") for pod in pods.values()}
    assert classes == {"sidecar": "gvisor", "agent": "kata", "finaliser": "kata", "check": "kata"}
    plain = by_kind(topology(tmp_path / "plain", policy, KubernetesConfig()), "Pod")
    assert {p["metadata"]["labels"][ROLE_LABEL]: p["spec"].get("runtimeClassName") for p in plain.values()} == {
        "sidecar": None,
        "agent": "kata",
        "finaliser": "kata",
        "check": "kata",
    }
