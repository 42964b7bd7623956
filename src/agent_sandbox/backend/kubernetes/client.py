"""The backend's calls (backend.Cluster) on the official `kubernetes` client: the only module that imports it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream
from urllib3.exceptions import HTTPError

from agent_sandbox.backend.kubernetes.backend import KUBE_HINT
from agent_sandbox.config.backends import KubernetesConfig
from agent_sandbox.errors import EnvironmentNotReady

CHUNK = 1 << 16


class ClientCluster:
    """One namespace of a cluster, through the official client."""

    def __init__(self, api: kubernetes.client.ApiClient, config: KubernetesConfig) -> None:
        self.api = api
        self.namespace = config.namespace
        self.timeout = config.request_timeout_seconds
        self.core = kubernetes.client.CoreV1Api(api)
        self.net = kubernetes.client.NetworkingV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.node = kubernetes.client.NodeV1Api(api)

    @classmethod
    def connect(cls, config: KubernetesConfig) -> ClientCluster:
        """A client whose API server has answered, or EnvironmentNotReady."""
        try:
            try:
                load: Any = kubernetes.config.load_kube_config  # untyped in the client
                load(config_file=config.kubeconfig, context=config.context)
            except kubernetes.config.ConfigException:
                if config.kubeconfig or config.context:
                    raise
                incluster: Any = kubernetes.config.load_incluster_config
                incluster()
            api = kubernetes.client.ApiClient()
            kubernetes.client.VersionApi(api).get_code(_request_timeout=config.request_timeout_seconds)
        except (kubernetes.config.ConfigException, ApiException, HTTPError, OSError) as exc:
            raise EnvironmentNotReady(
                f"Kubernetes is not reachable: {str(exc).splitlines()[0][:200]}", hint=KUBE_HINT
            ) from None
        return cls(api, config)

    def _calls(self, kind: str) -> tuple[Any, Any, Any]:
        """(create, delete, list) of a kind in the namespace."""
        api = self.net if kind == "networkpolicy" else self.core
        suffix = {
            "pod": "pod",
            "service": "service",
            "secret": "secret",
            "configmap": "config_map",
            "persistentvolumeclaim": "persistent_volume_claim",
            "networkpolicy": "network_policy",
        }[kind]
        return (
            getattr(api, f"create_namespaced_{suffix}"),
            getattr(api, f"delete_namespaced_{suffix}"),
            getattr(api, f"list_namespaced_{suffix}"),
        )

    def create(self, manifest: dict[str, Any]) -> Any:
        create, _, _ = self._calls(manifest["kind"].lower())
        return create(self.namespace, manifest, _request_timeout=self.timeout)

    def read_pod(self, name: str) -> Any:
        try:
            return self.core.read_namespaced_pod(name, self.namespace, _request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, kind: str, name: str, grace: int | None = None) -> bool:
        _, delete, _ = self._calls(kind)
        body = kubernetes.client.V1DeleteOptions(grace_period_seconds=grace, propagation_policy="Background")
        try:
            delete(name, self.namespace, body=body, _request_timeout=self.timeout)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def select(self, kind: str, selector: str) -> list[Any]:
        _, _, list_ = self._calls(kind)
        return list(list_(self.namespace, label_selector=selector, _request_timeout=self.timeout).items)

    def logs(self, pod: str, container: str) -> Iterator[bytes]:
        # With _preload_content=False the client returns the raw response (its annotation says str).
        resp: Any = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=container, follow=True, _preload_content=False
        )
        try:
            yield from resp.stream(CHUNK)
        finally:
            resp.release_conn()

    def exec(
        self,
        pod: str,
        container: str,
        command: list[str],
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> tuple[int, str]:
        ws = stream(
            self.core.connect_get_namespaced_pod_exec,
            pod,
            self.namespace,
            container=container,
            command=command,
            stdin=stdin is not None,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
            binary=True,
        )
        err = bytearray()
        try:
            while stdin is not None and (chunk := stdin.read(CHUNK)):
                ws.write_stdin(chunk)
                self._drain(ws, stdout, err, 0)
            while ws.is_open():
                self._drain(ws, stdout, err, 1)
            rc = ws.returncode
        finally:
            with contextlib.suppress(Exception):
                ws.close()
        return (rc if isinstance(rc, int) else 1), err.decode(errors="replace")

    def exec_stream(self, pod: str, container: str, command: list[str]) -> _ExecStream:
        ws = stream(
            self.core.connect_get_namespaced_pod_exec,
            pod,
            self.namespace,
            container=container,
            command=command,
            stdin=True,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
            binary=True,
        )
        return _ExecStream(ws)

    @staticmethod
    def _drain(ws: Any, stdout: IO[bytes] | None, err: bytearray, timeout: float) -> None:
        ws.update(timeout=timeout)
        if ws.peek_stdout():
            data = ws.read_stdout()
            if stdout is not None:
                stdout.write(data if isinstance(data, bytes) else data.encode())
        if ws.peek_stderr():
            data = ws.read_stderr()
            err.extend(data if isinstance(data, bytes) else data.encode())

    def runtime_classes(self) -> list[str] | None:
        try:
            listed = self.node.list_runtime_class(_request_timeout=self.timeout)
        except ApiException as exc:
            if exc.status in (401, 403):
                return None  # the supervisor's role need not list cluster-scoped objects: the API server decides
            raise
        return sorted(rc.metadata.name for rc in listed.items if rc.metadata is not None and rc.metadata.name)

    def metrics(self, pod: str) -> dict[str, Any] | None:
        try:
            sample = self.custom.get_namespaced_custom_object("metrics.k8s.io", "v1beta1", self.namespace, "pods", pod)
        except ApiException:
            return None
        return sample if isinstance(sample, dict) else None


class _ExecStream:
    """An exec's stdin and stdout kept open (forward.ExecStream). The websocket is used from one thread at a
    time (the client's is not safe otherwise): `read` sends what `write` queued, then waits for stdout in
    short slices, so that a write from another thread goes out within one slice."""

    SLICE = 0.02
    STDERR_KEPT = 4096

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._queued: list[bytes] = []
        self._queue_lock = threading.Lock()
        self._io = threading.RLock()
        self._closed = False
        self._err = bytearray()

    def write(self, data: bytes) -> None:
        with self._queue_lock:
            if self._closed:
                raise OSError("the exec stream is closed")
            self._queued.append(data)

    def _flush(self) -> None:
        with self._queue_lock:
            queued, self._queued = self._queued, []
        for data in queued:
            self.ws.write_stdin(data)

    def read(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._io:
                if self._closed:
                    return None
                self._flush()
                self.ws.update(timeout=max(0.0, min(self.SLICE, deadline - time.monotonic())))
                data = self.ws.read_stdout() if self.ws.peek_stdout() else b""
                if self.ws.peek_stderr():
                    # Kept bounded: what the relay says on stderr is for the log line when it ends.
                    err = self.ws.read_stderr()
                    self._err.extend(err if isinstance(err, bytes) else err.encode())
                    del self._err[: -self.STDERR_KEPT]
                if data:
                    return data if isinstance(data, bytes) else data.encode()
                if not self.ws.is_open():
                    return None
            if time.monotonic() >= deadline:
                return b""

    def close(self) -> None:
        with self._io:
            if self._closed:
                return
            with contextlib.suppress(Exception):
                self._flush()
            with self._queue_lock:
                self._closed = True
            with contextlib.suppress(Exception):
                self.ws.close()

    def error(self) -> str:
        return bytes(self._err).decode(errors="replace")
