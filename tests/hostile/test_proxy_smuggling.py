"""Class 9, the proxy's part: no host smuggling past the allowlist.

The agent asks the proxy for an allowed test host and tries to reach another one behind it: a plain-HTTP
request whose Host header names another host (or port), a CONNECT to the allowed host whose TLS ClientHello
names another server (curl's --connect-to, openssl s_client -servername: SNI domain fronting), a ClientHello
with no server name at all, and --resolve, which a proxy never honours. Each is refused with a reason and a
deny decision line, and none reaches the test host; the honest requests next to them go through.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import testhosts
from ..conftest import audit_events, tool_results

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

NAME = "testhost.sandbox.test"
EVIL = "evil.sandbox.test"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testhosts.TestHosts]:
    yield from testhosts.start(tmp_path_factory.mktemp("testhosts"))


def s_client(servername: str, port: int) -> str:
    flag = "-noservername" if servername == "-" else f"-servername {servername}"
    return (
        f"echo | timeout 20 openssl s_client -proxy sidecar:3128 -connect {NAME}:{port} {flag} 2>&1 "
        "| grep -iE 'alert|^CONNECTED|subject=|errno|Verification|Cipher is' ; true"
    )


def test_smuggled_hosts_are_refused(hosts, make_repo, sandbox, write_script, tmp_path) -> None:
    h, s = hosts.http_port, hosts.https_port
    commands = [
        f"curl -sS -i http://{NAME}:{h}/honest-plain",
        f"curl -sS -i -H 'Host: {EVIL}' http://{NAME}:{h}/smuggle-host",
        f"curl -sS -i -H 'Host: {NAME}:1' http://{NAME}:{h}/smuggle-port",
        f"curl -sSk https://{NAME}:{s}/honest-tls",
        f"curl -sSk --connect-to {EVIL}:{s}:{NAME}:{s} https://{EVIL}:{s}/front-connect-to 2>&1; echo rc=$?",
        f"curl -sSk --resolve {EVIL}:{s}:{hosts.address} https://{EVIL}:{s}/front-resolve 2>&1; echo rc=$?",
        s_client(EVIL, s),
        s_client(NAME, s),
        s_client("-", s),
    ]
    script = "turns:\n" + "".join(f"  - bash: {json.dumps(c)}\n" for c in commands) + "  - text: done\n"
    pol = tmp_path / "policy.yaml"
    pol.write_text(
        json.dumps(
            {
                "name": "smuggling",
                "egress": {
                    "allow": [f"{NAME}:{h}", f"{NAME}:{s}"],
                    "allow_private": True,
                    "hosts": {NAME: "host-gateway", EVIL: "host-gateway"},
                },
            }
        )
    )
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "smuggle",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script(script)),
        "--json",
    )
    assert res.code == 0, res.stderr
    summary = res.json()
    out = tool_results(summary["run_dir"])
    assert len(out) == len(commands), out
    honest_plain, host, port, honest_tls, connect_to, resolve, fronted, sni_ok, no_sni = out

    assert honest_plain.startswith("HTTP/1.0 200") and "GET /honest-plain" in honest_plain
    assert host.startswith("HTTP/1.1 403"), host
    assert f"x-sandbox-egress-reason: Host header '{EVIL}' does not match the requested host {NAME}:{h}" in host, host
    assert port.startswith("HTTP/1.1 403") and f"Host header '{NAME}:1' does not match" in port, port
    assert honest_tls.strip() == "hello from the test host: GET /honest-tls"
    # curl --connect-to: CONNECT names the allowed host, the ClientHello the other one. Refused inside the
    # tunnel with a TLS alert.
    assert "alert access denied" in connect_to and "rc=35" in connect_to, connect_to
    # --resolve changes nothing through a proxy: the CONNECT names the other host, which no rule allows.
    assert "CONNECT tunnel failed, response 403" in resolve, resolve
    assert "alert access denied" in fronted and "subject=" not in fronted, fronted
    assert "CONNECTED" in sni_ok and f"CN = {NAME}" in sni_ok and "alert" not in sni_ok, sni_ok
    assert "alert access denied" in no_sni, no_sni

    # Nothing smuggled reached the test host; the honest requests did.
    paths = [r[2] for r in hosts.requests]
    assert "/honest-plain" in paths and "/honest-tls" in paths
    assert not [p for p in paths if p.startswith(("/smuggle", "/front"))], paths

    lines = [e["payload"] for e in audit_events(summary["run_dir"]) if e["source"] == "proxy"]
    denied = [e for e in lines if e["decision"] == "deny"]
    reasons = sorted(e["reason"] for e in denied)
    expected = [
        f"Host header '{EVIL}' does not match the requested host {NAME}:{h}",
        f"Host header '{NAME}:1' does not match the requested host {NAME}:{h}",
        f"TLS server name '{EVIL}' does not match the CONNECT host '{NAME}' (domain fronting)",
        f"TLS server name '{EVIL}' does not match the CONNECT host '{NAME}' (domain fronting)",
        f"no allow rule matches {EVIL}:{s}",
        f"the TLS ClientHello names no server (SNI), but CONNECT named {NAME}",
    ]
    assert reasons == sorted(expected), reasons
    fronting: list[dict[str, Any]] = [e for e in denied if "domain fronting" in e["reason"]]
    assert all(e["method"] == "CONNECT" and e["host"] == NAME and e["rule"] == f"{NAME}:{s}" for e in fronting)
    assert all(e["bytes_down"] == 0 for e in denied)
    assert summary["egress_denied"] == len(expected)
    # A refused smuggling attempt suggests nothing for the policy (it is not a missing rule).
    assert summary["egress_suggestion"]["allow"] == [f"{EVIL}:{s}"]
    assert Path(summary["run_dir"], "report.md").is_file()
