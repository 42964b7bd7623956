"""Egress rules without Docker, beside the decision table (test_egress_table.py): the metadata addresses'
exact-entry rule over the whole METADATA set, allow_addresses validation, and the suggestion, overview and
report built from decision lines."""

from __future__ import annotations

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
    blocked_address,
    check_address,
    overview,
    parse_address_entry,
    parse_rule,
    rule_text,
    suggest,
)

# --- addresses ---------------------------------------------------------------------------------------------
# Each kind of address and each exception is a row of the decision table; these are the checks the table
# cannot enumerate.


def test_every_metadata_address_needs_an_exact_entry() -> None:
    for addr in METADATA:
        for prefix in (addr.max_prefixlen - 1, addr.max_prefixlen - 8, 8):
            entry = str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))
            assert check_address(str(addr), (), True, [entry]).blocked, entry
        assert not check_address(str(addr), (), False, [f"{addr}/{addr.max_prefixlen}"]).blocked


@pytest.mark.parametrize(
    ("ip", "allow_private", "entries", "refused"),
    [
        ("151.101.0.223", False, [], None),
        ("10.1.2.3", False, [], "private address"),
        ("10.1.2.3", True, [], None),
        ("10.1.2.3", False, ["10.0.0.0/8"], None),
        ("127.0.0.1", True, [], "loopback address"),
        ("169.254.169.254", True, ["169.254.0.0/16"], "cloud metadata address"),
    ],
)
def test_blocked_address_names_the_kind_check_address_refuses(
    ip: str, allow_private: bool, entries: list[str], refused: str | None
) -> None:
    assert blocked_address(ip, (), allow_private, entries) == refused
    assert check_address(ip, (), allow_private, entries).blocked is (refused is not None)


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("0.0.0.0/0", "'0.0.0.0/0' would lift the block on every address; name narrower ranges"),
        ("::/0", "'::/0' would lift the block on every address; name narrower ranges"),
        ("0.0.0.0/1", "'0.0.0.0/1' is far too wide; name narrower ranges (IPv4 entries must be /8 or longer)"),
        ("fc00::/7", "'fc00::/7' is far too wide; name narrower ranges (IPv6 entries must be /8 or longer)"),
        ("10.1.2.3/8", "'10.1.2.3/8' has host bits set: write the network '10.0.0.0/8', or '10.1.2.3/32'"),
        ("proxy.corp.example", "'proxy.corp.example' is not an IP address or CIDR range"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or CIDR range"),
        ("::ffff:10.0.0.0/104", "IPv4-mapped IPv6 range; write it in IPv4 form"),
        ("", "empty entry"),
    ],
)
def test_bad_address_entries_are_rejected_with_a_message_naming_them(entry: str, fragment: str, tmp_path: Path) -> None:
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


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.0/8",
        "203.0.113.80",
        "203.0.113.80/32",
        "fd12:3456::/48",
        "169.254.169.254",
        " 192.168.0.0/16 ",
        "fd00::/8",
    ],
)
def test_good_address_entries_load(entry: str) -> None:
    assert Egress(allow_addresses=[entry]).allow_addresses == [entry]


def test_policy_without_allow_addresses_is_unchanged_otherwise() -> None:
    eg = Egress()
    assert eg.allow_addresses == [] and eg.allow_private is False and eg.ca_certificates == []


def test_rule_text_round_trips() -> None:
    for host, port in (
        ("pypi.org", 443),
        ("pypi.org", 80),
        ("mirror.corp", 8443),
        ("fd00::1", 8443),
        ("203.0.113.7", 443),
    ):
        assert parse_rule(rule_text(host, port)).matches(host, port)
    assert rule_text("pypi.org", 443) == "pypi.org" and rule_text("mirror.corp", 8443) == "mirror.corp:8443"
    assert rule_text("fd00::1", 8443) == "[fd00::1]:8443"
    with pytest.raises(ValueError, match="brackets hold an IPv6 address"):
        parse_rule("[not-an-ip]:443")


# --- the suggestion -----------------------------------------------------------------------------------------


def line(decision: str, host: str, port: int, reason: str | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "decision": decision,
        "host": host,
        "port": port,
        "reason": reason,
        "rule": kw.get("rule"),
        "decision_detail": kw.get("detail"),
    }


NPM_REASONS = (
    "no allow rule matches registry.npmjs.org:443; registry.npmjs.org resolves to 203.0.113.80, a private address"
)
LINES = [
    line("allow", "sidecar", 8080, rule="gateway"),
    line("allow", "github.com", 443, rule="github.com"),
    line(
        "allow",
        "pypi.org",
        443,
        rule="pypi.org",
        detail="203.0.113.80 (private address) let through by allow_addresses entry '203.0.113.80'",
    ),
    line("would_deny", "registry.npmjs.org", 443, NPM_REASONS),
    line("would_deny", "registry.npmjs.org", 443, NPM_REASONS),
    line("would_deny", "mirror.corp", 8443, "no allow rule matches mirror.corp:8443"),
    line(
        "would_deny",
        "files.pythonhosted.org",
        443,
        "files.pythonhosted.org resolves to 203.0.113.79, a private address",
        rule="files.pythonhosted.org",
    ),
    line("deny", "x.evil.example", 443, "denied by rule '*.evil.example'", rule="*.evil.example"),
    line("deny", "meta.example", 80, "meta.example resolves to 169.254.169.254, a cloud metadata address"),
    line("deny", "nowhere.example", 443, "cannot resolve nowhere.example"),
    line(
        "deny",
        "fd.example",
        443,
        "fd.example resolves to fd12::1, a unique-local IPv6 address; "
        "fd.example resolves to 10.0.0.1, a private address",
    ),
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
    assert text == (
        'egress:\n  allow: ["mirror.corp:8443", "registry.npmjs.org"]\n  allow_addresses: ["203.0.113.80/32"]\n'
    )
    data = yaml.safe_load(text)
    assert Egress.model_validate(data["egress"]).allow == s.allow
    assert EgressSuggestion(allow=["a.example"]).yaml() == 'egress:\n  allow: ["a.example"]\n'
    assert EgressSuggestion().yaml() == "" and EgressSuggestion().empty


def test_suggest_never_names_metadata_and_skips_deny_rules() -> None:
    s = suggest(
        [
            line("deny", "meta.example", 80, "meta.example resolves to 169.254.169.254, a cloud metadata address"),
            line("deny", "x.evil.example", 443, "denied by rule '*.evil.example'"),
        ]
    )
    assert s.empty


def test_suggest_from_enforce_mode_denials() -> None:
    s = suggest(
        [
            line("deny", "pypi.org", 443, "no allow rule matches pypi.org:443"),
            line(
                "deny",
                "files.pythonhosted.org",
                443,
                "files.pythonhosted.org resolves to 203.0.113.80, a private address",
            ),
        ]
    )
    assert s.allow == ["pypi.org"] and s.allow_addresses == ["203.0.113.80/32"]


def test_overview_groups_hosts_with_reasons() -> None:
    net = overview(LINES)
    assert [(h.host, h.port, h.connections) for h in net.allowed] == [("github.com", 443, 1), ("pypi.org", 443, 1)]
    assert net.allowed[1].reasons == [
        "203.0.113.80 (private address) let through by allow_addresses entry '203.0.113.80'"
    ]
    npm = net.would_deny[0]
    assert (npm.host, npm.connections) == ("registry.npmjs.org", 2)
    assert npm.reasons == [
        "no allow rule matches registry.npmjs.org:443",
        "registry.npmjs.org resolves to 203.0.113.80, a private address",
    ]
    assert {h.host for h in net.denied} == {
        "x.evil.example",
        "meta.example",
        "nowhere.example",
        "fd.example",
        "0.example",
    }
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
