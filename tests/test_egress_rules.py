"""Egress rules without Docker: address classes and their exceptions, policy validation, the proxy's
decision with an injected resolver, and the suggestion built from decision lines."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent_sandbox.config.policy import load_policy
from agent_sandbox.errors import UsageError
from agent_sandbox.sidecar.egress import (
    METADATA,
    Egress,
    EgressSuggestion,
    address_kind,
    blocked_address,
    check_address,
    overview,
    parse_address_entry,
    parse_rule,
    refusals,
    rule_text,
    suggest,
)
from agent_sandbox.sidecar.proxy import EgressProxy, Refused

OWN = ["172.17.0.1", "192.168.7.20", "fe80::42%eth0"]

# --- address classes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "kind"), [
    ("151.101.0.223", None),
    ("2a04:4e42::223", None),
    ("203.0.113.80", "private address"),  # TEST-NET-3: where a TLS-inspecting proxy's names resolve here
    ("10.1.2.3", "private address"),
    ("172.20.0.5", "private address"),
    ("192.168.1.1", "private address"),
    ("100.64.0.1", "reserved address"),  # shared address space: not global, not 'private' to Python
    ("240.0.0.1", "private address"),
    ("224.0.0.1", "multicast address"),
    ("127.0.0.1", "loopback address"),
    ("127.8.9.10", "loopback address"),
    ("::1", "loopback address"),
    ("::ffff:127.0.0.1", "loopback address"),
    ("0.0.0.0", "unspecified address"),
    ("::", "unspecified address"),
    ("169.254.1.1", "link-local address"),
    ("fe80::1", "link-local address"),
    ("fd12:3456::1", "unique-local IPv6 address"),
    ("172.17.0.1", "address of the host itself"),
    ("192.168.7.20", "address of the host itself"),
    ("fe80::42", "address of the host itself"),
    ("169.254.169.254", "cloud metadata address"),
    ("169.254.170.2", "cloud metadata address"),
    ("100.100.100.200", "cloud metadata address"),
    ("fd00:ec2::254", "cloud metadata address"),
    ("::ffff:169.254.169.254", "cloud metadata address"),
    ("64:ff9b::a9fe:a9fe", "cloud metadata address"),  # NAT64 of 169.254.169.254
])
def test_address_kind(ip: str, kind: str | None) -> None:
    assert address_kind(ip, OWN) == kind


# (address, allow_private, allow_addresses, blocked?, exception fragment)
CASES: list[tuple[str, bool, list[str], bool, str | None]] = [
    # Public addresses need no exception.
    ("151.101.0.223", False, [], False, None),
    # Private: refused by default, lifted by allow_private or a covering allow_addresses entry.
    ("203.0.113.80", False, [], True, None),
    ("203.0.113.80", True, [], False, "allow_private"),
    ("203.0.113.80", False, ["203.0.113.80"], False, "'203.0.113.80'"),
    ("203.0.113.80", False, ["203.0.113.80/32"], False, "'203.0.113.80/32'"),
    ("203.0.113.80", False, ["203.0.113.0/24"], False, "'203.0.113.0/24'"),
    ("203.0.113.80", False, ["203.0.114.0/24"], True, None),
    ("203.0.113.80", True, ["203.0.113.0/24"], False, "'203.0.113.0/24'"),  # the entry is named, not allow_private
    ("10.9.8.7", False, ["10.0.0.0/8", "10.9.0.0/16"], False, "'10.9.0.0/16'"),  # the narrowest entry
    ("100.64.0.1", True, [], False, "allow_private"),
    ("fd12:3456::1", False, ["fd12:3456::/32"], False, "'fd12:3456::/32'"),
    ("fd12:3456::1", False, ["10.0.0.0/8"], True, None),  # versions do not mix
    # The host's own addresses: allow_private or an entry.
    ("172.17.0.1", False, [], True, None),
    ("172.17.0.1", True, [], False, "allow_private"),
    ("172.17.0.1", False, ["172.17.0.1/32"], False, "'172.17.0.1/32'"),
    # Link-local (not metadata): allow_private or an entry.
    ("169.254.1.1", True, [], False, "allow_private"),
    ("169.254.1.1", False, ["169.254.0.0/16"], False, "'169.254.0.0/16'"),
    # Loopback is the sidecar itself: never through allow_private, only through an entry covering it.
    ("127.0.0.1", True, [], True, None),
    ("::1", True, [], True, None),
    ("127.0.0.1", False, ["127.0.0.0/8"], False, "'127.0.0.0/8'"),
    ("127.0.0.1", False, ["127.0.0.1"], False, "'127.0.0.1'"),
    ("::1", False, ["::1/128"], False, "'::1/128'"),
    # The unspecified address reaches the sidecar itself too, and nothing lifts it.
    ("0.0.0.0", True, ["0.0.0.0/8"], True, None),
    # Metadata: only an entry naming exactly that address; never a range, never allow_private.
    ("169.254.169.254", True, [], True, None),
    ("169.254.169.254", True, ["169.254.0.0/16"], True, None),
    ("169.254.169.254", False, ["169.254.169.0/24", "169.254.169.254/31"], True, None),
    ("169.254.169.254", False, ["169.254.169.254/32"], False, "'169.254.169.254/32', which names it exactly"),
    ("169.254.169.254", False, ["169.254.169.254"], False, "names it exactly"),
    ("169.254.170.2", True, ["169.254.0.0/16"], True, None),
    ("169.254.170.2", False, ["169.254.170.2/32"], False, "names it exactly"),
    ("100.100.100.200", True, ["100.64.0.0/10"], True, None),
    ("fd00:ec2::254", True, ["fd00::/8"], True, None),
    ("fd00:ec2::254", False, ["fd00:ec2::254/128"], False, "names it exactly"),
    ("::ffff:169.254.169.254", True, ["169.254.0.0/16"], True, None),
]


@pytest.mark.parametrize(("ip", "allow_private", "entries", "blocked", "exception"), CASES)
def test_check_address(ip: str, allow_private: bool, entries: list[str], blocked: bool,
                       exception: str | None) -> None:
    check = check_address(ip, OWN, allow_private, entries)
    assert check.blocked is blocked
    if exception is None:
        assert check.exception is None and check.detail is None
    else:
        assert check.exception is not None and exception in check.exception
        assert check.detail == f"{ip} ({check.kind}) let through by {check.exception}"
    assert (blocked_address(ip, OWN, allow_private, entries) is not None) is blocked


def test_every_metadata_address_needs_an_exact_entry() -> None:
    for addr in METADATA:
        for prefix in (addr.max_prefixlen - 1, addr.max_prefixlen - 8, 8):
            entry = str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
            assert check_address(str(addr), (), True, [entry]).blocked, entry
        assert not check_address(str(addr), (), False, [f"{addr}/{addr.max_prefixlen}"]).blocked


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "fragment"), [
    ("0.0.0.0/0", "'0.0.0.0/0' would lift the block on every address; name narrower ranges"),
    ("::/0", "'::/0' would lift the block on every address; name narrower ranges"),
    ("0.0.0.0/1", "'0.0.0.0/1' is far too wide; name narrower ranges (IPv4 entries must be /8 or longer)"),
    ("fc00::/7", "'fc00::/7' is far too wide; name narrower ranges (IPv6 entries must be /8 or longer)"),
    ("10.1.2.3/8", "'10.1.2.3/8' has host bits set: write the network '10.0.0.0/8', or '10.1.2.3/32'"),
    ("proxy.corp.example", "'proxy.corp.example' is not an IP address or CIDR range"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or CIDR range"),
    ("::ffff:10.0.0.0/104", "IPv4-mapped IPv6 range; write it in IPv4 form"),
    ("", "empty entry"),
])
def test_bad_address_entries_are_rejected_with_a_message_naming_them(entry: str, fragment: str,
                                                                     tmp_path: Path) -> None:
    with pytest.raises(ValueError) as exc:
        parse_address_entry(entry)
    assert fragment in str(exc.value)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"egress": {"allow_addresses": ["10.20.0.0/16", entry]}}))
    with pytest.raises(UsageError) as err:
        load_policy(str(p))
    assert f"{p}: egress.allow_addresses: " in err.value.message and fragment in err.value.message


def test_every_bad_entry_is_named_at_once(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("egress:\n  allow_addresses: ['0.0.0.0/0', 'nope', 10.0.0.0/8]\n")
    with pytest.raises(UsageError) as err:
        load_policy(str(p))
    assert "'0.0.0.0/0'" in err.value.message and "'nope'" in err.value.message
    assert "'10.0.0.0/8'" not in err.value.message


@pytest.mark.parametrize("entry", ["10.0.0.0/8", "203.0.113.80", "203.0.113.80/32", "fd12:3456::/48",
                                   "169.254.169.254", " 192.168.0.0/16 ", "fd00::/8"])
def test_good_address_entries_load(entry: str) -> None:
    assert Egress(allow_addresses=[entry]).allow_addresses == [entry]


def test_policy_without_allow_addresses_is_unchanged_otherwise() -> None:
    eg = Egress()
    assert eg.allow_addresses == [] and eg.allow_private is False and eg.ca_certificates == []


@pytest.mark.parametrize(("rule", "host", "port", "matches"), [
    ("[fd00::1]:8443", "fd00::1", 8443, True),
    ("[fd00::1]:8443", "fd00::1", 443, False),
    ("fd00::1", "fd00:0::1", 443, True),
    ("203.0.113.7", "203.0.113.7", 443, True),
    ("203.0.113.7:8080", "203.0.113.7", 8080, True),
])
def test_ip_rules(rule: str, host: str, port: int, matches: bool) -> None:
    assert parse_rule(rule).matches(host, port) is matches


def test_rule_text_round_trips() -> None:
    for host, port in (("pypi.org", 443), ("pypi.org", 80), ("mirror.corp", 8443), ("fd00::1", 8443),
                       ("203.0.113.7", 443)):
        assert parse_rule(rule_text(host, port)).matches(host, port)
    assert rule_text("pypi.org", 443) == "pypi.org" and rule_text("mirror.corp", 8443) == "mirror.corp:8443"
    assert rule_text("fd00::1", 8443) == "[fd00::1]:8443"
    with pytest.raises(ValueError, match="brackets hold an IPv6 address"):
        parse_rule("[not-an-ip]:443")


# --- the proxy's decision, with an injected resolver ----------------------------------------------------------

def _proxy(mode: str = "enforce", allow: tuple[str, ...] = ("pypi.org",), allow_private: bool = False,
           allow_addresses: tuple[str, ...] = (), table: dict[str, list[str]] | None = None) -> EgressProxy:
    table = table if table is not None else {"pypi.org": ["203.0.113.80"], "other.example": ["203.0.113.81"],
                                             "meta.example": ["169.254.169.254"], "public.example": ["151.101.0.1"],
                                             "mixed.example": ["151.101.0.2", "10.0.0.9"],
                                             "local.example": ["127.0.0.1"], "zero.example": ["0.0.0.0"]}
    asked: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise OSError("no such name")
        return table[host]

    p = EgressProxy("r1", list(allow), [], mode, allow_private, ["172.17.0.1"], ("sidecar", 8080),
                    lambda e: None, allow_addresses=allow_addresses, resolve=resolve)
    p.asked = asked  # type: ignore[attr-defined]
    return p


def _decide(proxy: EgressProxy, host: str, port: int = 443) -> tuple[dict[str, Any], str | Refused]:
    rec: dict[str, Any] = {"decision": "deny", "rule": None, "reason": None, "resolved": None}
    try:
        return rec, asyncio.run(proxy._decide(host, port, rec))
    except Refused as exc:
        return rec, exc


def test_decide_enforce_refuses_a_private_address_and_names_it() -> None:
    rec, res = _decide(_proxy(), "pypi.org")
    assert isinstance(res, Refused) and res.status == 403
    assert rec["decision"] == "deny" and rec["rule"] == "pypi.org" and rec["resolved"] == "203.0.113.80"
    assert rec["reason"] == "pypi.org resolves to 203.0.113.80, a private address"


def test_decide_allow_addresses_lets_the_address_through_and_says_why() -> None:
    rec, res = _decide(_proxy(allow_addresses=("203.0.113.80/32",)), "pypi.org")
    assert res == "203.0.113.80" and rec["decision"] == "allow" and rec["reason"] is None
    assert rec["decision_detail"] == ("203.0.113.80 (private address) let through by allow_addresses entry "
                                      "'203.0.113.80/32'")
    rec, _ = _decide(_proxy(allow_private=True), "pypi.org")
    assert rec["decision"] == "allow" and rec["decision_detail"].endswith("let through by allow_private")


def test_decide_host_rules_decide_first() -> None:
    proxy = _proxy(allow_addresses=("203.0.113.0/24",))
    rec, res = _decide(proxy, "other.example")
    assert isinstance(res, Refused) and rec["decision"] == "deny"
    assert rec["reason"] == "no allow rule matches other.example:443"
    assert proxy.asked == []  # type: ignore[attr-defined]  # a denied name is not even resolved


def test_decide_metadata_stays_refused_with_allow_private_and_a_range() -> None:
    proxy = _proxy(allow=("meta.example",), allow_private=True, allow_addresses=("169.254.0.0/16",))
    rec, res = _decide(proxy, "meta.example", 80)
    assert isinstance(res, Refused) and res.status == 403
    assert rec["reason"] == "meta.example resolves to 169.254.169.254, a cloud metadata address"


def test_decide_any_refused_address_refuses_the_name() -> None:
    rec, res = _decide(_proxy(allow=("mixed.example",)), "mixed.example")
    assert isinstance(res, Refused) and rec["resolved"] == "10.0.0.9"
    assert rec["reason"] == "mixed.example resolves to 10.0.0.9, a private address"


def test_decide_report_mode_keeps_every_reason() -> None:
    proxy = _proxy(mode="report", allow=())
    rec, res = _decide(proxy, "pypi.org")
    assert res == "203.0.113.80" and rec["decision"] == "would_deny"
    assert rec["reason"] == ("no allow rule matches pypi.org:443; "
                             "pypi.org resolves to 203.0.113.80, a private address")
    assert [r.kind for r in refusals(rec["reason"])] == ["no_rule", "address"]
    # Only the host rule fails: one reason. Only the address: one reason.
    rec, _ = _decide(proxy, "public.example")
    assert rec["decision"] == "would_deny" and rec["reason"] == "no allow rule matches public.example:443"
    rec, _ = _decide(_proxy(mode="report"), "pypi.org")
    assert rec["decision"] == "would_deny"
    assert rec["reason"] == "pypi.org resolves to 203.0.113.80, a private address"
    # Allowed on both counts: allow.
    rec, _ = _decide(_proxy(mode="report", allow_addresses=("203.0.113.80",)), "pypi.org")
    assert rec["decision"] == "allow" and rec["reason"] is None


@pytest.mark.parametrize(("host", "kind"), [("meta.example", "cloud metadata"), ("local.example", "loopback"),
                                            ("zero.example", "unspecified")])
def test_report_mode_still_refuses_addresses_whose_reaching_is_the_harm(host, kind) -> None:
    rec, res = _decide(_proxy(mode="report", allow=()), host)
    assert isinstance(res, Refused) and res.status == 403 and rec["decision"] == "deny"
    assert f"{kind} address" in rec["reason"]
    # ...unless an allow_addresses entry names it, as in enforce mode (never for the unspecified address).
    ip = {"meta.example": "169.254.169.254", "local.example": "127.0.0.1", "zero.example": "0.0.0.0"}[host]
    rec, res = _decide(_proxy(mode="report", allow=(), allow_addresses=(ip,)), host)
    assert rec["decision"] == ("deny" if kind == "unspecified" else "would_deny"), rec


def test_decide_report_mode_unresolvable_stays_would_deny() -> None:
    rec, res = _decide(_proxy(mode="report", allow=()), "nowhere.example")
    assert isinstance(res, Refused) and res.status == 502
    assert rec["decision"] == "would_deny" and rec["decision_detail"] == "unresolvable"
    assert rec["reason"] == "no allow rule matches nowhere.example:443"


def test_decide_gateway_is_always_reachable() -> None:
    rec, res = _decide(_proxy(allow=()), "sidecar", 8080)
    assert res == "127.0.0.1" and rec["decision"] == "allow" and rec["rule"] == "gateway"


# --- the suggestion -----------------------------------------------------------------------------------------

def line(decision: str, host: str, port: int, reason: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"decision": decision, "host": host, "port": port, "reason": reason, "rule": kw.get("rule"),
            "decision_detail": kw.get("detail")}


NPM_REASONS = ("no allow rule matches registry.npmjs.org:443; "
               "registry.npmjs.org resolves to 203.0.113.80, a private address")
LINES = [
    line("allow", "sidecar", 8080, rule="gateway"),
    line("allow", "github.com", 443, rule="github.com"),
    line("allow", "pypi.org", 443, rule="pypi.org", detail="203.0.113.80 (private address) let through by "
         "allow_addresses entry '203.0.113.80'"),
    line("would_deny", "registry.npmjs.org", 443, NPM_REASONS),
    line("would_deny", "registry.npmjs.org", 443, NPM_REASONS),
    line("would_deny", "mirror.corp", 8443, "no allow rule matches mirror.corp:8443"),
    line("would_deny", "files.pythonhosted.org", 443,
         "files.pythonhosted.org resolves to 203.0.113.79, a private address", rule="files.pythonhosted.org"),
    line("deny", "x.evil.example", 443, "denied by rule '*.evil.example'", rule="*.evil.example"),
    line("deny", "meta.example", 80, "meta.example resolves to 169.254.169.254, a cloud metadata address"),
    line("deny", "nowhere.example", 443, "cannot resolve nowhere.example"),
    line("deny", "fd.example", 443, "fd.example resolves to fd12::1, a unique-local IPv6 address; "
         "fd.example resolves to 10.0.0.1, a private address"),
    line("deny", "0.example", 443, "0.example resolves to 0.0.0.0, an unspecified address"),
    line("error", "down.example", 443, "cannot connect to down.example:443 (151.101.0.9): timeout"),
    line("would_deny", "[v6]", 9000, "no allow rule matches fd00::7:9000"),
    {"decision": "deny", "host": None, "port": None, "reason": "bad request: timeout reading the request"},
]


def test_suggest_builds_sorted_deduplicated_entries() -> None:
    s = suggest(LINES)
    assert s.allow == ["[v6]:9000", "mirror.corp:8443", "registry.npmjs.org"]
    assert s.allow_addresses == ["10.0.0.1/32", "203.0.113.79/32", "203.0.113.80/32", "fd12::1/128"]


def test_suggest_yaml_is_policy_yaml() -> None:
    s = EgressSuggestion(allow=["mirror.corp:8443", "registry.npmjs.org"], allow_addresses=["203.0.113.80/32"])
    text = s.yaml()
    assert text == ('egress:\n  allow: ["mirror.corp:8443", "registry.npmjs.org"]\n'
                    '  allow_addresses: ["203.0.113.80/32"]\n')
    data = yaml.safe_load(text)
    assert Egress.model_validate(data["egress"]).allow == s.allow
    assert EgressSuggestion(allow=["a.example"]).yaml() == 'egress:\n  allow: ["a.example"]\n'
    assert EgressSuggestion().yaml() == "" and EgressSuggestion().empty


def test_suggest_never_names_metadata_and_skips_deny_rules() -> None:
    s = suggest([line("deny", "meta.example", 80,
                      "meta.example resolves to 169.254.169.254, a cloud metadata address"),
                 line("deny", "x.evil.example", 443, "denied by rule '*.evil.example'")])
    assert s.empty


def test_suggest_from_enforce_mode_denials() -> None:
    s = suggest([line("deny", "pypi.org", 443, "no allow rule matches pypi.org:443"),
                 line("deny", "files.pythonhosted.org", 443,
                      "files.pythonhosted.org resolves to 203.0.113.80, a private address")])
    assert s.allow == ["pypi.org"] and s.allow_addresses == ["203.0.113.80/32"]


def test_overview_groups_hosts_with_reasons() -> None:
    net = overview(LINES)
    assert [(h.host, h.port, h.connections) for h in net.allowed] == [("github.com", 443, 1), ("pypi.org", 443, 1)]
    assert net.allowed[1].reasons == ["203.0.113.80 (private address) let through by allow_addresses entry "
                                      "'203.0.113.80'"]
    npm = net.would_deny[0]
    assert (npm.host, npm.connections) == ("registry.npmjs.org", 2)
    assert npm.reasons == ["no allow rule matches registry.npmjs.org:443",
                           "registry.npmjs.org resolves to 203.0.113.80, a private address"]
    assert {h.host for h in net.denied} == {"x.evil.example", "meta.example", "nowhere.example", "fd.example",
                                            "0.example"}
    assert net.suggestion == suggest(LINES)


def test_report_sections() -> None:
    from agent_sandbox.run.report import network, suggestion

    text = "\n".join(network(LINES, report_mode=True) + suggestion(LINES, report_mode=True))
    assert "Hosts allowed:\n\n- `github.com:443` (1)\n- `pypi.org:443` (1): 203.0.113.80 (private address)" in text
    assert "Would be denied (report mode):\n\n- `registry.npmjs.org:443` (2): no allow rule matches" in text
    assert "- `x.evil.example:443` (1): denied by rule '*.evil.example'" in text
    assert "## Policy lines to add" in text
    assert text.endswith("```yaml\n" + suggest(LINES).yaml() + "```\n")
    enforce = network(LINES[:3], report_mode=False)
    assert "Hosts denied: none" in enforce and not any("Would be denied" in x for x in enforce)
    assert suggestion(LINES[:3], report_mode=False) == []
    denied = [line("deny", "pypi.org", 443, "no allow rule matches pypi.org:443")]
    assert "## To allow the denied hosts" in suggestion(denied, report_mode=False)


def test_decide_an_allowed_name_that_does_not_resolve_is_an_error_not_a_refusal() -> None:
    rec, res = _decide(_proxy(allow=("nowhere.example",)), "nowhere.example")
    assert isinstance(res, Refused) and res.status == 502
    assert rec["decision"] == "error" and rec["reason"] == "cannot resolve nowhere.example"
