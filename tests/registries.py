"""The real package registries (PyPI, npm), as this machine reaches them.

Many companies reach them through a TLS-inspecting proxy with its own certificate authority, where the
registries' names may resolve to addresses the sandbox's proxy refuses as private or reserved. A team
then writes `ca_certificates` and `allow_addresses` into its policy; these helpers write the same from
what this machine shows, and nothing when it reaches the registries directly.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from agent_sandbox.config.policy import presets_dir

PYPI_HOSTS = ("pypi.org", "files.pythonhosted.org")
NPM_HOSTS = ("registry.npmjs.org",)
# Where a company's authorities are installed on Debian (update-ca-certificates reads them from there).
LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def company_network() -> dict[str, list[str]]:
    """The `egress` settings a team behind this machine's network would add to reach the registries."""
    addresses: set[str] = set()
    for host in PYPI_HOSTS + NPM_HOSTS:
        for info in socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM):
            ip = ipaddress.ip_address(info[4][0])
            if not ip.is_global:
                addresses.add(f"{ip}/{ip.max_prefixlen}")
    cas = sorted(str(p) for p in LOCAL_CAS.rglob("*.crt")) if LOCAL_CAS.is_dir() else []
    return {"allow_addresses": sorted(addresses), "ca_certificates": cas}


def dependency_update_policy(path: Path, **extra: Any) -> Path:
    """The dependency-update preset plus this network's settings, written as a policy file."""
    data = yaml.safe_load((presets_dir() / "dependency-update.yaml").read_text())
    data["name"] = "dependency-update-company"
    data["egress"].update(company_network())
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def _get_json(url: str) -> Any:
    ctx = ssl.create_default_context()
    for ca in company_network()["ca_certificates"]:
        ctx.load_verify_locations(ca)
    with urllib.request.urlopen(url, timeout=60, context=ctx) as resp:
        return json.load(resp)


def latest_pypi(name: str) -> str:
    return str(_get_json(f"https://pypi.org/pypi/{name}/json")["info"]["version"])


def latest_npm(name: str) -> str:
    return str(_get_json(f"https://registry.npmjs.org/{name}/latest")["version"])


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())
