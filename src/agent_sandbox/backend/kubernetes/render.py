"""`sandbox run --backend kubernetes --render DIR`: a run's objects written out as YAML, with no cluster
contacted (to review them, to check them against a cluster's admission with `kubectl apply --dry-run=server`,
and for the tests)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, NoReturn

import yaml

from agent_sandbox.backend.kubernetes import manifests as mf
from agent_sandbox.backend.kubernetes.backend import KubernetesBackend
from agent_sandbox.backend.plan import Owner, Workload
from agent_sandbox.config.backends import KubernetesConfig, KubernetesImages
from agent_sandbox.errors import EnvironmentNotReady
from agent_sandbox.sidecar.egress import Egress

PLACEHOLDER_IMAGES = KubernetesImages(
    agent="REGISTRY/agent-sandbox/agent:TAG", sidecar="REGISTRY/agent-sandbox/sidecar:TAG"
)


class NoCluster:
    """The cluster of a render: every call is refused, so nothing is ever made or read by accident."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise EnvironmentNotReady("--render contacts no cluster")

    create = read_pod = delete = select = logs = metrics = exec_stream = _refuse

    def exec(
        self,
        pod: str,
        container: str,
        command: list[str],
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> tuple[int, str]:
        self._refuse()

    def runtime_classes(self) -> list[str] | None:
        return None  # not asked: a render contacts no cluster


def render_backend(config: KubernetesConfig) -> KubernetesBackend:
    """A backend that resolves the run's images (placeholders where the settings name none) and makes nothing."""
    if not config.images.agent or not config.images.sidecar:
        config = config.model_copy(
            update={"images": PLACEHOLDER_IMAGES.model_copy(update={"pull_secret": config.images.pull_secret})}
        )
    return KubernetesBackend(NoCluster(), config)


def write(
    directory: Path, run_id: str, owner: Owner, workloads: list[Workload], config: KubernetesConfig, egress: Egress
) -> list[Path]:
    """Write every object of the run, one YAML file each, numbered in the order the backend makes them."""
    objects = mf.render_run(mf.Names(run_id), owner, workloads, config, egress, lambda p: Path(p).is_file())
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for n, obj in enumerate(objects, 1):
        path = directory / f"{n:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        written.append(path)
    return written
