"""`sandbox run --backend kubernetes` end to end, against a real cluster: opt-in, as no cluster can run on the
machines that run the rest of the suite. Set SANDBOX_TEST_KUBECONFIG (a kubeconfig whose current context, or
SANDBOX_TEST_KUBE_CONTEXT, may make objects in SANDBOX_TEST_NAMESPACE, default `agent-sandbox-test`, with the RBAC
of docs/kubernetes.md) and SANDBOX_TEST_AGENT_IMAGE / SANDBOX_TEST_SIDECAR_IMAGE (the images, pushed where the
nodes pull from); the cluster's network plugin must enforce NetworkPolicy. Then:

    SANDBOX_TEST_KUBECONFIG=~/.kube/config SANDBOX_TEST_AGENT_IMAGE=... SANDBOX_TEST_SIDECAR_IMAGE=... \\
        .venv/bin/pytest -m kubernetes tests/test_kubernetes_e2e.py

The scenarios are the Docker suite's (test_run_e2e.py, tests/hostile/test_network_reach.py): the scripted change
lands on the branch, the agent reaches nothing but the sidecar, and nothing of the run is left on the cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import git
from .test_run_e2e import EDIT_WRITE_BASH

KUBECONFIG = os.environ.get("SANDBOX_TEST_KUBECONFIG")
AGENT_IMAGE = os.environ.get("SANDBOX_TEST_AGENT_IMAGE")
SIDECAR_IMAGE = os.environ.get("SANDBOX_TEST_SIDECAR_IMAGE")
NAMESPACE = os.environ.get("SANDBOX_TEST_NAMESPACE", "agent-sandbox-test")

pytestmark = [
    pytest.mark.kubernetes,
    pytest.mark.skipif(
        not KUBECONFIG,
        reason="the Kubernetes end-to-end suite needs a cluster: set SANDBOX_TEST_KUBECONFIG (docs/kubernetes.md)",
    ),
    pytest.mark.skipif(
        bool(KUBECONFIG) and not (AGENT_IMAGE and SIDECAR_IMAGE),
        reason="set SANDBOX_TEST_AGENT_IMAGE and SANDBOX_TEST_SIDECAR_IMAGE to the images pushed for the cluster",
    ),
]

PROBE = """
turns:
  - bash: "getent hosts kubernetes.default.svc.cluster.local && echo dns-open >r || echo dns-closed >r"
  - bash: "curl -sk -m 5 https://$KUBERNETES_SERVICE_HOST/ -o /dev/null && echo api-open >>r || echo api-closed >>r"
  - bash: "curl -s -m 5 --noproxy '*' http://1.1.1.1/ -o /dev/null && echo direct-open >>r || echo direct-closed >>r"
  - bash: "curl -s -m 5 http://169.254.169.254/ -o /dev/null && echo metadata-open >>r || echo metadata-closed >>r"
  - bash: "mv r reach.txt"
  - text: "Done."
usage: {input_tokens: 10, output_tokens: 5}
"""


@pytest.fixture
def kube_env(tmp_path: Path) -> dict[str, str]:
    """Host settings that choose the cluster."""
    settings = {
        "backend": {
            "kind": "kubernetes",
            "kubeconfig": KUBECONFIG,
            "context": os.environ.get("SANDBOX_TEST_KUBE_CONTEXT"),
            "namespace": NAMESPACE,
            "images": {"agent": AGENT_IMAGE, "sidecar": SIDECAR_IMAGE},
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(settings))
    return {"SANDBOX_CONFIG": str(path)}


def _left(run_id: str) -> list[str]:
    from agent_sandbox.backend import connect
    from agent_sandbox.config.backends import KubernetesConfig

    config = KubernetesConfig(
        kubeconfig=KUBECONFIG, context=os.environ.get("SANDBOX_TEST_KUBE_CONTEXT"), namespace=NAMESPACE
    )
    entry: dict[str, Any] = connect(config).list_runs().get(run_id, {})
    return list(entry.get("objects", []))


def test_a_scripted_run_lands_exactly_the_scripted_change(make_repo, sandbox, write_script, kube_env) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    script = str(write_script(EDIT_WRITE_BASH))
    res = sandbox(
        "run", "--repo", str(repo), "--task", "edit", "--model-script", script, "--json", env=kube_env, timeout=900
    )
    assert res.code == 0, res.stderr
    s = res.json()
    assert (s["status"], s["reason"]) == ("succeeded", "completed")
    assert sorted(git(repo, "diff", "--name-status", f"{base}..{s['branch']}").splitlines()) == [
        "A\thello.txt",
        "A\tnotes.md",
        "M\ta.py",
    ]
    trail = [json.loads(line) for line in Path(s["run_dir"], "audit.jsonl").read_text().splitlines()]
    started = [e for e in trail if e["type"] == "run_started"]
    assert started[0]["payload"]["backend"] == "kubernetes"
    assert _left(s["id"]) == []


def test_the_agent_reaches_the_sidecar_alone(make_repo, sandbox, write_script, kube_env) -> None:
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "probe",
        "--model-script",
        str(write_script(PROBE)),
        "--json",
        env=kube_env,
        timeout=900,
    )
    assert res.code == 0, res.stderr
    s = res.json()
    assert git(repo, "show", f"{s['branch']}:reach.txt").split() == [
        "dns-closed",
        "api-closed",
        "direct-closed",
        "metadata-closed",
    ]
    assert _left(s["id"]) == []


def test_rendered_objects_pass_the_clusters_admission(
    make_repo, sandbox, write_script, kube_env, tmp_path: Path
) -> None:
    """The rendered topology, offered to the API server with a server-side dry run: its schemas, the namespace's
    Pod Security level (restricted) and any admission policy the cluster has all accept it."""
    import kubernetes.client
    import kubernetes.config
    import yaml

    repo = make_repo()
    out = tmp_path / "rendered"
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--model-script",
        str(write_script(EDIT_WRITE_BASH)),
        "--backend",
        "kubernetes",
        "--namespace",
        NAMESPACE,
        "--render",
        str(out),
        env=kube_env,
    )
    assert res.code == 0, res.stderr
    kubernetes.config.load_kube_config(config_file=KUBECONFIG, context=os.environ.get("SANDBOX_TEST_KUBE_CONTEXT"))
    api = kubernetes.client.ApiClient()
    for path in sorted(out.glob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        obj["metadata"].pop("ownerReferences", None)  # the anchor is not made by a dry run
        kind = obj["kind"]
        if kind == "NetworkPolicy":
            kubernetes.client.NetworkingV1Api(api).create_namespaced_network_policy(NAMESPACE, obj, dry_run="All")
        else:
            suffix = {"ConfigMap": "config_map", "PersistentVolumeClaim": "persistent_volume_claim"}.get(
                kind, kind.lower()
            )
            getattr(kubernetes.client.CoreV1Api(api), f"create_namespaced_{suffix}")(NAMESPACE, obj, dry_run="All")
