"""Test hosts on this machine: small HTTP and HTTPS servers on the Docker bridge's gateway address, which
a run's sidecar reaches by a name mapped to `host-gateway`. Nothing here talks to any other address."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def bridge_gateway() -> str:
    out = subprocess.run(["docker", "network", "inspect", "bridge", "--format",
                          "{{range .IPAM.Config}}{{.Gateway}}{{end}}"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


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


def start(tmp: Path) -> Iterator[TestHosts]:
    addr = bridge_gateway()
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=testhost.sandbox.test",
                    "-addext", "subjectAltName=DNS:testhost.sandbox.test"], check=True, capture_output=True)
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
