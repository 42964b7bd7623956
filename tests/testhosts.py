"""Test hosts on this machine: small HTTP and HTTPS servers on the address Docker maps `host-gateway` to,
which a run's sidecar reaches by a name mapped to `host-gateway`. Nothing here talks to any other address,
and the servers never listen on all interfaces."""

from __future__ import annotations

import http.server
import ipaddress
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


def docker_cli(docker_host: str | None = None) -> list[str]:
    """The docker command line for an engine: the one DOCKER_HOST names (the default), or `docker_host`."""
    return ["docker", *(["--host", docker_host] if docker_host else [])]


def inspect_bridge(docker_host: str | None = None) -> dict[str, Any]:
    """`docker network inspect bridge`: the engine's default bridge network."""
    res = subprocess.run(
        [*docker_cli(docker_host), "network", "inspect", "bridge"], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"cannot inspect the default bridge network of the Docker engine "
            f"{docker_host or '(DOCKER_HOST or the default socket)'}: {res.stderr.strip()}"
        )
    (net,) = json.loads(res.stdout)
    return net


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        addr = ipaddress.ip_address(text.split("/")[0])
    except ValueError:
        return None
    return addr if isinstance(addr, ipaddress.IPv4Address) else None


def interface_ipv4(name: str) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses of a network interface of this machine (none if there is no such interface)."""
    return [
        a
        for a in (_ipv4(s.address) for s in psutil.net_if_addrs().get(name, []) if s.family == socket.AF_INET)
        if a is not None
    ]


def bridge_gateway(docker_host: str | None = None) -> str:
    """The IPv4 address Docker maps `host-gateway` to on that engine (`--add-host name:host-gateway`).

    That is the default bridge's gateway: the address of the bridge interface it names (docker0). A freshly
    started engine, whose bridge interface did not exist before it started, reports only the Subnet in
    `IPAM.Config`, no Gateway (issue 10); an engine started again reports both. So: the IPAM Gateway when
    present, else the bridge interface's IPv4 address (inside the Subnet when there is one), else the first
    host address of the Subnet, which is what Docker gives the bridge it creates. Never '' (all interfaces):
    it fails with a message when none of those is found."""
    net = inspect_bridge(docker_host)
    configs = (net.get("IPAM") or {}).get("Config") or []
    subnets: list[ipaddress.IPv4Network] = []
    for c in configs:
        try:
            subnet = ipaddress.ip_network(c.get("Subnet") or "", strict=False)
        except ValueError:
            continue
        if isinstance(subnet, ipaddress.IPv4Network):
            subnets.append(subnet)
    for c in configs:
        gateway = _ipv4(c.get("Gateway") or "")
        if gateway is not None and not gateway.is_unspecified:
            return str(gateway)
    iface = (net.get("Options") or {}).get(BRIDGE_NAME_OPTION) or "docker0"
    addrs = interface_ipv4(iface)
    inside = [a for a in addrs if any(a in s for s in subnets)]
    if inside or addrs:
        return str((inside or addrs)[0])
    for subnet in subnets:
        first = next(subnet.hosts(), None)
        if first is not None:
            return str(first)
    raise RuntimeError(
        f"cannot tell which address `host-gateway` maps to on the Docker engine "
        f"{docker_host or '(DOCKER_HOST or the default socket)'}: its bridge network reports no IPv4 gateway "
        f"and no subnet (IPAM config {configs!r}), and the bridge interface {iface!r} has no IPv4 address here"
    )


def local_ipv4() -> set[str]:
    """Every IPv4 address assigned to an interface of this machine."""
    return {str(a) for name in psutil.net_if_addrs() for a in interface_ipv4(name)}


@dataclass
class TestHosts:
    address: str
    http_port: int
    https_port: int
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, host header, path)


def _handler(hosts: TestHosts) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, with_body: bool) -> None:
            hosts.requests.append((self.command, self.headers.get("host", ""), self.path))
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("location", "http://elsewhere.sandbox.test/")
                self.send_header("content-length", "0")
                self.end_headers()
                return
            body = f"hello from the test host: {self.command} {self.path}\n".encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(True)

        def do_HEAD(self) -> None:
            self._reply(False)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            data = self.rfile.read(length)
            hosts.requests.append(("POST-BODY", "", json.dumps(data.decode())))
            self._reply(True)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def start(tmp: Path, docker_host: str | None = None) -> Iterator[TestHosts]:
    addr = bridge_gateway(docker_host)
    # Bind to that one address, never to all interfaces ('' or 0.0.0.0), and only to one this machine has.
    if addr not in local_ipv4():
        raise RuntimeError(
            f"`host-gateway` maps to {addr!r} on the Docker engine, which is not an address of "
            f"this machine ({sorted(local_ipv4())}): the test hosts will not bind to it"
        )
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=testhost.sandbox.test",
            "-addext",
            "subjectAltName=DNS:testhost.sandbox.test",
        ],
        check=True,
        capture_output=True,
    )
    hosts = TestHosts(addr, 0, 0)
    plain = http.server.ThreadingHTTPServer((addr, 0), _handler(hosts))
    tls = http.server.ThreadingHTTPServer((addr, 0), _handler(hosts))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    hosts.http_port, hosts.https_port = plain.server_address[1], tls.server_address[1]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (plain, tls)]
    for t in threads:
        t.start()
    try:
        yield hosts
    finally:
        for s in (plain, tls):
            s.shutdown()
            s.server_close()
