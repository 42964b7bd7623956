"""Egress rules: which host names the agent may reach, and which resolved addresses it may not.

Shared by the policy loader (rules are checked when a policy loads), the sidecar's proxy (which decides
each connection with them), and the supervisor and report (which add up a run's decision lines and suggest
the policy entries that would allow what was refused).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PORTS: tuple[int, ...] = (80, 443)
METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, OpenStack instance metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "100.100.100.200",  # Alibaba Cloud instance metadata
    )
)
"""Cloud metadata endpoints: reachable only through an allow_addresses entry naming exactly that address."""
MIN_PREFIX = {4: 8, 6: 8}
"""The widest allow_addresses range accepted, by IP version."""
REASON_SEP = "; "
"""Joins the reasons of one decision line (report mode records every reason a connection would be refused)."""
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_IPV6_RULE = re.compile(r"^\[([0-9a-f:.]+)\](?::(\d+))?$")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule."""

    text: str  # as written in the policy
    host: str  # lower-case name without the leading '*.', or an IP address in its canonical form
    wildcard: bool  # '*.example.com': subdomains only, not example.com itself
    ports: tuple[int, ...]

    def matches(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        if port not in self.ports:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        if is_ip(self.host):
            return is_ip(host) and ipaddress.ip_address(host) == ipaddress.ip_address(self.host)
        return host == self.host


def parse_rule(text: str) -> Rule:
    """Parse `host`, `*.domain`, an IP address (IPv6 in brackets when a port follows), or any of these
    with `:port`; raise ValueError naming what is wrong."""
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
    port: int | None = None
    if t.startswith("["):
        m6 = _IPV6_RULE.match(t)
        if not m6 or not is_ip(m6.group(1)) or ":" not in m6.group(1):
            raise ValueError(f"{raw!r}: brackets hold an IPv6 address, as in '[2001:db8::1]:8443'")
        host, port = m6.group(1), int(m6.group(2)) if m6.group(2) else None
    elif not is_ip(t):
        m = re.match(r"^(.*):(\d+)$", t)
        if m:
            host, port = m.group(1), int(m.group(2))
    if port is not None:
        if not 0 < port < 65536:
            raise ValueError(f"{raw!r}: port {port} is out of range")
        ports = (port,)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise ValueError(f"{raw!r}: '*' may only stand as the whole first label, as in '*.example.com'")
    host = host.rstrip(".")
    if is_ip(host):
        if wildcard:
            raise ValueError(f"{raw!r}: a wildcard cannot stand before an IP address")
        return Rule(raw, str(ipaddress.ip_address(host)), False, ports)
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{raw!r}: not a valid host name")
    if wildcard and len(labels) < 2:
        raise ValueError(f"{raw!r}: '*.{host}' would match a whole top-level domain")
    return Rule(raw, host, wildcard, ports)


def authority(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rule_text(host: str, port: int) -> str:
    """The allow rule for exactly this host and port: `host` for 80 and 443, else `host:port`."""
    host = host.lower().rstrip(".")
    if port in DEFAULT_PORTS:
        return host
    return authority(host, port)


def decide(host: str, port: int, allow: Iterable[Rule], deny: Iterable[Rule]) -> tuple[bool, str | None]:
    """(allowed, the rule that decided). Deny rules are evaluated first; no matching rule means deny."""
    for rule in deny:
        if rule.matches(host, port):
            return False, rule.text
    for rule in allow:
        if rule.matches(host, port):
            return True, rule.text
    return False, None


# --- addresses --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressEntry:
    """One validated `allow_addresses` entry."""

    text: str  # as written in the policy
    network: Network

    @property
    def single(self) -> bool:
        """The entry names exactly one address (a bare address, /32 or /128)."""
        return self.network.prefixlen == self.network.max_prefixlen


def parse_address_entry(text: str) -> AddressEntry:
    """Parse an `allow_addresses` entry (an IPv4 or IPv6 address or CIDR range); raise ValueError naming it."""
    t = text.strip()
    if not t:
        raise ValueError("empty entry; write an IP address or a CIDR range such as '10.20.0.0/16'")
    try:
        network = ipaddress.ip_network(t, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(t, strict=False)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an IP address or CIDR range (e.g. '10.20.0.7', '10.20.0.0/16' or 'fd12:3456::/48')"
            ) from None
        one = t.split("/")[0]
        raise ValueError(
            f"{text!r} has host bits set: write the network {str(loose)!r}, or "
            f"'{one}/{loose.max_prefixlen}' for that one address"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
        raise ValueError(f"{text!r} is an IPv4-mapped IPv6 range; write it in IPv4 form")
    least = MIN_PREFIX[network.version]
    if network.prefixlen < least:
        what = "would lift the block on every address" if network.prefixlen == 0 else "is far too wide"
        raise ValueError(
            f"{text!r} {what}; name narrower ranges (IPv{network.version} entries must be /{least} or longer)"
        )
    return AddressEntry(text, network)


def _normalise(addr: IP) -> IP:
    """IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) addresses are checked as the IPv4 address."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr in _NAT64:
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


def address_kind(ip: str, own: Iterable[str] = ()) -> str | None:
    """What kind of non-public address this is ('loopback address', 'private address', ...), or None."""
    addr = _normalise(ipaddress.ip_address(ip))
    if addr in METADATA:
        return "cloud metadata address"
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_loopback:
        return "loopback address"
    own_addrs = set()
    for o in own:
        with contextlib.suppress(ValueError):
            own_addrs.add(_normalise(ipaddress.ip_address(o.split("%")[0])))
    if addr in own_addrs:
        return "address of the host itself"
    if addr.is_link_local:
        return "link-local address"
    if isinstance(addr, ipaddress.IPv6Address) and addr in ipaddress.ip_network("fc00::/7"):
        return "unique-local IPv6 address"
    if addr.is_private:
        return "private address"
    if addr.is_multicast:
        return "multicast address"
    if addr.is_reserved or not addr.is_global:
        return "reserved address"
    return None


@dataclass(frozen=True)
class AddressCheck:
    """The verdict on one resolved address."""

    address: str
    kind: str | None  # what address_kind says; None for a public address
    blocked: bool  # refused
    exception: str | None = None  # what let a non-public address through: an allow_addresses entry or allow_private

    @property
    def detail(self) -> str | None:
        """For the decision line: which exception let this address through."""
        if self.exception is None:
            return None
        return f"{self.address} ({self.kind}) let through by {self.exception}"


NEVER_IN_REPORT_MODE = frozenset({"cloud metadata address", "loopback address", "unspecified address"})
"""Kinds of address that report mode refuses too (unless an allow_addresses entry lifts them as in enforce
mode): reaching them is the harm itself (credentials from a metadata service, the sidecar's own ports), not
something to learn about for an allowlist."""


def check_address(
    ip: str, own: Iterable[str] = (), allow_private: bool = False, allow_addresses: Iterable[AddressEntry | str] = ()
) -> AddressCheck:
    """Decide one resolved address.

    - A public address passes.
    - A cloud metadata address passes only through an allow_addresses entry naming exactly that address
      (bare, /32 or /128): never through a wider range, never through allow_private.
    - The unspecified address (0.0.0.0, ::) never passes: connecting to it reaches the sidecar itself.
    - A loopback address passes only through an allow_addresses entry covering it (loopback in the sidecar
      is the sidecar itself: the gateway, and in tests the scripted model); allow_private does not lift it.
    - Any other non-public address (private, shared, documentation, link-local, unique-local, reserved, or
      an address of the host itself) passes through an allow_addresses entry covering it, or allow_private.
    """
    entries = [e if isinstance(e, AddressEntry) else parse_address_entry(e) for e in allow_addresses]
    kind = address_kind(ip, own)
    if kind is None:
        return AddressCheck(ip, None, False)
    addr = _normalise(ipaddress.ip_address(ip))
    covering = [e for e in entries if addr.version == e.network.version and addr in e.network]
    if kind == "cloud metadata address":
        exact = [e for e in covering if e.single]
        if exact:
            return AddressCheck(ip, kind, False, f"allow_addresses entry {exact[0].text!r}, which names it exactly")
        return AddressCheck(ip, kind, True)
    if kind == "unspecified address":
        return AddressCheck(ip, kind, True)
    if covering:
        best = max(covering, key=lambda e: e.network.prefixlen)
        return AddressCheck(ip, kind, False, f"allow_addresses entry {best.text!r}")
    if allow_private and kind != "loopback address":
        return AddressCheck(ip, kind, False, "allow_private")
    return AddressCheck(ip, kind, True)


def blocked_address(
    ip: str, own: Iterable[str] = (), allow_private: bool = False, allow_addresses: Iterable[AddressEntry | str] = ()
) -> str | None:
    """Why this address is refused (its kind), or None when it may be reached."""
    check = check_address(ip, own, allow_private, allow_addresses)
    return check.kind if check.blocked else None


def host_syntax_reason(host: str) -> str | None:
    """Why a requested host is no host name at all, or None. An IP literal, or dot-separated labels of letters,
    digits and hyphens (1-63 each, no hyphen at either end, one trailing dot allowed), as a rule's host must
    be: anything else (`evil.com/.example.com`, `a\\.example.com`, empty labels) is refused before any rule
    sees it, so a wildcard never matches a name that a resolver or a later URL parser would read differently."""
    if is_ip(host):
        return None
    name = host[:-1] if host.endswith(".") else host
    if name and all(_LABEL.match(label) for label in name.lower().split(".")):
        return None
    return "not a valid host name (letters, digits and '-' in dot-separated labels of 1 to 63)"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# --- reasons ----------------------------------------------------------------------------------------------


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def host_reason(host: str, port: int, rule: str | None) -> str:
    """Why a host rule refused the connection."""
    return f"denied by rule {rule!r}" if rule else f"no allow rule matches {host}:{port}"


def address_reason(host: str, address: str, kind: str) -> str:
    """Why a resolved address refused the connection."""
    return f"{host} resolves to {address}, {_a(kind)}"


_NO_RULE = re.compile(r"^no allow rule matches (?P<host>.+):(?P<port>\d+)$")
_DENY_RULE = re.compile(r"^denied by rule '(?P<rule>[^']*)'$")
_ADDRESS = re.compile(r"^(?P<host>\S+) resolves to (?P<address>[0-9A-Fa-f:.]+), an? (?P<kind>.+)$")


@dataclass(frozen=True)
class Refusal:
    """One reason on a decision line, parsed back."""

    kind: Literal["no_rule", "deny_rule", "address"]
    text: str
    rule: str | None = None  # deny_rule: the rule
    address: str | None = None  # address: the address
    address_kind: str | None = None  # address: what kind of address


def refusals(reason: str | None) -> list[Refusal]:
    """The host-rule and address reasons of a decision line's `reason` (other text, such as an upstream
    error, is not a refusal and is left out)."""
    out = []
    for part in (reason or "").split(REASON_SEP):
        part = part.strip()
        if _NO_RULE.match(part):
            out.append(Refusal("no_rule", part))
        elif m := _DENY_RULE.match(part):
            out.append(Refusal("deny_rule", part, rule=m.group("rule")))
        elif m := _ADDRESS.match(part):
            out.append(Refusal("address", part, address=m.group("address"), address_kind=m.group("kind")))
    return out


# --- what a run's decision lines add up to ------------------------------------------------------------------


class EgressHost(BaseModel):
    """One host and port the agent asked the egress proxy for, with what happened to it."""

    model_config = ConfigDict(extra="forbid")

    host: str
    """The requested host name (or address)."""
    port: int
    """The requested port."""
    connections: int = 0
    """How many connections asked for it."""
    reasons: list[str] = Field(default_factory=list)
    """Denied or would be denied: every distinct reason. Allowed: the address exceptions that let it through."""

    @property
    def where(self) -> str:
        return authority(self.host, self.port)


class EgressSuggestion(BaseModel):
    """The egress entries a policy would need to allow what was refused (or, in report mode, would be)."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=list)
    """Host rules to add to `egress.allow`: `host` for ports 80 and 443, `host:port` for another."""
    allow_addresses: list[str] = Field(default_factory=list)
    """Addresses to add to `egress.allow_addresses`, as `IP/32` (or `/128`): names refused for their address.
    Cloud metadata addresses are never suggested."""

    @property
    def empty(self) -> bool:
        return not self.allow and not self.allow_addresses

    def yaml(self) -> str:
        """The entries as policy YAML, ready to merge into a policy's `egress:` section ('' when empty)."""
        if self.empty:
            return ""
        lines = ["egress:"]
        for key in ("allow", "allow_addresses"):
            values: list[str] = getattr(self, key)
            if values:
                lines.append(f"  {key}: [" + ", ".join(json.dumps(v) for v in values) + "]")
        return "\n".join(lines) + "\n"


def suggest(lines: Iterable[dict[str, Any]]) -> EgressSuggestion:
    """What the policy would need to allow every connection these decision lines refused or would refuse.

    A connection no allow rule matched gives its host (`host:port` off ports 80 and 443); one refused for a
    resolved address gives that address as `IP/32` (`/128`). A connection refused by a deny rule gives
    nothing (the policy says no on purpose), nor does a cloud metadata address (name one deliberately if it
    must be reached). Deduplicated and sorted.
    """
    allow: set[str] = set()
    addresses: set[IP] = set()
    for line in lines:
        host, port = line.get("host"), line.get("port")
        if not host or not isinstance(port, int) or line.get("decision") == "allow":
            continue
        for r in refusals(line.get("reason")):
            if r.kind == "no_rule":
                allow.add(rule_text(host, port))
            elif r.kind == "address" and r.address and is_ip(r.address):
                addr = ipaddress.ip_address(r.address)
                if _normalise(addr) not in METADATA and r.address_kind != "unspecified address":
                    addresses.add(addr)
    return EgressSuggestion(
        allow=sorted(allow),
        allow_addresses=[f"{a}/{a.max_prefixlen}" for a in sorted(addresses, key=lambda a: (a.version, a))],
    )


class EgressOverview(BaseModel):
    """A run's decision lines added up: hosts by outcome, and the suggestion."""

    model_config = ConfigDict(extra="forbid")

    allowed: list[EgressHost] = Field(default_factory=list)
    denied: list[EgressHost] = Field(default_factory=list)
    would_deny: list[EgressHost] = Field(default_factory=list)
    suggestion: EgressSuggestion = Field(default_factory=EgressSuggestion)


class DecisionTally:
    """Decision lines folded into one per kind (decision, host, port, rule, reason, detail) with its count, for
    `overview`: a flood of connections costs memory by the kinds of decision, not by the connection. Past
    MAX_KINDS distinct kinds, the rest are counted under one `(other hosts)` line per decision."""

    KEYS = ("decision", "host", "port", "rule", "reason", "decision_detail")
    MAX_KINDS = 10_000

    def __init__(self) -> None:
        self._lines: dict[tuple[str, ...], dict[str, Any]] = {}

    def add(self, event: dict[str, Any]) -> None:
        line = {k: event.get(k) for k in self.KEYS}
        key = tuple(str(v)[:300] for v in line.values())
        if key not in self._lines and len(self._lines) >= self.MAX_KINDS:
            line = {"decision": event.get("decision"), "host": "(other hosts)", "port": 0}
            key = (str(event.get("decision")), "(other hosts)")
        self._lines.setdefault(key, {**line, "count": 0})["count"] += 1

    def lines(self) -> list[dict[str, Any]]:
        return list(self._lines.values())


def overview(lines: Iterable[dict[str, Any]]) -> EgressOverview:
    """Group decision lines by outcome (allow, deny, would_deny; lines that ended in an upstream error are
    left out of the groups) and host:port, most connections first."""
    lines = list(lines)
    groups: dict[str, dict[tuple[str, int], EgressHost]] = {"allow": {}, "deny": {}, "would_deny": {}}
    for line in lines:
        decision, host, port = line.get("decision"), line.get("host"), line.get("port")
        if decision not in groups or not host or not isinstance(port, int) or line.get("rule") == "gateway":
            continue
        entry = groups[decision].setdefault((host, port), EgressHost(host=host, port=port))
        entry.connections += int(line.get("count") or 1)  # a line may stand for several alike
        if decision == "allow":  # the address exceptions that let it through
            parts = [p for p in (line.get("decision_detail") or "").split(REASON_SEP) if "let through by" in p]
        else:
            parts = [p for p in (line.get("reason") or "").split(REASON_SEP) if p]
        entry.reasons += [p for p in dict.fromkeys(parts) if p not in entry.reasons]

    def ordered(group: dict[tuple[str, int], EgressHost]) -> list[EgressHost]:
        return sorted(group.values(), key=lambda h: (-h.connections, h.host, h.port))

    return EgressOverview(
        allowed=ordered(groups["allow"]),
        denied=ordered(groups["deny"]),
        would_deny=ordered(groups["would_deny"]),
        suggestion=suggest(lines),
    )


class Egress(BaseModel):
    """What the agent may reach through the sidecar's proxy. The model gateway is always reachable."""

    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(default_factory=list)
    """Host rules: `example.com` (that host only), `*.example.com` (subdomains only), with `:port` for a
    port other than the default 80 and 443."""
    deny: list[str] = Field(default_factory=list)
    """Host rules evaluated before `allow`."""
    mode: Literal["enforce", "report"] = "enforce"
    """`report` allows every connection and logs what enforce mode would refuse as `would_deny`, with every
    reason, for building an allowlist: the run's report ends with the entries to add."""
    allow_private: bool = False
    """Let allowed names reach private, shared, link-local, unique-local, reserved and the host's own
    addresses. Never loopback (the sidecar itself) or a cloud metadata address."""
    allow_addresses: list[str] = Field(default_factory=list)
    """Addresses or CIDR ranges (IPv4 or IPv6) that allowed names may resolve to although they are private,
    reserved, loopback or the host's own: e.g. a company's TLS-inspecting proxy. A cloud metadata address
    passes only through an entry naming exactly it. Host rules still decide first."""
    hosts: dict[str, str] = Field(default_factory=dict)
    """Static entries for the sidecar's resolver: name -> IP address or `host-gateway`."""
    ca_certificates: list[str] = Field(default_factory=list)
    """PEM files of extra certificate authorities, trusted by the agent's tools (curl, git, pip, npm,
    Python, Node) and by the sidecar's gateway: a company's TLS-inspecting proxy, an internal registry.
    A relative path is read relative to the policy file."""

    @field_validator("allow", "deny")
    @classmethod
    def _rules(cls, rules: list[str]) -> list[str]:
        for r in rules:
            parse_rule(r)
        return rules

    @field_validator("allow_addresses")
    @classmethod
    def _addresses(cls, entries: list[str]) -> list[str]:
        problems = []
        for e in entries:
            try:
                parse_address_entry(e)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return entries

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: dict[str, str]) -> dict[str, str]:
        for name, target in hosts.items():
            if target != "host-gateway" and not is_ip(target):
                raise ValueError(f"hosts[{name!r}]: {target!r} is neither an IP address nor 'host-gateway'")
            if is_ip(name) or "*" in name or "/" in name:
                raise ValueError(f"hosts: {name!r} is not a host name")
        return hosts
