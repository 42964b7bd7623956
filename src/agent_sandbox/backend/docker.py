"""The Docker backend, on the Docker SDK."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import Mount as DockerMount

from ..errors import EnvironmentNotReady
from .base import RUN_LABEL, SUPERVISOR_LABEL, Backend, ContainerSpec, ExitInfo, NetworkSpec

log = logging.getLogger(__name__)

DOCKER_HINT = "start a Docker engine (`make docker` runs scripts/ensure-docker) or set DOCKER_HOST"


def connect_client() -> docker.DockerClient:
    """A client that has answered a ping, or EnvironmentNotReady."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise EnvironmentNotReady(f"Docker is not reachable: {str(exc).splitlines()[0][:200]}",
                                  hint=DOCKER_HINT) from None
    return client


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    def connect(cls) -> DockerBackend:
        return cls(connect_client())

    def _get(self, container: str) -> Container:
        return self.client.containers.get(container)

    def create_network(self, spec: NetworkSpec) -> None:
        self.client.networks.create(spec.name, driver="bridge", internal=spec.internal, labels=spec.labels,
                                    check_duplicate=True)
        log.info("network_created name=%s internal=%s", spec.name, spec.internal)

    def start(self, spec: ContainerSpec) -> str:
        mounts = [DockerMount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
                  for m in spec.mounts]
        kwargs: dict[str, Any] = dict(
            image=spec.image, name=spec.name, command=spec.command or None, entrypoint=spec.entrypoint,
            user=spec.user, environment={**spec.env, **spec.secret_env}, mounts=mounts, labels=spec.labels,
            read_only=spec.read_only_root, tmpfs=spec.tmpfs or None, cap_drop=spec.cap_drop,
            security_opt=["no-new-privileges:true"] if spec.no_new_privileges else None,
            working_dir=spec.working_dir, detach=True, privileged=False, init=True,
            log_config={"type": "json-file", "config": {"max-size": "64m", "max-file": "2"}},
        )
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
                spec.networks[0]: self.client.api.create_endpoint_config(aliases=spec.aliases or None)}
        container = self.client.containers.create(**kwargs)
        try:
            for extra in spec.networks[1:]:
                self.client.networks.get(extra).connect(container, aliases=spec.aliases or None)
            container.start()
        except Exception:
            container.remove(force=True)
            raise
        log.info("container_started name=%s image=%s", spec.name, spec.image)
        return container.id

    def isolate(self, container: str, run_id: str) -> None:
        target = self._get(container)
        # A helper joins the container's network namespace with NET_ADMIN and nothing else, deletes the
        # default routes that Docker gives even `internal` networks, and checks that none is left. It runs
        # before any agent code: the agent's entrypoint waits for the supervisor's go-ahead.
        script = ("ip route del default 2>/dev/null; ip -6 route del default 2>/dev/null; "
                  "if ip route show default | grep -q .; then echo 'default route remains' >&2; exit 1; fi")
        helper = self.client.containers.run(
            target.image.id, entrypoint=["sh", "-c", script], user="0:0", network_mode=f"container:{target.id}",
            cap_drop=["ALL"], cap_add=["NET_ADMIN"], security_opt=["no-new-privileges:true"], read_only=True,
            labels={RUN_LABEL: run_id, "sandbox.role": "isolate"}, detach=True,
        )
        try:
            result = helper.wait(timeout=60)
            if result.get("StatusCode") != 0:
                logs = helper.logs().decode(errors="replace")[-300:]
                raise RuntimeError(f"could not isolate the agent's network: {logs}")
        finally:
            helper.remove(force=True)
        log.info("network_isolated container=%s", target.name)

    def output(self, container: str, stderr: bool = False) -> Iterator[bytes]:
        c = self._get(container)
        yield from c.logs(stream=True, follow=True, stdout=not stderr, stderr=stderr)

    def stats(self, container: str) -> Iterator[dict[str, int]]:
        try:
            stream = self._get(container).stats(stream=True, decode=True)
            for raw in stream:
                mem = raw.get("memory_stats") or {}
                if not mem:  # the container has stopped
                    return
                yield {
                    "memory": int(mem.get("usage") or 0),
                    # cgroup v1 reports the peak itself; v2 does not, so the caller keeps a running maximum.
                    "peak_memory": int(mem.get("max_usage") or mem.get("usage") or 0),
                    "cpu_ns": int(((raw.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0),
                    "pids": int((raw.get("pids_stats") or {}).get("current") or 0),
                }
        except (docker.errors.NotFound, docker.errors.APIError, requests.exceptions.RequestException):
            return

    def status(self, container: str) -> ExitInfo:
        try:
            c = self._get(container)
        except docker.errors.NotFound:
            return ExitInfo(exit_code=None)
        state = c.attrs.get("State", {})
        running = bool(state.get("Running"))
        return ExitInfo(exit_code=None if running else state.get("ExitCode"), oom_killed=bool(state.get("OOMKilled")),
                        running=running)

    def wait(self, container: str, timeout: float) -> ExitInfo:
        with contextlib.suppress(requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout):
            self._get(container).wait(timeout=timeout)
        return self.status(container)

    def stop(self, container: str, grace: float) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self._get(container).stop(timeout=max(0, round(grace)))

    def remove_run(self, run_id: str) -> list[str]:
        """Remove the run's containers, then its networks. Safe to race with another remover (a second gc):
        what the other removed is skipped, and a network whose containers are still going is retried."""
        removed: list[str] = []
        flt = {"label": f"{RUN_LABEL}={run_id}"}
        for c in self.client.containers.list(all=True, filters=flt, ignore_removed=True):
            try:
                c.remove(force=True, v=True)
                removed.append(f"container:{c.name}")
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: its removal is already in progress elsewhere
                    raise
        for n in self.client.networks.list(filters=flt):
            for attempt in range(20):
                try:
                    n.remove()
                    removed.append(f"network:{n.name}")
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError as exc:
                    # "has active endpoints": a container on it is still being removed.
                    if exc.status_code not in (403, 409, 500) or attempt == 19:
                        raise
                    time.sleep(0.25)
        if removed:
            log.info("teardown run_id=%s removed=%s", run_id, ",".join(removed))
        return removed

    def list_runs(self) -> dict[str, dict[str, Any]]:
        # ignore_removed: the SDK inspects each listed container, and other runs' short-lived containers
        # (isolation helpers, finalisers) may be gone by then.
        runs: dict[str, dict[str, Any]] = {}
        flt = {"label": RUN_LABEL}
        containers = self.client.containers.list(all=True, filters=flt, ignore_removed=True)
        found = [(c.labels, f"container:{c.name}") for c in containers]
        found += [(n.attrs.get("Labels") or {}, f"network:{n.name}") for n in self.client.networks.list(filters=flt)]
        for labels, name in found:
            entry = runs.setdefault(labels[RUN_LABEL], {"objects": [], "supervisor": None})
            entry["objects"].append(name)
            entry["supervisor"] = entry["supervisor"] or labels.get(SUPERVISOR_LABEL)
        return runs

    def image_info(self, image: str) -> dict[str, Any]:
        img = self.client.images.get(image)
        return {"ref": image, "id": img.id, "digests": img.attrs.get("RepoDigests", []), "labels": img.labels}
