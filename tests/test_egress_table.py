"""The egress decision as one table: a policy, a CONNECT target and what its name resolves to, against the
HTTP status the client gets and the decision line the proxy writes (decision, reason, rule, resolved
address, decision_detail).

Each row runs the real EgressProxy on 127.0.0.1 with a fake resolver: no Docker, no DNS, no address outside
this machine (an allowed connection is handed to a local server whatever address was checked). The driver
also holds the invariants every row must keep: a connection goes to the very address the line names, a
refused one goes nowhere, and a name refused by a host rule in enforce mode is never even resolved.

Below the table, the rule syntax itself: what parse_rule accepts and how it reads it, and what it refuses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import pytest

from agent_sandbox.sidecar.egress import DEFAULT_PORTS, parse_rule
from agent_sandbox.sidecar.proxy import EgressProxy

OWN = ["172.17.0.1", "192.168.7.20", "fe80::42%eth0"]
"""The sidecar's own addresses, as the proxy is given them."""
GATEWAY = ("sidecar", 8080)
PUB4, PUB6 = "151.101.0.223", "2a04:4e42::223"
NAME = "name.example"
SKIP: Any = object()
"""A column the row does not check."""


def long_name(length: int, suffix: str = ".example.com") -> str:
    """A host name of exactly `length` characters, of labels no longer than 63, ending in `suffix`."""
    prefix = (("a" * 62 + ".") * length)[: length - len(suffix)]
    name = (prefix[:-1] + "a" if prefix.endswith(".") else prefix) + suffix
    assert len(name) == length
    return name


@dataclass(frozen=True)
class Row:
    target: str
    """The CONNECT authority, exactly as the client writes it."""
    dns: tuple[str, ...] | None
    """What the name resolves to; None: it does not resolve. An IP literal always resolves to itself."""
    status: int
    decision: str | None
    """The line's decision; None: no decision line at all (the request never parsed)."""
    reason: str | None
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    mode: str = "enforce"
    allow_private: bool = False
    allow_addresses: tuple[str, ...] = ()
    rule: Any = SKIP
    resolved: Any = SKIP
    detail: Any = None
    host: Any = SKIP
    """The line's host, when it is not simply the target's host lower-cased."""
    resolves: Any = SKIP
    """Whether the resolver is asked at all."""


def row(
    id_: str,
    target: str,
    dns: tuple[str, ...] | None,
    status: int,
    decision: str | None,
    reason: str | None = None,
    **kw: Any,
) -> Any:
    return pytest.param(Row(target, dns, status, decision, reason, **kw), id=id_)


def addr(ip: str, kind: str = "private address", host: str = NAME) -> str:
    """The reason a resolved address refuses a name."""
    return f"{host} resolves to {ip}, {'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def no_rule(where: str) -> str:
    return f"no allow rule matches {where}"


def lifted(ip: str, kind: str, by: str) -> str:
    return f"{ip} ({kind}) let through by {by}"


N = f"{NAME}:443"
BAD_NAME = "not a valid host name (letters, digits and '-' in dot-separated labels of 1 to 63)"
A = (NAME,)  # the policy allows the name; its address decides
NX = None

TABLE = [
    # --- exact host names: that host only, on ports 80 and 443 ---------------------------------------------
    row("exact-443", "pypi.org:443", (PUB4,), 200, "allow", allow=("pypi.org",), rule="pypi.org", resolved=PUB4),
    row("exact-80", "pypi.org:80", (PUB4,), 200, "allow", allow=("pypi.org",), rule="pypi.org"),
    row(
        "exact-other-port",
        "pypi.org:8443",
        (PUB4,),
        403,
        "deny",
        no_rule("pypi.org:8443"),
        allow=("pypi.org",),
        rule=None,
        resolved=None,
    ),
    row(
        "exact-not-a-subdomain",
        "www.pypi.org:443",
        (PUB4,),
        403,
        "deny",
        no_rule("www.pypi.org:443"),
        allow=("pypi.org",),
    ),
    row(
        "exact-not-a-suffix", "evilpypi.org:443", (PUB4,), 403, "deny", no_rule("evilpypi.org:443"), allow=("pypi.org",)
    ),
    row(
        "exact-not-a-prefix",
        "pypi.org.evil.example:443",
        (PUB4,),
        403,
        "deny",
        no_rule("pypi.org.evil.example:443"),
        allow=("pypi.org",),
    ),
    row("no-rules-at-all", "pypi.org:443", (PUB4,), 403, "deny", no_rule("pypi.org:443")),
    # --- case and trailing dots: neither changes which rule matches ------------------------------------------
    row(
        "case-of-the-host", "PyPI.ORG:443", (PUB4,), 200, "allow", allow=("pypi.org",), rule="pypi.org", host="pypi.org"
    ),
    row("case-of-the-rule", "pypi.org:443", (PUB4,), 200, "allow", allow=("PyPI.Org",), rule="PyPI.Org"),
    row("trailing-dot-host", "pypi.org.:443", (PUB4,), 200, "allow", allow=("pypi.org",), rule="pypi.org"),
    row("trailing-dot-rule", "pypi.org:443", (PUB4,), 200, "allow", allow=("pypi.org.",), rule="pypi.org."),
    row(
        "trailing-dot-named-as-asked",
        "PyPI.org.:443",
        ("10.0.0.9",),
        403,
        "deny",
        addr("10.0.0.9", host="pypi.org."),
        allow=("pypi.org",),
        rule="pypi.org",
        resolved="10.0.0.9",
    ),
    # --- wildcards: subdomains at any depth, never the domain itself ------------------------------------------
    row("wild-subdomain", "a.example.com:443", (PUB4,), 200, "allow", allow=("*.example.com",), rule="*.example.com"),
    row("wild-deeper", "a.b.example.com:443", (PUB4,), 200, "allow", allow=("*.example.com",)),
    row(
        "wild-not-the-apex",
        "example.com:443",
        (PUB4,),
        403,
        "deny",
        no_rule("example.com:443"),
        allow=("*.example.com",),
    ),
    row(
        "wild-not-a-suffix",
        "badexample.com:443",
        (PUB4,),
        403,
        "deny",
        no_rule("badexample.com:443"),
        allow=("*.example.com",),
    ),
    row(
        "wild-not-a-prefix",
        "a.example.com.evil.test:443",
        (PUB4,),
        403,
        "deny",
        no_rule("a.example.com.evil.test:443"),
        allow=("*.example.com",),
    ),
    row("wild-case-and-dot", "A.Example.COM.:443", (PUB4,), 200, "allow", allow=("*.example.com",)),
    row(
        "wild-default-ports-only",
        "a.example.com:8080",
        (PUB4,),
        403,
        "deny",
        no_rule("a.example.com:8080"),
        allow=("*.example.com",),
    ),
    row("wild-with-a-port", "a.example.com:8443", (PUB4,), 200, "allow", allow=("*.example.com:8443",)),
    row(
        "wild-with-a-port-only-that-port",
        "a.example.com:443",
        (PUB4,),
        403,
        "deny",
        no_rule("a.example.com:443"),
        allow=("*.example.com:8443",),
    ),
    # --- deny rules are evaluated first --------------------------------------------------------------------
    row(
        "deny-beats-wildcard",
        "bad.example.com:443",
        (PUB4,),
        403,
        "deny",
        "denied by rule 'bad.example.com'",
        allow=("*.example.com",),
        deny=("bad.example.com",),
        rule="bad.example.com",
    ),
    row(
        "deny-wildcard",
        "x.bad.example.com:443",
        (PUB4,),
        403,
        "deny",
        "denied by rule '*.bad.example.com'",
        allow=("*.example.com",),
        deny=("*.bad.example.com",),
        rule="*.bad.example.com",
    ),
    row(
        "deny-wildcard-spares-the-apex",
        "bad.example.com:443",
        (PUB4,),
        200,
        "allow",
        allow=("*.example.com",),
        deny=("*.bad.example.com",),
        rule="*.example.com",
    ),
    row(
        "deny-one-port",
        "pypi.org:80",
        (PUB4,),
        403,
        "deny",
        "denied by rule 'pypi.org:80'",
        allow=("pypi.org",),
        deny=("pypi.org:80",),
    ),
    row(
        "deny-one-port-spares-the-other",
        "pypi.org:443",
        (PUB4,),
        200,
        "allow",
        allow=("pypi.org",),
        deny=("pypi.org:80",),
    ),
    row(
        "deny-rule-as-written",
        "bad.example.com:443",
        (PUB4,),
        403,
        "deny",
        "denied by rule 'BAD.Example.com.'",
        allow=("*.example.com",),
        deny=("BAD.Example.com.",),
    ),
    # --- IP literals: rules name hosts or addresses, and one never stands for the other ---------------------
    row("ip-rule", f"{PUB4}:443", None, 200, "allow", allow=(PUB4,), rule=PUB4, resolved=PUB4),
    row("ip-rule-with-port", f"{PUB4}:8080", None, 200, "allow", allow=(f"{PUB4}:8080",)),
    row(
        "ip-rule-with-port-only-that-port",
        f"{PUB4}:443",
        None,
        403,
        "deny",
        no_rule(f"{PUB4}:443"),
        allow=(f"{PUB4}:8080",),
    ),
    row("ip-not-allowed-by-the-name", f"{PUB4}:443", None, 403, "deny", no_rule(f"{PUB4}:443"), allow=("pypi.org",)),
    row("name-not-allowed-by-its-ip", "pypi.org:443", (PUB4,), 403, "deny", no_rule("pypi.org:443"), allow=(PUB4,)),
    row(
        "ip-rule-private-still-checked",
        "10.0.0.5:443",
        None,
        403,
        "deny",
        addr("10.0.0.5", host="10.0.0.5"),
        allow=("10.0.0.5",),
        rule="10.0.0.5",
        resolved="10.0.0.5",
    ),
    row(
        "ip-rule-private-lifted",
        "10.0.0.5:443",
        None,
        200,
        "allow",
        allow=("10.0.0.5",),
        allow_addresses=("10.0.0.5/32",),
        detail=lifted("10.0.0.5", "private address", "allow_addresses entry '10.0.0.5/32'"),
    ),
    row(
        "ip-rule-loopback-still-checked",
        "127.0.0.1:443",
        None,
        403,
        "deny",
        addr("127.0.0.1", "loopback address", host="127.0.0.1"),
        allow=("127.0.0.1",),
        allow_private=True,
    ),
    # --- IPv6 ----------------------------------------------------------------------------------------------------
    row("v6-rule-with-port", f"[{PUB6}]:8443", None, 200, "allow", allow=(f"[{PUB6}]:8443",), host=PUB6, resolved=PUB6),
    row(
        "v6-another-spelling",
        "[2A04:4e42:0:0::223]:8443",
        None,
        200,
        "allow",
        allow=(f"[{PUB6}]:8443",),
        host="2a04:4e42:0:0::223",
    ),
    row(
        "v6-rule-with-port-only-that-port",
        f"[{PUB6}]:443",
        None,
        403,
        "deny",
        no_rule(f"{PUB6}:443"),
        allow=(f"[{PUB6}]:8443",),
        host=PUB6,
    ),
    row("v6-bare-rule", f"[{PUB6}]:443", None, 200, "allow", allow=(PUB6,), host=PUB6),
    row("v6-answer", N, (PUB6,), 200, "allow", allow=A, resolved=PUB6),
    row("v6-ipv4-answer-first", N, (PUB6, PUB4), 200, "allow", allow=A, resolved=PUB4),
    row(
        "v6-unique-local", N, ("fd12:3456::1",), 403, "deny", addr("fd12:3456::1", "unique-local IPv6 address"), allow=A
    ),
    row("v6-link-local", N, ("fe80::1",), 403, "deny", addr("fe80::1", "link-local address"), allow=A),
    row("v6-loopback", N, ("::1",), 403, "deny", addr("::1", "loopback address"), allow=A),
    row("v6-unspecified", N, ("::",), 403, "deny", addr("::", "unspecified address"), allow=A),
    row("v6-own-address", N, ("fe80::42",), 403, "deny", addr("fe80::42", "address of the host itself"), allow=A),
    row("v6-documentation", N, ("2001:db8::1",), 403, "deny", addr("2001:db8::1"), allow=A),
    row(
        "v6-mapped-loopback",
        N,
        ("::ffff:127.0.0.1",),
        403,
        "deny",
        addr("::ffff:127.0.0.1", "loopback address"),
        allow=A,
    ),
    row(
        "v6-mapped-metadata",
        N,
        ("::ffff:169.254.169.254",),
        403,
        "deny",
        addr("::ffff:169.254.169.254", "cloud metadata address"),
        allow=A,
    ),
    row(
        "v6-nat64-metadata",
        N,
        ("64:ff9b::a9fe:a9fe",),
        403,
        "deny",
        addr("64:ff9b::a9fe:a9fe", "cloud metadata address"),
        allow=A,
    ),
    row("v6-nat64-public", N, ("64:ff9b::808:808",), 200, "allow", allow=A),
    row(
        "v6-aws-metadata", N, ("fd00:ec2::254",), 403, "deny", addr("fd00:ec2::254", "cloud metadata address"), allow=A
    ),
    row(
        "v6-mapped-literal",
        "[::ffff:169.254.169.254]:443",
        None,
        403,
        "deny",
        addr("::ffff:169.254.169.254", "cloud metadata address", host="::ffff:169.254.169.254"),
        allow=("::ffff:169.254.169.254",),
        host="::ffff:169.254.169.254",
    ),
    # --- what an allowed name may resolve to ------------------------------------------------------------------
    row("public", N, (PUB4,), 200, "allow", allow=A, rule=NAME, resolved=PUB4),
    row("private-10", N, ("10.1.2.3",), 403, "deny", addr("10.1.2.3"), allow=A, rule=NAME, resolved="10.1.2.3"),
    row("private-172", N, ("172.20.0.5",), 403, "deny", addr("172.20.0.5"), allow=A),
    row("private-192", N, ("192.168.1.1",), 403, "deny", addr("192.168.1.1"), allow=A),
    row("documentation", N, ("203.0.113.80",), 403, "deny", addr("203.0.113.80"), allow=A),
    row("benchmarking", N, ("198.18.0.1",), 403, "deny", addr("198.18.0.1"), allow=A),
    row("class-e", N, ("240.0.0.1",), 403, "deny", addr("240.0.0.1"), allow=A),
    row("shared", N, ("100.64.0.1",), 403, "deny", addr("100.64.0.1", "reserved address"), allow=A),
    row("multicast", N, ("224.0.0.1",), 403, "deny", addr("224.0.0.1", "multicast address"), allow=A),
    row("loopback", N, ("127.8.9.10",), 403, "deny", addr("127.8.9.10", "loopback address"), allow=A),
    row("unspecified", N, ("0.0.0.0",), 403, "deny", addr("0.0.0.0", "unspecified address"), allow=A),
    row("link-local", N, ("169.254.1.1",), 403, "deny", addr("169.254.1.1", "link-local address"), allow=A),
    row("metadata", N, ("169.254.169.254",), 403, "deny", addr("169.254.169.254", "cloud metadata address"), allow=A),
    row("metadata-ecs", N, ("169.254.170.2",), 403, "deny", addr("169.254.170.2", "cloud metadata address"), allow=A),
    row(
        "metadata-alibaba",
        N,
        ("100.100.100.200",),
        403,
        "deny",
        addr("100.100.100.200", "cloud metadata address"),
        allow=A,
    ),
    row("own-address", N, ("172.17.0.1",), 403, "deny", addr("172.17.0.1", "address of the host itself"), allow=A),
    row(
        "own-address-2", N, ("192.168.7.20",), 403, "deny", addr("192.168.7.20", "address of the host itself"), allow=A
    ),
    # --- the policy's address exceptions ----------------------------------------------------------------------
    row(
        "private-allow_private",
        N,
        ("10.1.2.3",),
        200,
        "allow",
        allow=A,
        allow_private=True,
        detail=lifted("10.1.2.3", "private address", "allow_private"),
        resolved="10.1.2.3",
    ),
    row(
        "private-entry-32",
        N,
        ("10.1.2.3",),
        200,
        "allow",
        allow=A,
        allow_addresses=("10.1.2.3/32",),
        detail=lifted("10.1.2.3", "private address", "allow_addresses entry '10.1.2.3/32'"),
    ),
    row(
        "private-entry-bare",
        N,
        ("10.1.2.3",),
        200,
        "allow",
        allow=A,
        allow_addresses=("10.1.2.3",),
        detail=lifted("10.1.2.3", "private address", "allow_addresses entry '10.1.2.3'"),
    ),
    row(
        "private-entry-range",
        N,
        ("10.1.2.3",),
        200,
        "allow",
        allow=A,
        allow_addresses=("10.0.0.0/8",),
        detail=lifted("10.1.2.3", "private address", "allow_addresses entry '10.0.0.0/8'"),
    ),
    row(
        "private-entry-elsewhere",
        N,
        ("10.1.2.3",),
        403,
        "deny",
        addr("10.1.2.3"),
        allow=A,
        allow_addresses=("10.9.0.0/16",),
    ),
    row(
        "private-narrowest-entry-named",
        N,
        ("10.1.2.3",),
        200,
        "allow",
        allow=A,
        allow_addresses=("10.0.0.0/8", "10.1.0.0/16"),
        detail=lifted("10.1.2.3", "private address", "allow_addresses entry '10.1.0.0/16'"),
    ),
    row(
        "private-entry-named-before-allow_private",
        N,
        ("10.1.2.3",),
        200,
        "allow",
        allow=A,
        allow_private=True,
        allow_addresses=("10.0.0.0/8",),
        detail=lifted("10.1.2.3", "private address", "allow_addresses entry '10.0.0.0/8'"),
    ),
    row(
        "shared-allow_private",
        N,
        ("100.64.0.1",),
        200,
        "allow",
        allow=A,
        allow_private=True,
        detail=lifted("100.64.0.1", "reserved address", "allow_private"),
    ),
    row(
        "own-allow_private",
        N,
        ("172.17.0.1",),
        200,
        "allow",
        allow=A,
        allow_private=True,
        detail=lifted("172.17.0.1", "address of the host itself", "allow_private"),
    ),
    row(
        "own-entry",
        N,
        ("172.17.0.1",),
        200,
        "allow",
        allow=A,
        allow_addresses=("172.17.0.1/32",),
        detail=lifted("172.17.0.1", "address of the host itself", "allow_addresses entry '172.17.0.1/32'"),
    ),
    row(
        "link-local-allow_private",
        N,
        ("169.254.1.1",),
        200,
        "allow",
        allow=A,
        allow_private=True,
        detail=lifted("169.254.1.1", "link-local address", "allow_private"),
    ),
    row(
        "link-local-entry",
        N,
        ("169.254.1.1",),
        200,
        "allow",
        allow=A,
        allow_addresses=("169.254.0.0/16",),
        detail=lifted("169.254.1.1", "link-local address", "allow_addresses entry '169.254.0.0/16'"),
    ),
    row(
        "v6-ula-entry",
        N,
        ("fd12:3456::1",),
        200,
        "allow",
        allow=A,
        allow_addresses=("fd12:3456::/32",),
        detail=lifted("fd12:3456::1", "unique-local IPv6 address", "allow_addresses entry 'fd12:3456::/32'"),
    ),
    row(
        "v6-ula-v4-entry-does-not-cover",
        N,
        ("fd12:3456::1",),
        403,
        "deny",
        addr("fd12:3456::1", "unique-local IPv6 address"),
        allow=A,
        allow_addresses=("10.0.0.0/8",),
    ),
    row(
        "loopback-not-by-allow_private",
        N,
        ("127.0.0.1",),
        403,
        "deny",
        addr("127.0.0.1", "loopback address"),
        allow=A,
        allow_private=True,
    ),
    row(
        "v6-loopback-not-by-allow_private",
        N,
        ("::1",),
        403,
        "deny",
        addr("::1", "loopback address"),
        allow=A,
        allow_private=True,
    ),
    row(
        "loopback-entry",
        N,
        ("127.0.0.1",),
        200,
        "allow",
        allow=A,
        allow_addresses=("127.0.0.0/8",),
        detail=lifted("127.0.0.1", "loopback address", "allow_addresses entry '127.0.0.0/8'"),
    ),
    row(
        "v6-loopback-entry",
        N,
        ("::1",),
        200,
        "allow",
        allow=A,
        allow_addresses=("::1/128",),
        detail=lifted("::1", "loopback address", "allow_addresses entry '::1/128'"),
    ),
    row(
        "unspecified-never",
        N,
        ("0.0.0.0",),
        403,
        "deny",
        addr("0.0.0.0", "unspecified address"),
        allow=A,
        allow_private=True,
        allow_addresses=("0.0.0.0/8",),
    ),
    row(
        "metadata-not-by-allow_private-or-range",
        N,
        ("169.254.169.254",),
        403,
        "deny",
        addr("169.254.169.254", "cloud metadata address"),
        allow=A,
        allow_private=True,
        allow_addresses=("169.254.0.0/16",),
    ),
    row(
        "metadata-not-by-a-narrow-range",
        N,
        ("169.254.169.254",),
        403,
        "deny",
        addr("169.254.169.254", "cloud metadata address"),
        allow=A,
        allow_addresses=("169.254.169.0/24", "169.254.169.254/31"),
    ),
    row(
        "metadata-exact-entry",
        N,
        ("169.254.169.254",),
        200,
        "allow",
        allow=A,
        allow_addresses=("169.254.169.254/32",),
        detail=lifted(
            "169.254.169.254",
            "cloud metadata address",
            "allow_addresses entry '169.254.169.254/32', which names it exactly",
        ),
    ),
    row(
        "metadata-exact-bare-entry",
        N,
        ("169.254.169.254",),
        200,
        "allow",
        allow=A,
        allow_addresses=("169.254.169.254",),
        detail=lifted(
            "169.254.169.254",
            "cloud metadata address",
            "allow_addresses entry '169.254.169.254', which names it exactly",
        ),
    ),
    row(
        "metadata-ecs-range",
        N,
        ("169.254.170.2",),
        403,
        "deny",
        addr("169.254.170.2", "cloud metadata address"),
        allow=A,
        allow_private=True,
        allow_addresses=("169.254.0.0/16",),
    ),
    row(
        "metadata-ecs-exact-entry",
        N,
        ("169.254.170.2",),
        200,
        "allow",
        allow=A,
        allow_addresses=("169.254.170.2/32",),
        detail=lifted(
            "169.254.170.2",
            "cloud metadata address",
            "allow_addresses entry '169.254.170.2/32', which names it exactly",
        ),
    ),
    row(
        "metadata-alibaba-range",
        N,
        ("100.100.100.200",),
        403,
        "deny",
        addr("100.100.100.200", "cloud metadata address"),
        allow=A,
        allow_private=True,
        allow_addresses=("100.64.0.0/10",),
    ),
    row(
        "v6-metadata-range",
        N,
        ("fd00:ec2::254",),
        403,
        "deny",
        addr("fd00:ec2::254", "cloud metadata address"),
        allow=A,
        allow_private=True,
        allow_addresses=("fd00::/8",),
    ),
    row(
        "v6-metadata-exact",
        N,
        ("fd00:ec2::254",),
        200,
        "allow",
        allow=A,
        allow_addresses=("fd00:ec2::254/128",),
        detail=lifted(
            "fd00:ec2::254",
            "cloud metadata address",
            "allow_addresses entry 'fd00:ec2::254/128', which names it exactly",
        ),
    ),
    row(
        "v6-mapped-metadata-range",
        N,
        ("::ffff:169.254.169.254",),
        403,
        "deny",
        addr("::ffff:169.254.169.254", "cloud metadata address"),
        allow=A,
        allow_private=True,
        allow_addresses=("169.254.0.0/16",),
    ),
    row(
        "host-rules-decide-first",
        N,
        ("203.0.113.80",),
        403,
        "deny",
        no_rule(N),
        allow_addresses=("203.0.113.0/24",),
        resolves=False,
    ),
    # --- several addresses: every one is checked, and the first allowed one is used ---------------------------
    row("several-one-refused", N, (PUB4, "10.0.0.9"), 403, "deny", addr("10.0.0.9"), allow=A, resolved="10.0.0.9"),
    row(
        "several-all-reasons",
        N,
        ("fd12::1", "10.0.0.9"),
        403,
        "deny",
        addr("10.0.0.9") + "; " + addr("fd12::1", "unique-local IPv6 address"),
        allow=A,
        resolved="10.0.0.9",
    ),
    row(
        "several-lifted-and-public",
        N,
        ("10.0.0.9", PUB4),
        200,
        "allow",
        allow=A,
        allow_private=True,
        resolved="10.0.0.9",
        detail=lifted("10.0.0.9", "private address", "allow_private"),
    ),
    row(
        "several-each-lifted-named",
        N,
        ("10.0.0.9", "172.20.0.1"),
        200,
        "allow",
        allow=A,
        allow_addresses=("10.0.0.0/8", "172.16.0.0/12"),
        detail=lifted("10.0.0.9", "private address", "allow_addresses entry '10.0.0.0/8'")
        + "; "
        + lifted("172.20.0.1", "private address", "allow_addresses entry '172.16.0.0/12'"),
    ),
    row("several-duplicates", N, (PUB4, PUB4, PUB6), 200, "allow", allow=A, resolved=PUB4),
    # --- names that do not resolve ----------------------------------------------------------------------------
    row(
        "nxdomain-allowed-is-an-error",
        N,
        NX,
        502,
        "error",
        f"cannot resolve {NAME}",
        allow=A,
        rule=NAME,
        resolved=None,
        detail="unresolvable",
    ),
    row("empty-answer-is-an-error", N, (), 502, "error", f"cannot resolve {NAME}", allow=A, detail="unresolvable"),
    row("nxdomain-not-allowed-is-a-refusal", N, NX, 403, "deny", no_rule(N), resolves=False),
    # --- report mode: the connection goes ahead, every reason is recorded -------------------------------------
    row("report-no-rule", N, (PUB4,), 200, "would_deny", no_rule(N), mode="report", rule=None, resolved=PUB4),
    row(
        "report-refused-address",
        N,
        ("10.0.0.9",),
        200,
        "would_deny",
        addr("10.0.0.9"),
        mode="report",
        allow=A,
        resolved="10.0.0.9",
    ),
    row(
        "report-both-reasons", N, ("10.0.0.9",), 200, "would_deny", no_rule(N) + "; " + addr("10.0.0.9"), mode="report"
    ),
    row(
        "report-deny-rule",
        N,
        (PUB4,),
        200,
        "would_deny",
        f"denied by rule '{NAME}'",
        mode="report",
        allow=A,
        deny=A,
        rule=NAME,
    ),
    row("report-allowed", N, (PUB4,), 200, "allow", mode="report", allow=A),
    row(
        "report-lifted",
        N,
        ("10.0.0.9",),
        200,
        "allow",
        mode="report",
        allow=A,
        allow_addresses=("10.0.0.9",),
        detail=lifted("10.0.0.9", "private address", "allow_addresses entry '10.0.0.9'"),
    ),
    row(
        "report-still-refuses-metadata",
        N,
        ("169.254.169.254",),
        403,
        "deny",
        no_rule(N) + "; " + addr("169.254.169.254", "cloud metadata address"),
        mode="report",
        resolved="169.254.169.254",
    ),
    row(
        "report-still-refuses-loopback",
        N,
        ("127.0.0.1",),
        403,
        "deny",
        addr("127.0.0.1", "loopback address"),
        mode="report",
        allow=A,
    ),
    row(
        "report-still-refuses-unspecified",
        N,
        ("::",),
        403,
        "deny",
        addr("::", "unspecified address"),
        mode="report",
        allow=A,
    ),
    row(
        "report-still-refuses-a-mix",
        N,
        (PUB4, "169.254.169.254"),
        403,
        "deny",
        addr("169.254.169.254", "cloud metadata address"),
        mode="report",
        allow=A,
        resolved="169.254.169.254",
    ),
    row(
        "report-loopback-by-entry",
        N,
        ("127.0.0.1",),
        200,
        "would_deny",
        no_rule(N),
        mode="report",
        allow_addresses=("127.0.0.1",),
        detail=lifted("127.0.0.1", "loopback address", "allow_addresses entry '127.0.0.1'"),
    ),
    row(
        "report-metadata-by-exact-entry",
        N,
        ("169.254.169.254",),
        200,
        "would_deny",
        no_rule(N),
        mode="report",
        allow_addresses=("169.254.169.254/32",),
        detail=lifted(
            "169.254.169.254",
            "cloud metadata address",
            "allow_addresses entry '169.254.169.254/32', which names it exactly",
        ),
    ),
    row(
        "report-unspecified-never",
        N,
        ("0.0.0.0",),
        403,
        "deny",
        no_rule(N) + "; " + addr("0.0.0.0", "unspecified address"),
        mode="report",
        allow_addresses=("0.0.0.0/8",),
    ),
    row("report-nxdomain-stays-would_deny", N, NX, 502, "would_deny", no_rule(N), mode="report", detail="unresolvable"),
    row(
        "report-nxdomain-allowed-is-an-error",
        N,
        NX,
        502,
        "error",
        f"cannot resolve {NAME}",
        mode="report",
        allow=A,
        detail="unresolvable",
    ),
    # --- the model gateway: always reachable, never resolved, on its port only ---------------------------------
    row("gateway", "sidecar:8080", NX, 200, "allow", rule="gateway", resolved="127.0.0.1", resolves=False),
    row(
        "gateway-whatever-the-deny-rules",
        "sidecar:8080",
        NX,
        200,
        "allow",
        deny=("sidecar",),
        rule="gateway",
        resolves=False,
    ),
    row("gateway-case", "SIDECAR:8080", NX, 200, "allow", rule="gateway", host="sidecar"),
    row("gateway-other-port", "sidecar:8081", NX, 403, "deny", no_rule("sidecar:8081")),
    row("gateway-trailing-dot-is-another-name", "sidecar.:8080", NX, 403, "deny", no_rule("sidecar.:8080")),
    # --- internationalised names: rules and requests use the ASCII (punycode) form ----------------------------
    row("puny", "xn--bcher-kva.example:443", (PUB4,), 200, "allow", allow=("xn--bcher-kva.example",)),
    row("puny-case", "XN--BCHER-KVA.example:443", (PUB4,), 200, "allow", allow=("xn--bcher-kva.example",)),
    row("puny-wildcard", "www.xn--bcher-kva.example:443", (PUB4,), 200, "allow", allow=("*.xn--bcher-kva.example",)),
    row(
        "puny-another-name",
        "xn--bcher-kvb.example:443",
        (PUB4,),
        403,
        "deny",
        no_rule("xn--bcher-kvb.example:443"),
        allow=("xn--bcher-kva.example",),
    ),
    # A raw UTF-8 name is not HTTP: refused by the parser before any rule, and no decision line.
    row("unicode-name", "bücher.example:443", (PUB4,), 400, None, allow=("xn--bcher-kva.example",), resolves=False),
    # --- over-long names --------------------------------------------------------------------------------------
    row("253-characters", f"{long_name(253)}:443", (PUB4,), 200, "allow", allow=("*.example.com",)),
    row(
        "254-characters",
        f"{long_name(254)}:443",
        (PUB4,),
        403,
        "deny",
        "a host name longer than 253 characters",
        allow=("*.example.com",),
        host=long_name(254)[:253] + "…",
        resolves=False,
    ),
    row(
        "4000-characters",
        f"{long_name(4000)}:443",
        (PUB4,),
        403,
        "deny",
        "a host name longer than 253 characters",
        allow=("*.example.com",),
        host=long_name(4000)[:253] + "…",
        resolves=False,
    ),
    # --- names that are no host names: refused before any rule or lookup, whatever the wildcard says ---------
    row(
        "label-over-63",
        f"{'a' * 64}.example.com:443",
        (PUB4,),
        403,
        "deny",
        BAD_NAME,
        allow=("*.example.com",),
        resolves=False,
    ),
    row(
        "empty-label", "evil..example.com:443", (PUB4,), 403, "deny", BAD_NAME, allow=("*.example.com",), resolves=False
    ),
    row(
        "backslash-in-name",
        "evil.com\\.example.com:443",
        (PUB4,),
        403,
        "deny",
        BAD_NAME,
        allow=("*.example.com",),
        resolves=False,
    ),
    row(
        "percent-in-name",
        "evil.com%2f.example.com:443",
        (PUB4,),
        403,
        "deny",
        BAD_NAME,
        allow=("*.example.com",),
        resolves=False,
    ),
    row(
        "leading-hyphen-label",
        "-x.example.com:443",
        (PUB4,),
        403,
        "deny",
        BAD_NAME,
        allow=("*.example.com",),
        resolves=False,
    ),
    # As in a rule: no host name has an underscore, so a wildcard cannot be made to match one.
    row(
        "underscore-in-name",
        "_x.example.com:443",
        (PUB4,),
        403,
        "deny",
        BAD_NAME,
        allow=("*.example.com",),
        resolves=False,
    ),
]


class FakeDNS:
    """Answers from the row; an IP literal resolves to itself, as getaddrinfo does."""

    def __init__(self, answers: tuple[str, ...] | None) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        if self.answers is None:
            raise OSError("Name or service not known")
        return list(self.answers)


async def through_proxy(r: Row) -> tuple[int, list[dict[str, Any]], FakeDNS, list[tuple[str, int]]]:
    """One CONNECT through a proxy for the row's policy: the status, the decision lines, the resolver, and where
    the proxy connected. The client closes as soon as it has the response head; nothing sleeps."""
    lines: list[dict[str, Any]] = []
    dns = FakeDNS(r.dns)
    connected: list[tuple[str, int]] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # an upstream that hangs up at once ends the tunnel at once

    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = up.sockets[0].getsockname()[1]

    async def connect(ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        connected.append((ip, port))
        return await asyncio.open_connection("127.0.0.1", up_port)

    proxy = EgressProxy(
        "r1",
        list(r.allow),
        list(r.deny),
        r.mode,
        r.allow_private,
        OWN,
        GATEWAY,
        lines.append,
        allow_addresses=r.allow_addresses,
        resolve=dns,
    )
    proxy.connect = connect  # every allowed address is this machine's test server
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await proxy.handle(reader, writer)
        finally:
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(f"CONNECT {r.target} HTTP/1.1\r\nhost: {r.target}\r\n\r\n".encode())
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            await done.wait()
    finally:
        server.close()
        up.close()
    return int(head.split()[1]), lines, dns, connected


@pytest.mark.parametrize("r", TABLE)
def test_decision(r: Row) -> None:
    status, lines, dns, connected = asyncio.run(through_proxy(r))
    assert status == r.status
    if r.decision is None:
        assert lines == []
    else:
        (line,) = lines
        host, _, port = r.target.rpartition(":")
        expected: dict[str, Any] = {
            "decision": r.decision,
            "reason": r.reason,
            "decision_detail": r.detail,
            "host": host.strip("[]").lower() if r.host is SKIP else r.host,
            "port": int(port),
            "method": "CONNECT",
        }
        for key, value in (("rule", r.rule), ("resolved", r.resolved)):
            if value is not SKIP:
                expected[key] = value
        assert {k: line.get(k) for k in expected} == expected
        # The proxy connects to the very address it checked, and a refused connection goes nowhere.
        assert connected == ([(line["resolved"], int(port))] if status == 200 else [])
        if (
            r.mode == "enforce"
            and r.decision == "deny"
            and (r.reason or "").startswith(("no allow rule", "denied by rule"))
        ):
            assert dns.asked == [], "a name the host rules refuse is never resolved"
    if r.resolves is not SKIP:
        assert bool(dns.asked) is r.resolves


def test_the_table_covers_every_kind_of_address_and_outcome() -> None:
    """A guard against the table thinning out: each address kind and each outcome keeps at least one row."""
    rows: list[Row] = [p.values[0] for p in TABLE]
    reasons = " ".join(r.reason or "" for r in rows) + " ".join(r.detail or "" for r in rows)
    for kind in (
        "private address",
        "reserved address",
        "multicast address",
        "loopback address",
        "unspecified address",
        "link-local address",
        "unique-local IPv6 address",
        "cloud metadata address",
        "address of the host itself",
    ):
        assert kind in reasons, kind
    assert {r.decision for r in rows} == {"allow", "deny", "would_deny", "error", None}
    assert {r.status for r in rows} == {200, 400, 403, 502}


# --- the rule syntax -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "wildcard", "ports"),
    [
        ("pypi.org", "pypi.org", False, DEFAULT_PORTS),
        ("  PyPI.Org.  ", "pypi.org", False, DEFAULT_PORTS),
        ("*.Example.com:8443", "example.com", True, (8443,)),
        ("*.co.uk", "co.uk", True, DEFAULT_PORTS),  # two labels: not refused as a top-level domain
        ("mirror.corp:1", "mirror.corp", False, (1,)),
        ("mirror.corp:65535", "mirror.corp", False, (65535,)),
        ("localhost", "localhost", False, DEFAULT_PORTS),
        ("10.0.0.1:8080", "10.0.0.1", False, (8080,)),
        ("[2001:DB8::1]:8443", "2001:db8::1", False, (8443,)),
        ("[2001:db8::1]", "2001:db8::1", False, DEFAULT_PORTS),
        ("2001:db8:0::1", "2001:db8::1", False, DEFAULT_PORTS),
        # An unbracketed IPv6 address with a port is itself an address: write [2001:db8::1]:8443 for the port.
        ("2001:db8::1:8443", "2001:db8::1:8443", False, DEFAULT_PORTS),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", False, DEFAULT_PORTS),
        ("a" * 63 + ".example", "a" * 63 + ".example", False, DEFAULT_PORTS),
    ],
)
def test_rules_parse(text: str, host: str, wildcard: bool, ports: tuple[int, ...]) -> None:
    rule = parse_rule(text)
    assert (rule.text, rule.host, rule.wildcard, rule.ports) == (text, host, wildcard, ports)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty rule"),
        ("   ", "empty rule"),
        ("https://pypi.org/simple", "no scheme in a rule; write the host name only (e.g. 'pypi.org')"),
        ("pypi.org/simple", "no path in a rule"),
        ("*", "a bare '*' would allow every host"),
        ("*.*", "a bare '*' would allow every host"),
        ("*:443", "a bare '*' would allow every host"),
        ("*.com", "would match a whole top-level domain"),
        ("*example.com", "'*' may only stand as the whole first label"),
        ("a.*.example.com", "'*' may only stand as the whole first label"),
        ("*.10.0.0.1", "a wildcard cannot stand before an IP address"),
        ("pypi.org:0", "port 0 is out of range"),
        ("pypi.org:65536", "port 65536 is out of range"),
        ("pypi.org:http", "not a valid host name"),
        ("-pypi.org", "not a valid host name"),
        ("pypi-.org", "not a valid host name"),
        ("py_pi.org", "not a valid host name"),
        ("pypi..org", "not a valid host name"),
        ("a" * 64 + ".example", "not a valid host name"),
        ("bücher.example", "not a valid host name"),
        ("[pypi.org]:443", "brackets hold an IPv6 address"),
        ("[10.0.0.1]:443", "brackets hold an IPv6 address"),
        ("[2001:db8::1]:99999", "port 99999 is out of range"),
    ],
)
def test_bad_rules_are_refused_naming_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_rule(text)


def test_a_rule_matches_only_its_own_kind_of_host() -> None:
    """A host rule never matches an address, nor an address rule a name that merely looks like one."""
    assert not parse_rule("10.0.0.1").matches("10.0.0.1.nip.io", 443)
    assert not parse_rule("*.0.0.1.nip.io").matches("10.0.0.1", 443)
    assert parse_rule("2001:db8::1").matches("2001:0db8:0000::1", 80)
    assert not parse_rule("2001:db8::1").matches("2001:db8::2", 80)
