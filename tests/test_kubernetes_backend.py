"""The Kubernetes backend's logic (backend/kubernetes/backend.py) against a fake of the cluster calls it makes,
answering with the official client's models: what is created and in which order, the inputs going in and the
outputs coming back as real tar streams (the fake runs each exec's shell command on a directory standing for the
pod), the go-ahead held and given, stop, teardown and the listing of runs, and the recovery of a run whose
supervisor died through the supervisor's own code. The real cluster is test_kubernetes_e2e.py's."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from kubernetes.client import (
    V1ConfigMap,
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodStatus,
    V1Service,
    V1ServiceSpec,
)

import agent_sandbox.backend.kubernetes.backend as be
from agent_sandbox.backend.base import ROLE_LABEL, RUN_LABEL
from agent_sandbox.backend.kubernetes import forward
from agent_sandbox.backend.kubernetes import manifests as mf
from agent_sandbox.backend.kubernetes.backend import KubernetesBackend
from agent_sandbox.backend.plan import Owner, RunPlan
from agent_sandbox.config.backends import KubernetesConfig
from agent_sandbox.config.policy import Policy
from tests.test_kubernetes_manifests import workloads

RUN_ID = "20250101-120000-abc123"


def _status(name: str, state: str, code: int = 0, reason: str | None = None) -> V1ContainerStatus:
    st = (
        V1ContainerState(running=V1ContainerStateRunning())
        if state == "running"
        else V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=code, reason=reason))
    )
    return V1ContainerStatus(name=name, state=st, image="i", image_id="i", ready=True, restart_count=0)


class FakePod:
    def __init__(self, manifest: dict[str, Any], root: Path) -> None:
        self.manifest = manifest
        self.root = root  # stands for /sandbox-transfer: the pod's volumes, by key (the claim's under claim/)
        self.stage = "running"
        self.main: tuple[str, int, str | None] | None = None
        self.carrier_done = False
        self.logs = b""
        self.relays: list[ProcessStream] = []  # what exec_stream started in it

    def main_path(self, path: str) -> str:
        """A path as the pod's `main` container sees it, on the directory standing for the pod: its volume by the
        mount that holds it (an emptyDir is the pod's directory of that name, the claim the run's volume)."""
        mounts = self.manifest["spec"]["containers"][0]["volumeMounts"]
        for m in sorted(mounts, key=lambda m: -len(m["mountPath"])):
            if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"):
                base = self.root / m["name"] / m.get("subPath", "")
                return str(base) + path[len(m["mountPath"]) :]
        raise AssertionError(f"{path} is in no mount of main")


class ProcessStream:
    """An exec_stream: the command run as a process of this machine, with the pod's directory for TRANSFER."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.lock = threading.Lock()

    def read(self, timeout: float) -> bytes | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return b""
        return os.read(self.proc.stdout.fileno(), 65536) or None

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        with self.lock:
            if self.proc.stdin.closed:
                raise OSError("closed")
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def close(self) -> None:
        with self.lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def error(self) -> str:
        return self.log.read_text(errors="replace")[-300:]


class FakeCluster:
    """The backend's Cluster calls, recorded; pods are directories and their containers' states."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str, str]] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.made: list[dict[str, Any]] = []  # every manifest created, also once deleted
        self.pods: dict[str, FakePod] = {}
        self.execs: list[tuple[str, str, list[str]]] = []
        self.claim = root / "claim"  # the run's volume, shared by the pods that mount it
        # What a workload's `main` does once its stage has ended, by role (returns its exit code); without one it
        # runs until stopped.
        self.programs: dict[str, Callable[[FakePod], int]] = {}
        self.classes: list[str] | None = ["gvisor"]  # the cluster's RuntimeClasses (None: may not list them)

    def create(self, manifest: dict[str, Any]) -> Any:
        kind, name = manifest["kind"].lower(), manifest["metadata"]["name"]
        assert (kind, name) not in self.objects, f"{kind} {name} made twice"
        self.calls.append(("create", kind, name))
        self.objects[(kind, name)] = manifest
        self.made.append(manifest)
        meta = V1ObjectMeta(name=name, uid=f"uid-{name}", labels=manifest["metadata"]["labels"])
        if kind == "pod":
            pod_root = self.root / name
            if pod_root.exists():  # a pod of that name was deleted before: a new pod starts empty
                shutil.rmtree(pod_root)
            pod_root.mkdir()
            (pod_root / mf.CLAIM_VOLUME).symlink_to(self.claim)
            for volume in manifest["spec"]["volumes"]:  # the kubelet makes each emptyDir, empty
                if "emptyDir" in volume and volume["name"] != mf.CONTROL_VOLUME:
                    (pod_root / volume["name"]).mkdir()
            self.claim.mkdir(exist_ok=True)
            self.pods[name] = FakePod(manifest, pod_root)
        if kind == "service":
            return V1Service(metadata=meta, spec=V1ServiceSpec(cluster_ip="10.96.0.42"))
        return V1ConfigMap(metadata=meta)

    def read_pod(self, name: str) -> Any:
        p = self.pods.get(name)
        if p is None:
            return None
        init = [_status(mf.STAGE, "running")] if p.stage == "running" else [_status(mf.STAGE, "done")]
        main = []
        if p.main is not None:
            main = [_status(mf.MAIN, p.main[0], p.main[1], p.main[2])]
        carried = any(c["name"] == mf.CARRIER for c in p.manifest["spec"]["containers"])
        if carried and p.stage == "done":
            main.append(_status(mf.CARRIER, "terminated" if p.carrier_done else "running"))
        return V1Pod(
            metadata=V1ObjectMeta(name=name, annotations=p.manifest["metadata"].get("annotations")),
            status=V1PodStatus(phase="Running", init_container_statuses=init, container_statuses=main),
        )

    def delete(self, kind: str, name: str, grace: int | None = None) -> bool:
        self.calls.append(("delete", kind, name))
        if kind == "pod":
            self.pods.pop(name, None)
        return self.objects.pop((kind, name), None) is not None

    def runtime_classes(self) -> list[str] | None:
        return self.classes

    def select(self, kind: str, selector: str) -> list[Any]:
        key, _, value = selector.partition("=")
        found = []
        for (k, name), m in self.objects.items():
            labels = m["metadata"]["labels"]
            if k == kind and key in labels and (not value or labels[key] == value):
                found.append(V1ConfigMap(metadata=V1ObjectMeta(name=name, uid=f"uid-{name}", labels=labels)))
        return found

    def logs(self, pod: str, container: str) -> Iterator[bytes]:
        yield self.pods[pod].logs

    def exec(
        self,
        pod: str,
        container: str,
        command: list[str],
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
    ) -> tuple[int, str]:
        p = self.pods[pod]
        self.execs.append((pod, container, command))
        if container == mf.STAGE:
            assert p.stage == "running", "exec into a stage container that has ended"
        if command[:4] == ["python3", "-I", "-c", be.ASK_SCRIPT]:  # RunHandle.ask, in the workload's container
            assert container == mf.MAIN and p.main is not None and p.main[0] == "running"
            argv = [sys.executable, "-I", "-c", be.ASK_SCRIPT, p.main_path(command[4]), *command[5:]]
            res = subprocess.run(argv, capture_output=True, timeout=30)
            if stdout is not None:
                stdout.write(res.stdout)
            return res.returncode, res.stderr.decode()
        if command[0] == "python3":  # the confinement probe
            assert container == mf.STAGE and command[-2:] == ["10.96.0.42", "8080"]
            if stdout is not None:
                stdout.write(b"sidecar 10.96.0.42:8080 open\nthe API server 10.96.0.1:443 closed (TimeoutError)\n")
            return 0, ""
        if command[:2] == ["kill", "-TERM"]:
            p.main = ("terminated", 143, None)
            return 0, ""
        assert command[:2] == ["sh", "-c"], command
        script = command[2].replace(mf.TRANSFER, str(p.root))
        res = subprocess.run(["sh", "-c", script], input=stdin.read() if stdin else b"", capture_output=True)
        if stdout is not None:
            stdout.write(res.stdout)
        if (p.root / mf.STAGED).exists() and p.stage == "running":
            p.stage = "done"
            p.main = ("running", 0, None)
            program = self.programs.get(p.manifest["metadata"]["labels"][ROLE_LABEL])
            if program is not None:
                p.main = ("terminated", program(p), None)
        if (p.root / mf.FETCHED).exists():
            p.carrier_done = True
        return res.returncode, res.stderr.decode()

    def exec_stream(self, pod: str, container: str, command: list[str]) -> ProcessStream:
        """The relay, as a process of this machine standing in for the pod's: the sidecar image's interpreter is
        this one, and TRANSFER the pod's directory."""
        p = self.pods[pod]
        self.execs.append((pod, container, command))
        assert container == mf.CARRIER and p.stage == "done" and not p.carrier_done, "the carrier is not running"
        assert command[:3] == [forward.SIDECAR_PYTHON, "-m", forward.RELAY_MODULE], command
        argv = [sys.executable, "-m", forward.RELAY_MODULE, *(a.replace(mf.TRANSFER, str(p.root)) for a in command[3:])]
        stream = ProcessStream(argv, self.root / f"{pod}-relay-{len(p.relays)}.log")
        p.relays.append(stream)
        return stream

    def metrics(self, pod: str) -> dict[str, Any] | None:
        return {"containers": [{"name": mf.MAIN, "usage": {"cpu": "500m", "memory": "64Mi"}}]}


@pytest.fixture
def fake(tmp_path: Path) -> FakeCluster:
    root = tmp_path / "cluster"
    root.mkdir()
    return FakeCluster(root)


def _backend(fake: FakeCluster) -> KubernetesBackend:
    return KubernetesBackend(fake, KubernetesConfig(namespace="sandboxes"))


def _plan() -> RunPlan:
    return RunPlan(run_id=RUN_ID, owner=Owner(state="s1", supervisor="1_2.00"))


def test_a_run_from_prepare_to_teardown(tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    import agent_sandbox.backend.kubernetes.backend as be

    monkeypatch.setattr(be, "POLL", 0.01)
    sidecar, agent, finaliser, _check = workloads(tmp_path, Policy())
    run_dir = tmp_path / "runs" / RUN_ID
    (run_dir / "in" / "task.md").write_text("do it")
    (run_dir / "workspace" / "a.py").write_text("x = 1\n")
    (run_dir / "heartbeat" / "beat").write_text("")
    handle = _backend(fake).open_run(_plan())

    made = handle.prepare()
    assert made == [
        {"name": f"sbx-{RUN_ID}-deny-all", "internal": True},
        {"name": f"sbx-{RUN_ID}-to-sidecar", "internal": True},
    ]
    started = handle.start(sidecar)
    assert started.confinement is None and started.security["secret_env_names"] == ["SANDBOX_UPSTREAM_API_KEY"]
    # The sidecar's policy, Service and Secret exist before its pod; the isolation before anything runs.
    p = f"sbx-{RUN_ID}"
    assert [c[1:] for c in fake.calls] == [
        ("configmap", p),
        ("networkpolicy", f"{p}-deny-all"),
        ("networkpolicy", f"{p}-to-sidecar"),
        ("secret", f"{p}-sidecar-env"),
        ("networkpolicy", f"{p}-sidecar"),
        ("service", f"{p}-sidecar"),
        ("pod", f"{p}-sidecar"),
    ]
    assert fake.objects[("secret", f"{p}-sidecar-env")]["stringData"] == {"SANDBOX_UPSTREAM_API_KEY": "sk-real-key"}
    side = fake.pods[f"{p}-sidecar"]
    assert (side.root / mf.volume_key(str(run_dir / "heartbeat")) / "beat").exists()  # its input went in
    assert side.main == ("running", 0, None)

    # The agent: held at its stage container (confinement checked) until released.
    started = handle.start(agent, hold=True)
    assert started.confinement == ["sidecar 10.96.0.42:8080 open", "the API server 10.96.0.1:443 closed (TimeoutError)"]
    ag = fake.pods[f"{p}-agent"]
    assert fake.objects[("persistentvolumeclaim", f"{p}-run")]
    assert fake.objects[("pod", f"{p}-agent")]["spec"]["hostAliases"] == [
        {"ip": "10.96.0.42", "hostnames": ["sidecar"]}
    ]
    ws_key = mf.volume_key(str(run_dir / "workspace"))
    in_key = mf.volume_key(str(run_dir / "in"))
    assert (fake.claim / ws_key / "a.py").read_text() == "x = 1\n"
    assert (fake.claim / in_key / "task.md").read_text() == "do it"
    assert ag.stage == "running" and not (fake.claim / in_key / "network-ready").exists()
    assert handle.status("agent").running  # on its way
    handle.release("agent")
    assert (fake.claim / in_key / "network-ready").exists() and ag.stage == "done"
    with pytest.raises(RuntimeError, match="go-ahead"):
        handle.release("agent")
    ag.logs = b'{"type":"result"}\n'
    assert b"".join(handle.output("agent")) == b'{"type":"result"}\n'
    assert b"".join(handle.output("agent", stderr=True)) == b""
    sample = next(handle.stats("agent"))
    assert sample["memory"] == 64 * 1024**2 and sample["pids"] == 0

    # The agent's work stays on the run's volume; the finaliser's bundle comes back to the run directory.
    (fake.claim / ws_key / "b.py").write_text("y = 2\n")
    ag.main = ("terminated", 0, None)
    assert handle.wait("agent", 1).exit_code == 0
    handle.start(finaliser)
    fin = fake.pods[f"{p}-finaliser"]
    assert not any(c[0] == f"{p}-finaliser" and c[2][0] == "python3" for c in fake.execs)  # no network to probe
    out_key = mf.volume_key(str(run_dir / "out"))
    (fake.claim / out_key / "result.json").write_text('{"status": "packed"}')
    (fake.claim / out_key / "work.bundle").write_bytes(b"bundle")
    os.symlink("/etc/passwd", fake.claim / out_key / "evil")
    fin.main = ("terminated", 0, None)
    info = handle.wait("finaliser", 1)
    assert info.exit_code == 0 and not info.running
    assert (run_dir / "out" / "result.json").read_text() == '{"status": "packed"}'
    assert (run_dir / "out" / "work.bundle").read_bytes() == b"bundle"
    assert not (run_dir / "out" / "evil").exists()  # links never come back
    assert fin.carrier_done
    assert (run_dir / "workspace" / "b.py").exists() is False  # the working tree is not copied back

    handle.discard("agent", "sidecar", network=True)
    removed = handle.teardown()
    assert set(removed) >= {f"pod:{p}-finaliser", f"networkpolicy:{p}-deny-all", f"configmap:{p}"}
    deletes = [c[1] for c in fake.calls if c[0] == "delete"]
    # Pods go before their network policies, and the anchor last.
    assert max(i for i, k in enumerate(deletes) if k == "pod") < min(
        i for i, k in enumerate(deletes) if k == "networkpolicy"
    )
    assert deletes[-1] == "configmap"
    assert not fake.objects
    assert handle.teardown() == []  # safe to repeat


def test_the_agent_waits_for_the_sidecar_and_a_finaliser_started_ahead_for_its_release(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor begins the agent's start alongside the sidecar's (run/watch.py): its pod waits for the
    sidecar's Service. The finaliser started ahead mounts the run's ReadWriteOnce volume, which the agent's pod
    holds, maybe on another node: its pod is made at its release, whose note reaches its go-ahead."""
    monkeypatch.setattr(be, "POLL", 0.01)
    sidecar, agent, finaliser, _check = workloads(tmp_path, Policy())
    run_dir = tmp_path / "runs" / RUN_ID
    (run_dir / "in" / "task.md").write_text("do it")
    (run_dir / "heartbeat" / "beat").write_text("")
    ahead = finaliser.model_copy(update={"go_ahead": str(run_dir / "in" / "finalise-ready")})
    p = f"sbx-{RUN_ID}"
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    box: dict[str, Any] = {}
    early = threading.Thread(target=lambda: box.setdefault("agent", handle.start(agent, hold=True)))
    early.start()
    early.join(0.5)
    assert early.is_alive() and f"{p}-agent" not in fake.pods  # it waits for the sidecar
    handle.start(sidecar)
    early.join(10)
    assert box["agent"].confinement and fake.objects[("pod", f"{p}-agent")]["spec"]["hostAliases"] == [
        {"ip": "10.96.0.42", "hostnames": ["sidecar"]}
    ]
    handle.release("agent")

    started = handle.start(ahead, hold=True)
    assert f"{p}-finaliser" not in fake.pods and started.security["name"] == f"{p}-finaliser"
    fake.pods[f"{p}-agent"].main = ("terminated", 0, None)
    for bad in ("two words", "x\n", "a" * 33):
        with pytest.raises(ValueError):
            handle.release("finaliser", bad)
    assert f"{p}-finaliser" not in fake.pods
    handle.release("finaliser", "timeout")
    in_key = mf.volume_key(str(run_dir / "in"))
    gates = [d / in_key / "finalise-ready" for d in (fake.claim, fake.pods[f"{p}-finaliser"].root)]
    assert [g.read_text() for g in gates if g.exists()] == ["timeout"]
    assert fake.pods[f"{p}-finaliser"].stage == "done"
    with pytest.raises(RuntimeError, match="go-ahead"):
        handle.release("finaliser")
    handle.teardown()
    assert not fake.objects


def test_an_agent_waiting_for_a_sidecar_that_fails_fails_too(tmp_path: Path, fake: FakeCluster) -> None:
    sidecar, agent, *_ = workloads(tmp_path, Policy())
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    box: dict[str, Any] = {}

    def start_agent() -> None:
        try:
            handle.start(agent, hold=True)
        except RuntimeError as exc:
            box["error"] = str(exc)

    early = threading.Thread(target=start_agent)
    early.start()
    create = fake.create

    def refuse_the_sidecars_pod(obj: dict[str, Any]) -> Any:
        if obj["kind"] == "Pod" and obj["metadata"]["name"].endswith("-sidecar"):
            raise RuntimeError("the cluster refused the pod")
        return create(obj)

    fake.create = refuse_the_sidecars_pod  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="refused"):
        handle.start(sidecar)
    early.join(10)
    assert box["error"].startswith("the sidecar did not start")
    assert f"sbx-{RUN_ID}-agent" not in fake.pods
    handle.teardown()


def test_stop_terms_then_kills_and_keeps_the_exit(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent_sandbox.backend.kubernetes.backend as be

    monkeypatch.setattr(be, "POLL", 0.01)
    sidecar, agent, *_ = workloads(tmp_path, Policy())
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    handle.start(sidecar)
    handle.start(agent)
    handle.stop("agent", 0.1)
    assert handle.status("agent").exit_code == 143
    assert any(c[1] == mf.MAIN and c[2] == ["kill", "-TERM", "1"] for c in fake.execs)


def test_list_runs_and_attach(tmp_path: Path, fake: FakeCluster) -> None:
    backend = _backend(fake)
    handle = backend.open_run(_plan())
    handle.prepare()
    runs = backend.list_runs()
    assert list(runs) == [RUN_ID]
    assert runs[RUN_ID]["supervisor"] == "1_2.00" and runs[RUN_ID]["state"] == "s1"
    assert sorted(runs[RUN_ID]["objects"]) == sorted(
        [f"configmap:sbx-{RUN_ID}", f"networkpolicy:sbx-{RUN_ID}-deny-all", f"networkpolicy:sbx-{RUN_ID}-to-sidecar"]
    )
    assert backend.remove_run(RUN_ID) and backend.list_runs() == {}
    assert fake.select("configmap", RUN_LABEL) == []


# --- a sweep's shared budget: the broker's socket relayed into the sidecar's pod -----------------------------------


@pytest.fixture
def short_fake() -> Iterator[FakeCluster]:
    """A fake cluster in a short directory: the gateway reaches the relayed socket by its path, and a socket's
    address has room for 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    try:
        yield FakeCluster(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def broker() -> Iterator[tuple[Any, Any]]:
    from agent_sandbox.run.budget import SharedBudget

    ledger = SharedBudget(1.0, "sweep")
    # In a directory of its own: a recovery of RUN_ID in a test beside this one removes the run's broker
    # directories it finds in the system's temporary directory (run/budget.py, remove_leftovers).
    home = Path(tempfile.mkdtemp(prefix="k8sb-", dir="/tmp"))
    endpoint = ledger.serve(RUN_ID, directory=home)
    yield ledger, endpoint
    endpoint.close()
    shutil.rmtree(home, ignore_errors=True)


def _with_broker(tmp_path: Path, endpoint: Any) -> Any:
    """The sidecar as a sweep's run plans it: the broker's directory mounted at /sandbox/budget."""
    from agent_sandbox.backend.plan import Mount

    sidecar, *_ = workloads(tmp_path, Policy())
    mount = Mount(source=str(endpoint.path.parent), target="/sandbox/budget")
    return sidecar.model_copy(update={"mounts": [*sidecar.mounts, mount]})


def _gateway(fake: FakeCluster, socket_path: str, events: list[dict[str, Any]]) -> Any:
    """The sidecar's own broker client (Gateway._broker), on the socket where its `main` finds it (by a short
    link to its directory here: the pod's path, /sandbox/budget/broker.sock, is short, the fake's need not be)."""
    from agent_sandbox.sidecar.gateway import Gateway

    link = fake.root / "gw"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(socket_path).parent)
    path = str(link / Path(socket_path).name)
    return Gateway(RUN_ID, "http://127.0.0.1:9", None, 1.0, {}, events.append, broker_socket=path)


REFUSED = {"ok": False, "reason": "the shared budget cannot be reached"}


def test_a_sweeps_budget_reaches_the_sidecars_pod_through_a_relay(
    tmp_path: Path, short_fake: FakeCluster, broker: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's socket, a socket of the supervisor's machine, is relayed into the sidecar's pod: listening
    before `start` returns, where the sidecar's `main` finds it (its read-only mount), for the pod's user alone;
    the gateway's reserves (many at once, and one that waits for room) and settles land in the sweep's ledger;
    and it goes with the run, after which the gateway is refused (fail closed)."""
    import asyncio

    monkeypatch.setattr(be, "POLL", 0.01)
    fake = short_fake
    ledger, endpoint = broker
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    started = handle.start(_with_broker(tmp_path, endpoint))
    assert started.security["relayed_sockets"] == ["/sandbox/budget/broker.sock"]
    pod = fake.pods[f"sbx-{RUN_ID}-sidecar"]
    # The relay runs in the carrier, which has the volume writable; `main` sees it through its read-only mount.
    (relay,) = [e for e in fake.execs if e[2][:1] == [forward.SIDECAR_PYTHON]]
    key = mf.volume_key(str(endpoint.path.parent))
    assert relay[1] == mf.CARRIER and relay[2][3] == f"{mf.TRANSFER}/{key}/broker.sock"
    main = pod.manifest["spec"]["containers"][0]
    assert {"name": key, "mountPath": "/sandbox/budget", "readOnly": True} in main["volumeMounts"]
    in_pod = pod.main_path("/sandbox/budget/broker.sock")
    st = os.lstat(in_pod)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600

    events: list[dict[str, Any]] = []
    gateway = _gateway(fake, in_pod, events)

    async def calls() -> None:
        reserved = await asyncio.gather(
            *(gateway._broker({"op": "reserve", "id": i, "usd": 0.01, "wait": 5}) for i in range(1, 21))
        )
        assert all(r["ok"] for r in reserved), ([r for r in reserved if not r["ok"]], events)
        await asyncio.gather(*(gateway._broker({"op": "settle", "id": i, "usd": 0.01}) for i in range(1, 21)))
        # A reserve without room waits, in the ledger, until the call in flight settles.
        assert (await gateway._broker({"op": "reserve", "id": 100, "usd": 0.5, "wait": 0}))["ok"]
        waiting = asyncio.create_task(gateway._broker({"op": "reserve", "id": 101, "usd": 0.6, "wait": 5}))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert (await gateway._broker({"op": "settle", "id": 100, "usd": 0.1}))["ok"]
        assert (await waiting)["ok"]

    asyncio.run(calls())
    assert ledger.spent_usd == pytest.approx(0.3) and list(ledger._reserved) == [(RUN_ID, 101)]
    assert events == []

    handle.teardown()
    assert [r.proc.poll() for r in pod.relays] == [0]  # told to end, it ended
    assert not os.path.exists(in_pod)
    assert asyncio.run(gateway._broker({"op": "reserve", "id": 102, "usd": 0.01, "wait": 0})) == REFUSED
    assert events[-1]["event"] == "model_call_failed" and events[-1]["path"] == "budget-broker"


@pytest.mark.parametrize("how", ["wait", "discard", "remove_workloads"])
def test_the_relay_ends_with_its_pod(
    tmp_path: Path, short_fake: FakeCluster, broker: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(be, "POLL", 0.01)
    fake = short_fake
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    handle.start(_with_broker(tmp_path, broker[1]))
    pod = fake.pods[f"sbx-{RUN_ID}-sidecar"]
    in_pod = pod.main_path("/sandbox/budget/broker.sock")
    if how == "wait":  # the sidecar ended: its outputs are fetched, and its relays end first
        pod.main = ("terminated", 0, None)
        handle.wait("sidecar", 1)
    elif how == "discard":
        handle.discard("sidecar", network=True)
        handle._discards[-1].join(10)
    else:
        handle.remove_workloads()
    assert [r.proc.poll() for r in pod.relays] == [0]
    assert not os.path.exists(in_pod)
    handle.teardown()


def test_a_broken_relay_is_started_again_and_fails_closed_meanwhile(
    tmp_path: Path,
    short_fake: FakeCluster,
    broker: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The exec stream breaks (the API server restarts, the connection drops): one warning says so, the gateway's
    calls meanwhile are refused, and a new relay in the pod carries the next ones."""
    import asyncio
    import logging
    import time

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(be, "POLL", 0.01)
    monkeypatch.setattr(be, "RELAY_BACKOFF", 0.3)
    fake = short_fake
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    handle.start(_with_broker(tmp_path, broker[1]))
    pod = fake.pods[f"sbx-{RUN_ID}-sidecar"]
    events: list[dict[str, Any]] = []
    gateway = _gateway(fake, pod.main_path("/sandbox/budget/broker.sock"), events)
    assert asyncio.run(gateway._broker({"op": "reserve", "id": 1, "usd": 0.1, "wait": 0}))["ok"]
    pod.relays[0].proc.kill()

    def lines(prefix: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith(prefix)]

    deadline = time.monotonic() + 5
    while not lines("socket_relay_ended") and time.monotonic() < deadline:
        time.sleep(0.02)
    (line,) = lines("socket_relay_ended")
    msg = line.getMessage()
    assert line.levelno == logging.WARNING
    assert "reason=the relay's stream ended" in msg or "reason=the stream failed" in msg, msg
    # Before the new relay: no answer is a refusal.
    assert asyncio.run(gateway._broker({"op": "reserve", "id": 2, "usd": 0.1, "wait": 0})) == REFUSED
    deadline = time.monotonic() + 10
    while not lines("socket_relay_restarted") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(lines("socket_relay_restarted")) == 1 and len(pod.relays) == 2
    assert asyncio.run(gateway._broker({"op": "reserve", "id": 3, "usd": 0.1, "wait": 0}))["ok"]
    handle.teardown()
    assert [r.proc.poll() for r in pod.relays][1] == 0  # told to end, the new one ended
    time.sleep(0.5)
    assert len(lines("socket_relay_restarted")) == 1  # nothing started again after the teardown


def test_a_relay_that_keeps_breaking_is_given_up_and_stays_closed(
    tmp_path: Path,
    short_fake: FakeCluster,
    broker: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio
    import logging
    import time

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(be, "POLL", 0.01)
    monkeypatch.setattr(be, "RELAY_BACKOFF", 0.05)
    monkeypatch.setattr(be, "RELAY_RESTARTS", 2)
    fake = short_fake
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    handle.start(_with_broker(tmp_path, broker[1]))
    pod = fake.pods[f"sbx-{RUN_ID}-sidecar"]
    gateway = _gateway(fake, pod.main_path("/sandbox/budget/broker.sock"), [])

    def broken(*_: Any) -> Any:
        raise OSError("the API server is gone")

    fake.exec_stream = broken  # type: ignore[method-assign]
    pod.relays[0].proc.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        r.getMessage().startswith("socket_relay_abandoned") for r in caplog.records
    ):
        time.sleep(0.02)
    failed = [r for r in caplog.records if r.getMessage().startswith("socket_relay_restart_failed")]
    assert len(failed) == 2 and all(r.levelno == logging.WARNING for r in failed)
    assert any(r.getMessage().startswith("socket_relay_abandoned") for r in caplog.records)
    assert asyncio.run(gateway._broker({"op": "reserve", "id": 2, "usd": 0.1, "wait": 0})) == REFUSED
    handle.teardown()


def test_a_relay_that_does_not_start_fails_the_sidecars_start(
    tmp_path: Path, short_fake: FakeCluster, broker: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent_sandbox.backend.kubernetes.forward import RelayFailed

    monkeypatch.setattr(be, "POLL", 0.01)
    fake = short_fake
    real = fake.exec_stream

    def broken(pod: str, container: str, command: list[str]) -> ProcessStream:
        stream = real(pod, container, command)
        stream.proc.kill()  # as when the image has no relay: the stream ends before READY
        return stream

    monkeypatch.setattr(fake, "exec_stream", broken)
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    with pytest.raises(RelayFailed, match="did not start"):
        handle.start(_with_broker(tmp_path, broker[1]))
    handle.teardown()
    assert not fake.objects


def test_a_socket_is_relayed_into_the_sidecars_pod_alone(tmp_path: Path, fake: FakeCluster) -> None:
    """A socket in a mount of the agent's workloads would be on the run's volume, which they share: refused
    before anything of the workload is made."""
    import socket

    from agent_sandbox.backend.plan import Mount
    from agent_sandbox.sidecar.relay import listen_unix

    sidecar, agent, *_ = workloads(tmp_path, Policy())
    sock_dir = tmp_path / "sockets"
    sock_dir.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_dir / "b.sock"))
    # A socket left in a writable mount (the sidecar's output directory) is the workload's own: not relayed.
    stale, _ = listen_unix(str(tmp_path / "runs" / RUN_ID / "model" / "control.sock"), 1)
    try:
        handle = _backend(fake).open_run(_plan())
        handle.prepare()
        assert "relayed_sockets" not in handle.start(sidecar).security
        assert not [e for e in fake.execs if e[2][:1] == [forward.SIDECAR_PYTHON]]
        w = agent.model_copy(update={"mounts": [*agent.mounts, Mount(source=str(sock_dir), target="/sandbox/b")]})
        made = len(fake.made)
        with pytest.raises(RuntimeError, match="only the sidecar's pod"):
            handle.start(w)
        assert len(fake.made) == made
    finally:
        s.close()
        stale.close()


# --- RunHandle.ask: one line to a socket in a workload's pod (the gateway's settle) ------------------------------


def test_ask_reaches_a_socket_in_the_sidecars_pod(
    tmp_path: Path, short_fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    monkeypatch.setattr(be, "POLL", 0.01)
    fake = short_fake
    sidecar, *_ = workloads(tmp_path, Policy())
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    assert handle.ask("sidecar", "/sandbox/model-out/control.sock", b"t\n", 1) is None  # no such pod yet
    handle.start(sidecar)
    pod = fake.pods[f"sbx-{RUN_ID}-sidecar"]
    assert handle.ask("sidecar", "/sandbox/model-out/control.sock", b"t\n", 1) is None  # nothing listens
    path = pod.main_path("/sandbox/model-out/control.sock")
    got: list[bytes] = []
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def settle() -> None:  # as the sidecar's settle_on_request: one line in, `ok` out
        conn, _ = server.accept()
        with conn:
            got.append(conn.makefile("rb").readline())
            conn.sendall(b"ok\n")

    t = threading.Thread(target=settle)
    t.start()
    assert handle.ask("sidecar", "/sandbox/model-out/control.sock", b"token-1\n", 3) == b"ok\n"
    t.join(5)
    server.close()
    assert got == [b"token-1\n"]
    # Through `exec` in the sidecar's own container, the one whose mount holds the socket.
    (asked,) = [e for e in fake.execs if e[2][:4] == ["python3", "-I", "-c", be.ASK_SCRIPT] and "746f6b" in e[2][5]]
    assert asked[1] == mf.MAIN and asked[2][4:] == ["/sandbox/model-out/control.sock", b"token-1\n".hex(), "3", "4096"]
    pod.main = ("terminated", 0, None)
    assert handle.ask("sidecar", "/sandbox/model-out/control.sock", b"t\n", 1) is None  # it has ended
    handle.teardown()


def test_images_must_be_named_and_policy_extensions_are_refused() -> None:
    from agent_sandbox.errors import EnvironmentNotReady

    backend = KubernetesBackend(FakeCluster(Path("/nonexistent")), KubernetesConfig())
    with pytest.raises(EnvironmentNotReady, match="registry"):
        backend.images()
    named = KubernetesBackend(
        FakeCluster(Path("/nonexistent")), KubernetesConfig(images={"agent": "r/a:1", "sidecar": "r/s:1"})
    )
    assert named.images().agent == "r/a:1"
    with pytest.raises(EnvironmentNotReady, match="extends the agent image"):
        named.images(Policy.model_validate({"image": {"packages": ["jq"]}}))


def test_a_runtime_class_the_cluster_lacks_refuses_the_run_before_anything_is_made(tmp_path: Path) -> None:
    from agent_sandbox.errors import EnvironmentNotReady

    fake = FakeCluster(tmp_path)
    images = {"agent": "r/a:1", "sidecar": "r/s:1"}
    backend = KubernetesBackend(fake, KubernetesConfig(images=images))
    assert backend.images(Policy.model_validate({"agent": {"runtime": "gvisor"}})).agent == "r/a:1"
    with pytest.raises(EnvironmentNotReady, match="RuntimeClass 'kata'; this cluster has gvisor"):
        backend.images(Policy.model_validate({"agent": {"runtime": "kata"}}))
    with pytest.raises(EnvironmentNotReady, match="RuntimeClass 'kata'"):
        KubernetesBackend(fake, KubernetesConfig(images=images, runtime_class="kata")).images(Policy())
    # A supervisor whose role may not list RuntimeClasses leaves the decision to the API server.
    fake.classes = None
    assert backend.images(Policy.model_validate({"agent": {"runtime": "kata"}})).sidecar == "r/s:1"
    assert fake.calls == [], "nothing was made"


# --- recovery: a run whose supervisor died ------------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@e",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@e",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "PATH": "/usr/bin:/bin",
}


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, env={**GIT_ENV, **(env or {})}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _orphaned_run(tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Path]]:
    """A run as its supervisor left it when it was killed mid-run: its directory (spec, trail, the host's checkout,
    which holds none of the agent's work), and on the cluster its anchor, isolation, sidecar and agent, the agent's
    work on the run's volume. Returns the spec and where the volume's directories are."""
    from agent_sandbox.audit.log import AuditLog
    from agent_sandbox.audit.redact import Redactor
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.git.checkout import open_repo
    from agent_sandbox.run import quota, workspace
    from agent_sandbox.run.liveness import HEARTBEAT_DIR, state_id
    from agent_sandbox.run.spec import RunSpec
    from agent_sandbox.run.workloads import Recipes, Users
    from agent_sandbox.sidecar.config import SidecarConfig
    from tests.memory_backend import READY

    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_DISK_QUOTA", "sampled")
    monkeypatch.setenv("SANDBOX_WORKSPACE", "copy")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "a.py").write_text("a = 1\n")
    (repo / "c.py").write_text("c = 3\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")
    base = _git(repo, "rev-parse", "HEAD")
    run_dir = tmp_path / "state" / "runs" / RUN_ID
    spec = RunSpec(
        run_id=RUN_ID,
        repo=str(repo),
        base_ref="main",
        base_commit=base,
        branch=f"sandbox/{RUN_ID}",
        task="do it",
        policy=Policy(),
        policy_source="test",
        model="claude-sonnet-4-5",
        run_dir=str(run_dir),
    )
    for sub in ("in", "out", "model", HEARTBEAT_DIR):
        (run_dir / sub).mkdir(parents=True)
    (run_dir / "in" / "task.md").write_text(spec.task)
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    AuditLog(run_dir / "audit.jsonl", RUN_ID, Redactor([])).close()
    host = open_repo(repo)
    workspace.prepare(run_dir, host, base, spec.branch, quota.plan(run_dir.parent, spec.policy.limits.disk_bytes), None)

    recipes = Recipes(spec, ImageSet(agent="r/agent:1", sidecar="r/sidecar:1"), run_dir, host.objects, Users.here())
    config = SidecarConfig(run_id=RUN_ID, upstream_url="https://api.anthropic.com", budget_usd=1.0)
    owner = Owner(state=state_id(tmp_path / "state"), supervisor="1_2.00")
    dead = _backend(fake).open_run(RunPlan(run_id=RUN_ID, owner=owner))
    dead.prepare()
    dead.start(recipes.sidecar(config, "sk-real-key", []))
    dead.start(recipes.agent(600))
    p = f"sbx-{RUN_ID}"
    fake.pods[f"{p}-sidecar"].logs = (json.dumps(READY) + "\n").encode()
    fake.pods[f"{p}-agent"].logs = b'{"type":"system","subtype":"init"}\n'
    where = {
        "workspace": fake.claim / mf.volume_key(str(run_dir / "workspace")),
        "objects": fake.claim / mf.volume_key(str(host.objects)),
        "out": fake.claim / mf.volume_key(str(run_dir / "out")),
    }
    # The agent's work, on the run's volume only: a change, a new file, a file removed.
    (where["workspace"] / "a.py").write_text("a = 2\n")
    (where["workspace"] / "b.py").write_text("b = 2\n")
    (where["workspace"] / "c.py").unlink()
    # Then the supervisor is killed: its threads end with it, and nothing of the run is removed.
    for pod in dead._pods.values():
        pod.mirror_stop.set()
    return spec, where


def _finaliser(where: dict[str, Path], spec: Any) -> Callable[[FakePod], int]:
    """What sandbox/finalize.sh does, on the pod's view of the run's volume: commit what is there, bundle the branch."""

    def run(pod: FakePod) -> int:
        claim = pod.root / mf.CLAIM_VOLUME
        ws, out = claim / where["workspace"].name, claim / where["out"].name
        # The pod sees the host's objects where the checkout's alternates say, on the volume.
        (ws / ".git" / "objects" / "info" / "alternates").write_text(f"{claim / where['objects'].name}\n")
        _git(ws, "add", "-A")
        _git(ws, "commit", "-q", "-m", f"sandbox: work of {spec.run_id} (interrupted)")
        head = _git(ws, "rev-parse", "HEAD")
        _git(ws, "bundle", "create", "-q", str(out / "work.bundle"), spec.branch, f"^{spec.base_commit}")
        result = {"status": "packed", "head": head, "finaliser_commit": head, "bundle": "work.bundle", "detail": ""}
        (out / "result.json").write_text(json.dumps(result))
        return 0

    return run


def test_recovery_packs_the_work_on_the_runs_volume_and_leaves_nothing(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent_sandbox.backend.kubernetes.backend as be
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.run.supervisor import Supervisor

    monkeypatch.setattr(be, "POLL", 0.01)
    spec, where = _orphaned_run(tmp_path, fake, monkeypatch)
    run_dir = Path(spec.run_dir)
    p = f"sbx-{RUN_ID}"
    # A finaliser of the dead supervisor's got as far as a result, which must not be read back as this one's.
    where["out"].mkdir()
    (where["out"] / "result.json").write_text('{"status": "unchanged"}')
    (where["out"] / "stale").write_text("x")
    (fake.claim / f".uploaded-{where['out'].name}").write_text("")
    fake.programs["finaliser"] = _finaliser(where, spec)
    calls_before = len(fake.calls)

    # `sandbox gc`'s path: a supervisor for the run, on a backend of its own, recovers it.
    backend = _backend(fake)
    sup = Supervisor.for_recovery(run_dir, backend, ImageSet(agent="r/agent:1", sidecar="r/sidecar:1"), None)
    summary = sup.recover("its supervisor (pid 1) died before the run ended", "test")

    assert summary.branch == spec.branch and "its work is on" in summary.message, summary.message
    repo = Path(spec.repo)
    assert _git(repo, "show", f"{spec.branch}:a.py") == "a = 2"
    assert _git(repo, "show", f"{spec.branch}:b.py") == "b = 2"
    assert "c.py" not in _git(repo, "ls-tree", "--name-only", spec.branch).split()
    # Nothing of the run is left on the cluster, nor its checkout on this machine.
    assert not fake.objects and not fake.pods
    assert not (run_dir / "workspace").exists()
    assert not (run_dir / "out" / "stale").exists()

    calls = fake.calls[calls_before:]
    # The workloads went first; the anchor, the volume and the isolation stayed for the finaliser, made under the
    # same anchor (nothing of the run made twice), and went only after it.
    finaliser = calls.index(("create", "pod", f"{p}-finaliser"))
    assert [c for c in calls[:finaliser] if c[0] == "create"] == []
    assert {c[1:] for c in calls[:finaliser] if c[0] == "delete"} == {
        ("pod", f"{p}-sidecar"),
        ("pod", f"{p}-agent"),
        ("service", f"{p}-sidecar"),
        ("secret", f"{p}-sidecar-env"),
        ("networkpolicy", f"{p}-sidecar"),
    }
    assert calls.index(("delete", "persistentvolumeclaim", f"{p}-run")) > finaliser
    assert calls[-1] == ("delete", "configmap", p)
    fin_pod = next(m for m in fake.made if m["metadata"]["name"] == f"{p}-finaliser")
    assert fin_pod["metadata"]["ownerReferences"][0]["uid"] == f"uid-{p}"
    # The working tree (with the agent's work), the objects and the inputs were not uploaded again.
    fin_execs = [c[2] for c in fake.execs if c[0] == f"{p}-finaliser" and c[1] == mf.STAGE]
    assert any(where["workspace"].name in " ".join(cmd) and "echo" in " ".join(cmd) for cmd in fin_execs)

    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    recovery = next(e for e in events if e["type"] == "recovery")
    assert recovery["payload"]["agent_lines"] == 1 and recovery["payload"]["gateway_lines"] == 1
    assert [e["payload"]["role"] for e in events if e["type"] == "container_created"] == ["finaliser"]
    assert next(e for e in events if e["type"] == "imported")["payload"]["branch"] == spec.branch
    assert not [e for e in events if e["type"] == "invalid_event"]


def test_a_run_taken_over_keeps_only_what_was_uploaded_whole(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent_sandbox.backend.kubernetes.backend as be

    monkeypatch.setattr(be, "POLL", 0.01)
    sidecar, agent, finaliser, _check = workloads(tmp_path, Policy())
    run_dir = tmp_path / "runs" / RUN_ID
    (run_dir / "in" / "task.md").write_text("do it")
    (run_dir / "workspace" / "a.py").write_text("x = 1\n")
    dead = _backend(fake).open_run(_plan())
    dead.prepare()
    dead.start(sidecar)
    dead.start(agent)
    for pod in dead._pods.values():
        pod.mirror_stop.set()
    ws_key, in_key = mf.volume_key(str(run_dir / "workspace")), mf.volume_key(str(run_dir / "in"))
    (fake.claim / ws_key / "a.py").write_text("x = 2\n")  # the agent's work
    # As if the upload of the inputs had been cut short: no marker, and half of it there.
    (fake.claim / f".uploaded-{in_key}").unlink()
    (fake.claim / in_key / "task.md").unlink()
    (fake.claim / in_key / "half").write_text("")

    handle = _backend(fake).open_run(RunPlan(run_id=RUN_ID, owner=Owner(state="s1", supervisor="3_4.00")))
    p = f"sbx-{RUN_ID}"
    assert sorted(handle.remove_workloads()) == [
        f"networkpolicy:{p}-sidecar",
        f"pod:{p}-agent",
        f"pod:{p}-sidecar",
        f"secret:{p}-sidecar-env",
        f"service:{p}-sidecar",
    ]
    # What holds the work and what the next pod needs stays: the anchor, its isolation, the volume.
    assert sorted(name for _, name in fake.objects) == [p, f"{p}-deny-all", f"{p}-run", f"{p}-to-sidecar"]
    handle.start(finaliser)
    assert (fake.claim / ws_key / "a.py").read_text() == "x = 2\n"  # kept: uploaded whole, then worked on
    assert (fake.claim / in_key / "task.md").read_text() == "do it"  # uploaded again
    assert not (fake.claim / in_key / "half").exists()
    assert handle.teardown() and not fake.objects


def test_a_run_taken_over_before_it_had_an_anchor_gets_one(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor died before `prepare`: the recovery's finaliser still runs under an anchor, denied every
    network, on a new volume holding the host's checkout."""
    import agent_sandbox.backend.kubernetes.backend as be

    monkeypatch.setattr(be, "POLL", 0.01)
    _sidecar, _agent, finaliser, _check = workloads(tmp_path, Policy())
    run_dir = tmp_path / "runs" / RUN_ID
    (run_dir / "workspace" / "a.py").write_text("x = 1\n")
    handle = _backend(fake).open_run(_plan())
    assert handle.remove_workloads() == []
    handle.start(finaliser)
    p = f"sbx-{RUN_ID}"
    assert [c[1:] for c in fake.calls if c[0] == "create"] == [
        ("configmap", p),
        ("networkpolicy", f"{p}-deny-all"),
        ("networkpolicy", f"{p}-to-sidecar"),
        ("persistentvolumeclaim", f"{p}-run"),
        ("pod", f"{p}-finaliser"),
    ]
    assert (fake.claim / mf.volume_key(str(run_dir / "workspace")) / "a.py").read_text() == "x = 1\n"
    handle.teardown()
    assert not fake.objects


# --- keeping the work: gc without images, --keep and a failed import -----------------------------------------


def _store_row(spec: Any) -> Any:
    from agent_sandbox.store import RunStore

    store = RunStore()
    store.run_started(
        {
            "id": spec.run_id,
            "repo": spec.repo,
            "base_commit": spec.base_commit,
            "branch": spec.branch,
            "task": "do it",
            "policy": "default",
            "policy_sha256": "x",
            "status": "running",
            "started_at": 1.0,
            "run_dir": spec.run_dir,
            "supervisor_pid": 1,
        }
    )
    return store


def test_gc_without_images_keeps_the_runs_volume_and_a_later_gc_imports_it(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent_sandbox.backend.kubernetes.backend as be
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.run import orphans

    monkeypatch.setattr(be, "POLL", 0.01)
    spec, where = _orphaned_run(tmp_path, fake, monkeypatch)
    fake.programs["finaliser"] = _finaliser(where, spec)
    store = _store_row(spec)
    backend = _backend(fake)
    p = f"sbx-{RUN_ID}"

    for _ in range(2):  # and again: nothing more goes
        done = orphans.collect(backend, store, None)
        assert [(r.run_id, r.action) for r in done] == [(RUN_ID, "skipped")]
        assert "what holds its work kept" in done[0].detail and "waits for the images" in done[0].detail
        # Nothing of the run runs any more; the volume with the agent's work, its anchor and isolation stay.
        assert not fake.pods
        assert sorted(name for _, name in fake.objects) == [p, f"{p}-deny-all", f"{p}-run", f"{p}-to-sidecar"]
        assert (where["workspace"] / "b.py").read_text() == "b = 2\n"
    assert store.get(RUN_ID)["status"] == "running"

    done = orphans.collect(backend, store, ImageSet(agent="r/agent:1", sidecar="r/sidecar:1"))
    assert [(r.run_id, r.action) for r in done] == [(RUN_ID, "recovered")], done[0].detail
    repo = Path(spec.repo)
    assert _git(repo, "show", f"{spec.branch}:a.py") == "a = 2"
    assert _git(repo, "show", f"{spec.branch}:b.py") == "b = 2"
    assert "c.py" not in _git(repo, "ls-tree", "--name-only", spec.branch).split()
    assert not fake.objects and not fake.pods
    assert store.get(RUN_ID)["status"] != "running"


def test_keep_work_fetches_the_working_tree_from_the_runs_volume(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent_sandbox.backend.kubernetes.backend as be

    monkeypatch.setattr(be, "POLL", 0.01)
    sidecar, agent, _finaliser_w, _check = workloads(tmp_path, Policy())
    run_dir = tmp_path / "runs" / RUN_ID
    ws = run_dir / "workspace"
    (ws / "a.py").write_text("x = 1\n")
    (ws / "gone.py").write_text("")
    (ws / ".git").mkdir()
    (ws / ".git" / "HEAD").write_text("ref: refs/heads/old\n")
    handle = _backend(fake).open_run(_plan())
    handle.prepare()
    assert handle.keep_work(ws) is None and (ws / "gone.py").exists()  # nothing on a volume yet: nothing to do
    handle.start(sidecar)
    handle.start(agent)
    on_claim = fake.claim / mf.volume_key(str(ws))
    # The agent's work: a change, a new executable, a file removed, links inside and out, a new HEAD.
    (on_claim / "a.py").write_text("x = 2\n")
    (on_claim / "run.sh").write_text("#!/bin/sh\n")
    (on_claim / "run.sh").chmod(0o755)
    (on_claim / "gone.py").unlink()
    (on_claim / "sub").mkdir()
    (on_claim / "sub" / "link").symlink_to("../a.py")
    (on_claim / "out").symlink_to(tmp_path / "outside")
    (on_claim / ".git" / "HEAD").write_text("ref: refs/heads/sandbox/x\n")
    fake.pods[f"sbx-{RUN_ID}-agent"].main = ("terminated", 0, None)
    handle.wait("agent", 1)

    handle.keep_work(ws)
    assert (ws / "a.py").read_text() == "x = 2\n"
    assert os.access(ws / "run.sh", os.X_OK) and not os.access(ws / "a.py", os.X_OK)
    assert not (ws / "gone.py").exists()
    assert os.readlink(ws / "sub" / "link") == "../a.py" and (ws / "sub" / "link").read_text() == "x = 2\n"
    assert os.readlink(ws / "out") == str(tmp_path / "outside") and not (tmp_path / "outside").exists()
    assert (ws / ".git" / "HEAD").read_text() == "ref: refs/heads/sandbox/x\n"
    assert not list(run_dir.glob(".workspace*"))
    # Read by a pod of its own that never ran anything, denied every network, and gone once read.
    keeper = next(m for m in fake.made if m["metadata"]["name"] == f"sbx-{RUN_ID}-keeper")
    assert keeper["metadata"]["labels"][mf.REACH_LABEL] == "nothing"
    assert not any(c[0] == f"sbx-{RUN_ID}-keeper" and c[1] == mf.MAIN for c in fake.execs)
    assert f"sbx-{RUN_ID}-keeper" not in fake.pods
    handle.teardown()
    assert not fake.objects


def test_a_tree_cannot_write_through_its_own_links(tmp_path: Path) -> None:
    import io
    import tarfile

    from agent_sandbox.backend.kubernetes import transfer

    vol = mf.Volume(
        key="ws-1",
        source="/x",
        target="/w",
        read_only=False,
        file=False,
        on_claim=True,
        upload=False,
        download=True,
        live=False,
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, target in (
            (f"{mf.CLAIM_VOLUME}/ws-1/esc", str(tmp_path / "victim")),
            (f"{mf.CLAIM_VOLUME}/ws-1/up", ".."),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name in (f"{mf.CLAIM_VOLUME}/ws-1/esc/x", f"{mf.CLAIM_VOLUME}/ws-1/up/y", f"{mf.CLAIM_VOLUME}/ws-1/ok"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        info = tarfile.TarInfo(f"{mf.CLAIM_VOLUME}/ws-1/up/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    (tmp_path / "victim").mkdir()
    dest = tmp_path / "run" / "workspace"
    dest.mkdir(parents=True)
    buf.seek(0)
    transfer.replace_tree(buf, vol, dest, 1 << 20)
    assert sorted(p.name for p in dest.iterdir()) == ["esc", "ok", "up"]
    assert not list((tmp_path / "victim").iterdir())
    assert not (tmp_path / "run" / "y").exists() and not (tmp_path / "run" / "link").exists()
    # Too much: refused, and the workspace stays as it was.
    buf.seek(0)
    with pytest.raises(transfer.TooLarge):
        transfer.replace_tree(buf, vol, dest, 1)
    assert (dest / "ok").read_bytes() == b"hi"


def test_work_not_imported_is_kept_from_the_volume_and_a_later_gc_imports_it(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovery whose finaliser fails keeps the work: the working tree comes home from the run's volume before
    teardown deletes it, and the next recovery packs that (not the host's stale checkout)."""
    import agent_sandbox.backend.kubernetes.backend as be
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.run.supervisor import Supervisor

    monkeypatch.setattr(be, "POLL", 0.01)
    spec, where = _orphaned_run(tmp_path, fake, monkeypatch)
    run_dir = Path(spec.run_dir)
    images = ImageSet(agent="r/agent:1", sidecar="r/sidecar:1")
    fake.programs["finaliser"] = lambda pod: 1  # wrote no result
    summary = Supervisor.for_recovery(run_dir, _backend(fake), images, None).recover("died", "test")
    assert summary.kept and summary.branch is None, summary.message
    assert not fake.objects and not fake.pods  # the volume went, once its working tree was home
    assert (run_dir / "workspace" / "b.py").read_text() == "b = 2\n"
    assert not (run_dir / "workspace" / "c.py").exists()

    fake.programs["finaliser"] = _finaliser(where, spec)
    summary = Supervisor.for_recovery(run_dir, _backend(fake), images, None).recover("its work waited", "test")
    assert summary.branch == spec.branch and not summary.kept, summary.message
    repo = Path(spec.repo)
    assert _git(repo, "show", f"{spec.branch}:a.py") == "a = 2"
    assert _git(repo, "show", f"{spec.branch}:b.py") == "b = 2"
    assert "c.py" not in _git(repo, "ls-tree", "--name-only", spec.branch).split()
    assert not fake.objects


def test_work_that_cannot_be_fetched_keeps_the_runs_volume(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent_sandbox.backend.kubernetes.backend as be
    from agent_sandbox.backend.kubernetes import transfer
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.run.supervisor import Supervisor

    monkeypatch.setattr(be, "POLL", 0.01)
    spec, where = _orphaned_run(tmp_path, fake, monkeypatch)
    run_dir = Path(spec.run_dir)
    images = ImageSet(agent="r/agent:1", sidecar="r/sidecar:1")
    fake.programs["finaliser"] = lambda pod: 1

    def too_large(*args: Any) -> list[str]:
        raise transfer.TooLarge("the outputs exceed 1 bytes")

    monkeypatch.setattr(transfer, "replace_tree", too_large)
    summary = Supervisor.for_recovery(run_dir, _backend(fake), images, None).recover("died", "test")
    assert summary.kept and summary.branch is None
    p = f"sbx-{RUN_ID}"
    assert sorted(name for _, name in fake.objects) == [p, f"{p}-deny-all", f"{p}-run", f"{p}-to-sidecar"]
    assert not (run_dir / "workspace" / "b.py").exists()  # the host's checkout, as it was

    monkeypatch.undo()
    monkeypatch.setattr(be, "POLL", 0.01)
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SANDBOX_DISK_QUOTA", "sampled")
    monkeypatch.setenv("SANDBOX_WORKSPACE", "copy")
    fake.programs["finaliser"] = _finaliser(where, spec)
    summary = Supervisor.for_recovery(run_dir, _backend(fake), images, None).recover("its work waited", "test")
    assert summary.branch == spec.branch, summary.message
    assert _git(Path(spec.repo), "show", f"{spec.branch}:b.py") == "b = 2"
    assert not fake.objects


# --- the sidecar's own records, fetched from its pod in a recovery -----------------------------------------------


def _sidecar_records(fake: FakeCluster, spec: Any) -> None:
    """What the dead supervisor's sidecar wrote into its own directory (an emptyDir of its pod): its numbered
    copy of its lines, with a model call its pod log no longer has, and its transcript."""
    from tests.test_supervisor_logic import _call

    model = fake.pods[f"sbx-{RUN_ID}-sidecar"].root / mf.volume_key(str(Path(spec.run_dir) / "model"))
    model.mkdir(exist_ok=True)
    lines = [json.loads(fake.pods[f"sbx-{RUN_ID}-sidecar"].logs), _call(2, 1, 0.01)]
    (model / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (model / "transcript.jsonl").write_text('{"request": "hello"}\n')


def _recovered(run_dir: Path) -> dict[str, Any]:
    events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["type"] == "invalid_event"]
    return {
        "recovery": next(e for e in events if e["type"] == "recovery")["payload"],
        "calls": [e for e in events if e["type"] == "model_call"],
    }


@pytest.mark.parametrize("via_gc_without_images", [False, True])
def test_a_recovery_fetches_the_sidecars_own_records_from_its_pod(
    tmp_path: Path, fake: FakeCluster, monkeypatch: pytest.MonkeyPatch, via_gc_without_images: bool
) -> None:
    import agent_sandbox.backend.kubernetes.backend as be
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.run import orphans
    from agent_sandbox.run.supervisor import Supervisor

    monkeypatch.setattr(be, "POLL", 0.01)
    spec, where = _orphaned_run(tmp_path, fake, monkeypatch)
    _sidecar_records(fake, spec)
    fake.programs["finaliser"] = _finaliser(where, spec)
    run_dir = Path(spec.run_dir)
    images = ImageSet(agent="r/agent:1", sidecar="r/sidecar:1")
    if via_gc_without_images:  # the pods go then, their records first
        assert orphans.collect(_backend(fake), _store_row(spec), None)[0].action == "skipped"
        assert not fake.pods and (run_dir / "model" / "events.jsonl").is_file()
    summary = Supervisor.for_recovery(run_dir, _backend(fake), images, None).recover("died", "test")

    assert summary.branch == spec.branch, summary.message
    got = _recovered(run_dir)
    assert got["recovery"]["gateway_lines"] == 2 and got["recovery"]["gateway_lines_lost"] == 0
    assert len(got["calls"]) == 1 and summary.model_calls == 1
    # The transcript came home (to be redacted there, as with Docker); the copy of the lines went once the trail
    # had them.
    assert "request" in (run_dir / "model" / "transcript.jsonl").read_text()
    assert not (run_dir / "model" / "events.jsonl").exists()
    assert not fake.objects


def test_a_pods_annotation_cannot_send_its_records_elsewhere(tmp_path: Path) -> None:
    from kubernetes.client import V1ObjectMeta, V1Pod

    from agent_sandbox.backend.kubernetes.backend import _left_outputs

    mine = tmp_path / RUN_ID / "model"
    other = tmp_path / "elsewhere" / "model"
    for d in (mine, other):
        d.mkdir(parents=True)
    (tmp_path / RUN_ID / "link").symlink_to(other)

    def pod(*sources: Path, key: str | None = None) -> V1Pod:
        entries = [{"key": key or mf.volume_key(str(p)), "source": str(p), "on_claim": False} for p in sources]
        return V1Pod(metadata=V1ObjectMeta(annotations={mf.OUTPUTS_ANNOTATION: json.dumps(entries)}))

    assert [v.source for v in _left_outputs(pod(mine), RUN_ID)] == [str(mine)]
    assert _left_outputs(pod(other), RUN_ID) == []  # not this run's
    assert _left_outputs(pod(tmp_path / RUN_ID / "link"), RUN_ID) == []  # through a link
    assert _left_outputs(pod(mine, key="model-00000000"), RUN_ID) == []  # not the key its path hashes to
    assert _left_outputs(V1Pod(metadata=V1ObjectMeta(annotations={mf.OUTPUTS_ANNOTATION: "{"})), RUN_ID) == []
    assert _left_outputs(None, RUN_ID) == []
