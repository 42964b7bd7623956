"""Egress rules: which host names the agent may reach, and which resolved addresses are never reachable.

Shared by the policy loader (rules are checked when a policy loads) and the sidecar's proxy (which decides
each connection with them).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PORTS = (80, 443)
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule."""

    text: str  # as written in the policy
    host: str  # lower-case name without the leading '*.'
    wildcard: bool  # '*.example.com': subdomains only, not example.com itself
    ports: tuple[int, ...]

    def matches(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        if port not in self.ports:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def parse_rule(text: str) -> Rule:
    """Parse `host`, `*.domain` or either with `:port`; raise ValueError naming what is wrong."""
    raw = text
    t = text.strip().lower()
    if not t:
        raise ValueError("empty rule")
    if "://" in t:
        bare = t.split("://", 1)[1].split("/")[0]
        raise ValueError(f"{raw!r}: no scheme in a rule; write the host name only (e.g. {bare!r})")
    if "/" in t:
        raise ValueError(f"{raw!r}: no path in a rule; rules match host names, not URLs")
    if t in ("*", "*.*") or t.startswith("*:"):
        raise ValueError(f"{raw!r}: a bare '*' would allow every host; name hosts or '*.domain'")
    host, ports = t, DEFAULT_PORTS
    m = re.match(r"^(.*):(\d+)$", t)
    if m:
        host, port = m.group(1), int(m.group(2))
        if not 0 < port < 65536:
            raise ValueError(f"{raw!r}: port {port} is out of range")
        ports = (port,)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise ValueError(f"{raw!r}: '*' may only stand as the whole first label, as in '*.example.com'")
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        if wildcard:
            raise ValueError(f"{raw!r}: a wildcard cannot stand before an IP address")
        return Rule(raw, host, False, ports)
    except ValueError as exc:
        if "wildcard" in str(exc):
            raise
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{raw!r}: not a valid host name")
    if wildcard and len(labels) < 2:
        raise ValueError(f"{raw!r}: '*.{host}' would match a whole top-level domain")
    return Rule(raw, host, wildcard, ports)


def decide(host: str, port: int, allow: Iterable[Rule], deny: Iterable[Rule]) -> tuple[bool, str | None]:
    """(allowed, the rule that decided). Deny rules are evaluated first; no matching rule means deny."""
    for rule in deny:
        if rule.matches(host, port):
            return False, rule.text
    for rule in allow:
        if rule.matches(host, port):
            return True, rule.text
    return False, None


def blocked_address(ip: str, own: Iterable[str] = ()) -> str | None:
    """Why this address is never reachable without allow_private, or None when it is public."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    if addr in METADATA:
        return "cloud metadata address"
    if str(addr) in set(own):
        return "an address of the host itself"
    if addr.is_loopback:
        return "loopback address"
    if addr.is_link_local:
        return "link-local address"
    if isinstance(addr, ipaddress.IPv6Address) and addr in ipaddress.ip_network("fc00::/7"):
        return "unique-local IPv6 address"
    if addr.is_private:
        return "private address"
    if addr.is_multicast or addr.is_unspecified or addr.is_reserved:
        return "reserved address"
    return None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Egress(BaseModel):
    """What the agent may reach through the sidecar's proxy. The model gateway is always reachable."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=list)
    """Host rules: `example.com` (that host only), `*.example.com` (subdomains only), with `:port` for a
    port other than the default 80 and 443."""
    deny: list[str] = Field(default_factory=list)
    """Host rules evaluated before `allow`."""
    mode: Literal["enforce", "report"] = "enforce"
    """`report` allows everything but logs what would be denied, for building an allowlist."""
    allow_private: bool = False
    """Allow names that resolve to loopback, private, link-local, metadata or the host's own addresses."""
    hosts: dict[str, str] = Field(default_factory=dict)
    """Static entries for the sidecar's resolver: name -> IP address or `host-gateway`."""

    @field_validator("allow", "deny")
    @classmethod
    def _rules(cls, rules: list[str]) -> list[str]:
        for r in rules:
            parse_rule(r)
        return rules

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: dict[str, str]) -> dict[str, str]:
        for name, target in hosts.items():
            if target != "host-gateway" and not is_ip(target):
                raise ValueError(f"hosts[{name!r}]: {target!r} is neither an IP address nor 'host-gateway'")
            if is_ip(name) or "*" in name or "/" in name:
                raise ValueError(f"hosts: {name!r} is not a host name")
        return hosts
