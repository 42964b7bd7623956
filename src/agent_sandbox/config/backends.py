"""Which platform runs the tasks: one pydantic class per backend, chosen by its `kind`.

Docker (this machine's engine) is the default; Kubernetes runs each task as pods of a cluster
(docs/kubernetes.md). A backend joins as another class in the `BackendConfig` union (see SWE-ReX's
deployment configs).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class DockerConfig(BaseModel):
    """Runs on the Docker engine of this machine (or DOCKER_HOST's)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["docker"] = "docker"
    """The backend."""
    engine_wait_seconds: float | None = Field(default=None, ge=0)
    """How long a call waits for an engine that stopped answering (a restart) before the run gives up on it;
    None: SANDBOX_ENGINE_WAIT_SECONDS, else 120."""


class KubernetesImages(BaseModel):
    """The run's images as the cluster pulls them: `sandbox images build` builds them locally, the operator
    pushes them to a registry the nodes can pull from (docs/kubernetes.md#images)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    agent: str | None = None
    """The agent image's reference in the registry (best by digest: `registry/agent-sandbox/agent@sha256:...`);
    it also runs the check and the finaliser."""
    sidecar: str | None = None
    """The sidecar image's reference in the registry."""
    pull_secret: str | None = None
    """Name of a `kubernetes.io/dockerconfigjson` Secret in the namespace the nodes pull the images with."""


class WorkspaceStorage(BaseModel):
    """The run's volume: the working tree, the host repository's objects and the run's inputs, shared by the
    agent, the check and the finaliser one after the other (a PersistentVolumeClaim per run)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    storage_class: str | None = None
    """StorageClass of the claim; None: the cluster's default class."""
    size: str | None = None
    """Requested size, in Kubernetes quantity syntax (e.g. `20Gi`); None: the policy's disk limit."""


class ClusterDns(BaseModel):
    """Where the cluster's DNS server runs: the one in-cluster address the sidecar may reach (its proxy
    resolves the names the agent asks for). The agent's workloads resolve nothing."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    namespace: str = "kube-system"
    """Namespace of the DNS pods."""
    labels: dict[str, str] = Field(default_factory=lambda: {"k8s-app": "kube-dns"})
    """Labels that select the DNS pods (CoreDNS keeps kube-dns's `k8s-app: kube-dns`)."""


class KubernetesConfig(BaseModel):
    """Runs each task as pods of a Kubernetes cluster, through the official client (docs/kubernetes.md)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["kubernetes"] = "kubernetes"
    """The backend."""
    kubeconfig: str | None = None
    """Path of the kubeconfig file; None: KUBECONFIG, else ~/.kube/config, else the in-cluster service
    account (a supervisor that runs in a pod)."""
    context: str | None = None
    """The kubeconfig context to use; None: its current context."""
    namespace: str = "agent-sandbox"
    """The namespace the runs' objects are made in: one for sandboxes alone, labelled for the restricted Pod
    Security level (docs/kubernetes.md#deploying)."""
    images: KubernetesImages = Field(default_factory=KubernetesImages)
    """The images the nodes pull."""
    runtime_class: str | None = None
    """RuntimeClass of every pod of a run (e.g. `gvisor` or `kata`): a kernel of its own between the agent
    and the node; a policy's `agent.runtime` overrides it for the pods that run the agent's code. None: the
    cluster's default runtime."""
    workspace: WorkspaceStorage = Field(default_factory=WorkspaceStorage)
    """The run's volume."""
    dns: ClusterDns = Field(default_factory=ClusterDns)
    """The cluster's DNS server, for the sidecar alone."""
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    """How long one call to the API server may take before it fails."""
    max_transfer_bytes: int = Field(default=16 * 1024**3, gt=0)
    """Most a workload's outputs (the bundle, the check's result, the sidecar's records) may bring back to
    this machine; what is larger is refused."""


BackendConfig = Annotated[DockerConfig | KubernetesConfig, Field(discriminator="kind")]
