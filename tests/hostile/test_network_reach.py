"""Class 1: the agent reaches only the sidecar.

A service on the host listening on all interfaces (TCP and UDP, ephemeral ports, started by the test) is
what the agent goes for: by the host side of its own internal bridge (the network's .1), by the default
bridge's address (docker0), by the host's other addresses, and by 127.0.0.1 (its own loopback), with and
without the proxy variables, through curl, bash's /dev/tcp and Python sockets, and with UDP broadcasts bound
to its interface. Nothing arrives. Its namespace holds one route, to the sidecar, and it still reaches the
model gateway and the allowed test host through the proxy.

Behind the routes, the host firewall drops what comes from a run's internal bridge: shown with a container
that keeps Docker's routes on such a network (the control, a plain internal network without the rules,
reaches the host service: the leak the routes and rules close).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent_sandbox.backend.base import RUN_LABEL, SUPERVISOR_LABEL
from agent_sandbox.backend.docker import DockerBackend, HostFirewall, NetworkSpec
from agent_sandbox.backend.images import require_images
from agent_sandbox.run.liveness import supervisor_identity

from .. import testhosts
from ..conftest import audit_events, labelled, tool_results

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

NAME = "testhost.sandbox.test"
NO_PROXY = "env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy -u ALL_PROXY -u all_proxy"


@dataclass
class HostService:
    """A TCP and a UDP server on 0.0.0.0, recording who reached them."""

    tcp_port: int = 0
    udp_port: int = 0
    tcp_peers: list[str] = field(default_factory=list)
    udp_peers: list[str] = field(default_factory=list)


@pytest.fixture
def host_service() -> Iterator[HostService]:
    svc = HostService()
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 0))
    tcp.listen(16)
    tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    udp.settimeout(0.2)
    svc.tcp_port, svc.udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    stop = threading.Event()

    def serve_tcp() -> None:
        while not stop.is_set():
            try:
                conn, peer = tcp.accept()
            except OSError:
                continue
            svc.tcp_peers.append(peer[0])
            with conn:
                conn.sendall(b"HOST-SERVICE-REACHED\n")

    def serve_udp() -> None:
        while not stop.is_set():
            try:
                _, peer = udp.recvfrom(2048)
            except OSError:
                continue
            svc.udp_peers.append(peer[0])

    threads = [threading.Thread(target=f, daemon=True) for f in (serve_tcp, serve_udp)]
    for t in threads:
        t.start()
    try:
        yield svc
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=2)
        tcp.close()
        udp.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testhosts.TestHosts]:
    yield from testhosts.start(tmp_path_factory.mktemp("testhosts"))


def host_targets() -> dict[str, str]:
    """The host's addresses the agent aims at, besides its own bridge's .1 (found inside the container)."""
    targets = {"docker0": testhosts.bridge_gateway()}
    for name, addrs in psutil.net_if_addrs().items():
        if name == "lo" or name.startswith(("docker", "br-", "veth")):
            continue
        for a in addrs:
            if a.family == socket.AF_INET:
                targets.setdefault(f"host {name}", a.address)
    targets["loopback"] = "127.0.0.1"
    return targets


PROBE = r"""
import ipaddress, json, socket, subprocess, sys
port, udp_port, targets = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
own = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
iface = ipaddress.ip_interface(own.split()[3])
targets = {"internal gateway": str(iface.network[1]), **targets}
out = {"targets": targets, "tcp": {}, "udp": {}}
for label, addr in targets.items():
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((addr, port))
        out["tcp"][label] = "connected: " + s.recv(100).decode(errors="replace")
    except OSError as exc:
        out["tcp"][label] = f"{type(exc).__name__}: {exc}"
    finally:
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for label, addr in [*targets.items(), ("subnet broadcast", str(iface.network.broadcast_address)),
                    ("limited broadcast", "255.255.255.255")]:
    try:
        u.sendto(b"udp from the agent", (addr, udp_port))
        out["udp"][label] = "sent"
    except OSError as exc:
        out["udp"][label] = f"{type(exc).__name__}: {exc}"
try:  # unprivileged since Linux 5.7: a broadcast bound to the interface needs no route
    u.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[4].encode())
    u.sendto(b"udp from the agent", ("255.255.255.255", udp_port))
    out["udp"]["bound broadcast"] = "sent"
except OSError as exc:
    out["udp"]["bound broadcast"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def script(*commands: str) -> str:
    return "turns:\n" + "".join(f"  - bash: {json.dumps(c)}\n" for c in commands) + "  - text: done\n"


# The agent's namespace is cut down by the host's tools through nsenter where the supervisor can (root, a local
# engine), by a helper container otherwise (SANDBOX_ISOLATION=helper forces it): both must hold the same.
@pytest.mark.parametrize("isolation", ["nsenter", "helper"])
def test_the_agent_reaches_the_sidecar_alone(
    isolation, host_service, hosts, make_repo, sandbox, write_script, tmp_path
) -> None:
    port, targets = host_service.tcp_port, host_targets()
    repo = make_repo(files={"probe.py": PROBE, "README.md": "# probe\n"})
    addrs = list(targets.values())
    gw = (
        "$(python3 -c \"import ipaddress,subprocess; o=subprocess.run(['ip','-o','-4','addr','show','scope',"
        "'global'],capture_output=True,text=True).stdout; print(ipaddress.ip_interface(o.split()[3]).network[1])\")"
    )
    per_address = []
    for addr in [gw, *addrs]:
        per_address.append(
            f"a={addr}; echo \"== $a\"; curl -sS -m 5 -i http://$a:{port}/ 2>&1 | grep -iE '^HTTP/|^x-sandbox-egress'; "
            f"{NO_PROXY} curl -sS -m 5 http://$a:{port}/ 2>&1; echo rc=$?; "
            f"timeout 5 bash -c 'exec 3<>/dev/tcp/'$a'/{port} && head -c 40 <&3' 2>&1; echo rc=$?"
        )
    sc = script(
        "ip route; echo ---; ip -4 route show table local; echo ---; getent hosts sidecar; "
        "cat /proc/sys/net/ipv6/conf/all/disable_ipv6",
        f"python3 probe.py {port} {host_service.udp_port} '{json.dumps(targets)}' eth0",
        *per_address,
        # The model gateway and the allowed test host, through the proxy: still there.
        f"{NO_PROXY} curl -sS -m 10 -o /dev/null -w 'gateway %{{http_code}}' http://sidecar:8080/v1/models; echo",
        f"curl -sS -m 10 http://{NAME}:{hosts.http_port}/reach; curl -sSk -m 10 https://{NAME}:{hosts.https_port}/tls",
    )
    pol = tmp_path / "policy.yaml"
    pol.write_text(
        json.dumps(
            {
                "name": "reach",
                "egress": {
                    "allow": [f"{NAME}:{hosts.http_port}", f"{NAME}:{hosts.https_port}"],
                    "allow_private": True,
                    "hosts": {NAME: "host-gateway"},
                },
            }
        )
    )
    res = sandbox(
        "-v",
        "run",
        "--repo",
        str(repo),
        "--task",
        "reach the host",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script(sc)),
        "--json",
        env={"SANDBOX_ISOLATION": isolation},
    )
    assert res.code == 0, res.stderr
    assert "network_isolated container=sbx-" in res.stderr and f"method={isolation} " in res.stderr, res.stderr
    summary = res.json()
    out = tool_results(summary["run_dir"])
    assert len(out) == 4 + len(per_address), out

    # One route, to the sidecar, on-link; no broadcast route on eth0; `sidecar` resolves to that address.
    routes, local, names = out[0].split("---")
    (sidecar_ip,) = [line.split()[0] for line in names.splitlines() if line.strip().endswith("sidecar")]
    assert routes.strip() == f"{sidecar_ip} dev eth0 scope link", routes
    assert "broadcast" not in "\n".join(line for line in local.splitlines() if "dev eth0" in line), local
    (iso,) = [e["payload"] for e in audit_events(summary["run_dir"]) if e["type"] == "network_isolated"]
    assert iso["default_route"] == f"removed; routes left: {sidecar_ip} dev eth0 scope link"

    # Raw sockets: every host address is unreachable at once; loopback is the container's own (refused).
    probed = json.loads(out[1])
    for label, result in probed["tcp"].items():
        if label == "loopback":
            assert result.startswith("ConnectionRefusedError"), (label, result)
        else:
            assert "Network is unreachable" in result, (label, result)
    for label, result in probed["udp"].items():
        if label not in ("loopback", "bound broadcast"):
            assert "Network is unreachable" in result, (label, result)

    # curl with the proxy (403: the host's addresses are refused), without it, and bash's /dev/tcp.
    *remote, loopback = out[2 : 2 + len(per_address)]
    for text in remote:
        assert "HOST-SERVICE-REACHED" not in text, text
        assert "HTTP/1.1 403" in text and "x-sandbox-egress: denied" in text, text  # the proxy refuses it
        assert "bash: connect: Network is unreachable" in text, text  # /dev/tcp: no route
        assert text.count("rc=7") == 1, text  # curl without the proxy: cannot connect
    assert "HOST-SERVICE-REACHED" not in loopback and "Connection refused" in loopback, loopback
    assert out[-2].strip().startswith("gateway ") and out[-2].strip() != "gateway 000", out[-2]
    assert "hello from the test host: GET /reach" in out[-1] and "hello from the test host: GET /tls" in out[-1]

    # The host service saw nothing, by any address, TCP or UDP (the bound broadcast meets the host firewall).
    assert host_service.tcp_peers == [], host_service.tcp_peers
    if HostFirewall().unavailable() is None:
        assert host_service.udp_peers == [], host_service.udp_peers
    run_id = Path(summary["run_dir"]).name
    assert labelled(run_id) == []
    assert [rid for _tool, _line, rid in HostFirewall().rules() if rid == run_id] == [], "firewall rules left"


# --- the host firewall, behind the routes --------------------------------------------------------------------


def _attempt(network: str, image: str, port: int, udp_port: int) -> dict[str, Any]:
    """From a container on `network` with Docker's own routes: TCP and UDP to the network's .1."""
    code = (
        "import ipaddress,json,socket,subprocess;"
        "o=subprocess.run(['ip','-o','-4','addr','show','scope','global'],capture_output=True,text=True).stdout;"
        "gw=str(ipaddress.ip_interface(o.split()[3]).network[1]);"
        "s=socket.socket();s.settimeout(3);r={'gw':gw}\n"
        f"try:\n s.connect((gw,{port}));r['tcp']=s.recv(100).decode()\n"
        "except OSError as e:\n r['tcp']=type(e).__name__\n"
        f"socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b'x',(gw,{udp_port}))\n"
        "print(json.dumps(r))"
    )
    res = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            network,
            "--cap-drop",
            "ALL",
            "--entrypoint",
            "python3",
            image,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.skipif(
    HostFirewall().unavailable() is not None, reason=f"no host firewall here: {HostFirewall().unavailable()}"
)
def test_the_host_firewall_drops_what_the_internal_network_sends(host_service) -> None:
    backend = DockerBackend.connect()
    image = require_images(backend.client).agent
    run_id = f"test-fw-{uuid.uuid4().hex[:8]}"
    control = f"sbx-{run_id}-control"
    # Labelled with this live process as their supervisor: a `sandbox gc` another test runs meanwhile, on the
    # same engine, takes objects without one for an earlier version's leftovers and removes them.
    owner = {RUN_LABEL: run_id, SUPERVISOR_LABEL: supervisor_identity()}
    try:
        # The control: an internal network without the rules lets a container with Docker's routes reach
        # the host service on the bridge's .1. This is the leak.
        subprocess.run(
            ["docker", "network", "create", "--internal", *(f"--label={k}={v}" for k, v in owner.items()), control],
            check=True,
            capture_output=True,
        )
        leak = _attempt(control, image, host_service.tcp_port, host_service.udp_port)
        assert leak["tcp"] == "HOST-SERVICE-REACHED\n", leak
        # A run's internal network: the same attempt meets the host firewall (dropped: a timeout).
        closed = f"sbx-{run_id}-int"
        backend.create_network(NetworkSpec(name=closed, internal=True, labels=owner))
        rules = [line for _tool, line, rid in HostFirewall().rules() if rid == run_id]
        assert any(line.startswith("-A INPUT ") for line in rules), rules
        assert any(" ! -o br-" in line for line in rules), rules
        peers_before = (list(host_service.tcp_peers), list(host_service.udp_peers))
        blocked = _attempt(closed, image, host_service.tcp_port, host_service.udp_port)
        assert blocked["tcp"] in ("TimeoutError", "timeout"), blocked
        assert (host_service.tcp_peers, host_service.udp_peers) == peers_before
        ipaddress.ip_address(blocked["gw"])
    finally:
        removed = backend.remove_run(run_id)
    assert any(r.startswith("firewall:iptables INPUT") for r in removed), removed
    assert [rid for _t, _l, rid in HostFirewall().rules() if rid == run_id] == []
    assert labelled(run_id) == []


@pytest.mark.skipif(
    HostFirewall().unavailable() is not None, reason=f"no host firewall here: {HostFirewall().unavailable()}"
)
def test_gc_reaps_firewall_rules_whose_run_is_gone() -> None:
    backend = DockerBackend.connect()
    run_id = f"test-fw-{uuid.uuid4().hex[:8]}"
    HostFirewall().add("br-sbxgone00000", run_id)  # as if the supervisor died after removing the networks
    try:
        found = backend.list_runs()[run_id]
        assert found["supervisor"] is None and any(o.startswith("firewall:iptables INPUT") for o in found["objects"])
    finally:
        backend.remove_run(run_id)
    assert run_id not in backend.list_runs()
