"""Egress: the agent reaches only what the policy allows, and every attempt is on record.

Every run here uses the scripted model to make the real agent try something, then asserts through the
transcript (what the agent saw) and the audit trail (what the proxy decided). Traffic goes only to the
test hosts started on this machine, or to TEST-NET (192.0.2.1), which must fail.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.run.supervisor import host_addresses
from agent_sandbox.sidecar.egress import address_kind

from . import testhosts
from .conftest import git, labelled, start_run, tool_results

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

NAME = "testhost.sandbox.test"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testhosts.TestHosts]:
    yield from testhosts.start(tmp_path_factory.mktemp("testhosts"))


def policy(tmp_path: Path, hosts: testhosts.TestHosts, /, **egress: Any) -> Path:
    base: dict[str, Any] = {
        "allow": [f"{NAME}:{hosts.http_port}", f"{NAME}:{hosts.https_port}"],
        "allow_private": True,
        "hosts": {n: "host-gateway" for n in (NAME, "blocked.sandbox.test", "x.evil.sandbox.test")},
    }
    base.update(egress)
    p = tmp_path / "policy.yaml"
    p.write_text(json.dumps({"name": "egress-test", "egress": base}))
    return p


def article(kind: str | None) -> str:
    return f"{'an' if (kind or 'x')[0] in 'aeiou' else 'a'} {kind}"


def script(*commands: str) -> str:
    lines = ["turns:"] + [f"  - bash: {json.dumps(c)}" for c in commands] + ["  - text: done"]
    return "\n".join(lines) + "\n"


def proxy_events(run_dir: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in Path(run_dir, "audit.jsonl").read_text().splitlines()]
    return [e["payload"] for e in events if e["source"] == "proxy"]


def test_allowlist_enforced_and_every_attempt_logged(hosts, make_repo, sandbox, write_script, tmp_path) -> None:
    h, s = hosts.http_port, hosts.https_port
    no_proxy = "env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy"
    sc = script(
        f"curl -sS http://{NAME}:{h}/plain",
        f"curl -sSk https://{NAME}:{s}/tls",
        f"curl -sS -I http://{NAME}:{h}/head",
        f"curl -sS -o /dev/null -w '%{{http_code}} %{{redirect_url}}' http://{NAME}:{h}/redirect",
        f"curl -sS -i http://blocked.sandbox.test:{h}/",
        f"curl -sS -i http://x.evil.sandbox.test:{h}/",
        f"curl -sSk https://blocked.sandbox.test:{s}/ 2>&1; echo rc=$?",
        f"{no_proxy} curl -sS -m 20 https://192.0.2.1/ 2>&1; echo rc=$?",
        "curl -sS -m 20 -i https://192.0.2.1/ 2>&1; echo rc=$?",
        "getent hosts pypi.org; echo rc=$?; python3 -c \"import socket; socket.getaddrinfo('pypi.org', 443)\" 2>&1"
        " | tail -n 1; echo v6=$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6); ip route",
    )
    pol = policy(
        tmp_path,
        hosts,
        allow=[f"{NAME}:{h}", f"{NAME}:{s}", f"*.evil.sandbox.test:{h}"],
        deny=[f"*.evil.sandbox.test:{h}"],
    )
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "probe the network",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script(sc)),
        "--json",
    )
    assert res.code == 0, res.stderr
    summary = res.json()
    out = tool_results(summary["run_dir"])
    assert len(out) == 10
    # 1. Allowlisted: plain HTTP, HTTPS through CONNECT, HEAD; redirects are not followed for the client.
    assert out[0].strip() == "hello from the test host: GET /plain"
    assert out[1].strip() == "hello from the test host: GET /tls"
    assert out[2].startswith("HTTP/1.0 200") and "hello" not in out[2]
    assert out[3] == "302 http://elsewhere.sandbox.test/"
    # 2. Not allowlisted (here matched by no rule... and by a deny rule that beats an allow): 403 with a reason.
    assert out[4].startswith("HTTP/1.1 403")
    assert f"x-sandbox-egress-reason: no allow rule matches blocked.sandbox.test:{h}" in out[4]
    assert "sandbox egress proxy: no allow rule matches" in out[4]
    assert out[5].startswith("HTTP/1.1 403") and f"denied by rule '*.evil.sandbox.test:{h}'" in out[5]
    assert "CONNECT tunnel failed, response 403" in out[6] and "rc=56" in out[6]
    # 4. Without the proxy there is no route at all: it fails at once, it does not time out.
    assert "Network is unreachable" in out[7] or "Couldn't connect" in out[7], out[7]
    assert "rc=7" in out[7]
    # Through the proxy an IP literal is just another unlisted host.
    assert "CONNECT tunnel failed, response 403" in out[8]
    # 5. No DNS for outside names, no IPv6, and no default route.
    assert "rc=2" in out[9] and "gaierror" in out[9] and "v6=1" in out[9]
    assert "default" not in out[9]

    ev = proxy_events(summary["run_dir"])
    allowed = [e for e in ev if e["decision"] == "allow"]
    assert {(e["method"], e["port"]) for e in allowed} >= {("GET", h), ("CONNECT", s), ("HEAD", h)}
    assert all(e["host"] == NAME and e["resolved"] == hosts.address and e["bytes_down"] > 0 for e in allowed)
    assert all(e["rule"] in (f"{NAME}:{h}", f"{NAME}:{s}") for e in allowed)
    # 3. Denials are logged with the rule that decided (or none), and carry no bytes.
    denied = {(e["host"], e["port"]): e for e in ev if e["decision"] == "deny"}
    assert denied[("x.evil.sandbox.test", h)]["rule"] == f"*.evil.sandbox.test:{h}"
    assert denied[("blocked.sandbox.test", h)]["rule"] is None
    assert denied[("blocked.sandbox.test", s)]["method"] == "CONNECT"
    assert denied[("192.0.2.1", 443)]["reason"] == "no allow rule matches 192.0.2.1:443"
    assert all(e["bytes_down"] == 0 for e in denied.values())
    assert summary["egress_denied"] == 4 and summary["egress_allowed"] == 4 and summary["egress_would_deny"] == 0
    assert {(d["host"], d["port"]) for d in summary["egress_hosts_denied"]} == set(denied)
    assert summary["egress_hosts_would_deny"] == []
    # The suggestion: what the policy would need to allow the denied hosts (not the one a deny rule refused).
    suggested = sorted(["192.0.2.1", f"blocked.sandbox.test:{h}", f"blocked.sandbox.test:{s}"])
    assert summary["egress_suggestion"] == {"allow": suggested, "allow_addresses": []}
    report = Path(summary["run_dir"], "report.md").read_text()
    assert f"- `x.evil.sandbox.test:{h}` (1): denied by rule '*.evil.sandbox.test:{h}'" in report
    assert "## To allow the denied hosts" in report
    assert report.rstrip().endswith("egress:\n  allow: [" + ", ".join(f'"{r}"' for r in suggested) + "]\n```")
    for e in ev:
        assert {"client", "method", "host", "port", "resolved", "decision", "rule", "bytes_up", "bytes_down"} <= set(e)


def test_allowlisted_name_on_a_private_address_is_refused(hosts, make_repo, sandbox, write_script, tmp_path) -> None:
    sc = script(f"curl -sS -i http://{NAME}:{hosts.http_port}/private")
    pol = policy(tmp_path, hosts, allow_private=False)
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "t",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script(sc)),
        "--json",
    )
    assert res.code == 0, res.stderr
    out = tool_results(res.json()["run_dir"])[0]
    assert out.startswith("HTTP/1.1 403") and f"{NAME} resolves to {hosts.address}" in out
    (event,) = proxy_events(res.json()["run_dir"])
    assert event["decision"] == "deny" and event["rule"] == f"{NAME}:{hosts.http_port}"
    assert event["resolved"] == hosts.address
    assert not any(r[2] == "/private" for r in hosts.requests), "the request must never reach the host"


def test_allow_addresses_lifts_one_address_but_never_metadata(
    hosts, make_repo, sandbox, write_script, tmp_path
) -> None:
    h = hosts.http_port
    meta = "meta.sandbox.test"
    sc = script(f"curl -sS -i http://{NAME}:{h}/via-allow-addresses", f"curl -sS -i http://{meta}:{h}/latest/")
    names = {NAME: "host-gateway", meta: "169.254.169.254"}
    # 1. Without allow_private, an allow_addresses entry for the test host's (private, host-own) address lets
    #    the allowlisted name through; the metadata address stays refused although a range covers it.
    pol = policy(
        tmp_path,
        hosts,
        allow=[f"{NAME}:{h}", f"{meta}:{h}"],
        allow_private=False,
        hosts=names,
        allow_addresses=[f"{hosts.address}/32", "169.254.0.0/16"],
    )
    res = sandbox(
        "run",
        "--repo",
        str(make_repo("r1")),
        "--task",
        "t",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script(sc)),
        "--json",
    )
    assert res.code == 0, res.stderr
    summary = res.json()
    out = tool_results(summary["run_dir"])
    assert out[0].startswith("HTTP/1.0 200") and "hello from the test host: GET /via-allow-addresses" in out[0]
    assert out[1].startswith("HTTP/1.1 403"), out[1]
    assert f"{meta} resolves to 169.254.169.254, a cloud metadata address" in out[1]
    ok, refused = proxy_events(summary["run_dir"])
    assert ok["decision"] == "allow" and ok["rule"] == f"{NAME}:{h}" and ok["resolved"] == hosts.address
    kind = address_kind(hosts.address, host_addresses())
    assert (
        ok["decision_detail"] == f"{hosts.address} ({kind}) let through by allow_addresses entry '{hosts.address}/32'"
    )
    assert refused["decision"] == "deny" and refused["rule"] == f"{meta}:{h}"
    assert refused["resolved"] == "169.254.169.254" and refused["bytes_down"] == 0
    assert refused["reason"] == f"{meta} resolves to 169.254.169.254, a cloud metadata address"
    assert summary["egress_suggestion"] == {"allow": [], "allow_addresses": []}  # metadata is never suggested
    # 2. allow_private does not lift it either.
    pol = policy(
        tmp_path,
        hosts,
        allow=[f"{NAME}:{h}", f"{meta}:{h}"],
        allow_private=True,
        hosts=names,
        allow_addresses=["169.254.0.0/16"],
    )
    res = sandbox(
        "run",
        "--repo",
        str(make_repo("r2")),
        "--task",
        "t",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script(sc)),
        "--json",
    )
    assert res.code == 0, res.stderr
    out = tool_results(res.json()["run_dir"])
    assert "hello from the test host" in out[0] and out[1].startswith("HTTP/1.1 403")
    ok, refused = proxy_events(res.json()["run_dir"])
    assert ok["decision"] == "allow" and ok["decision_detail"].endswith("let through by allow_private")
    assert refused["decision"] == "deny" and "a cloud metadata address" in refused["reason"]
    assert [r[2] for r in hosts.requests].count("/via-allow-addresses") == 2
    assert not any(r[2] == "/latest/" for r in hosts.requests)


def test_report_mode_allows_and_logs_would_deny(hosts, make_repo, sandbox, write_script, tmp_path) -> None:
    h = hosts.http_port
    sc = script(f"curl -sS http://{NAME}:{h}/report")
    pol = policy(tmp_path, hosts, allow=[], mode="report", allow_private=False)
    res = sandbox(
        "run", "--repo", str(make_repo()), "--task", "t", "--policy", str(pol), "--model-script", str(write_script(sc))
    )
    assert res.code == 0, res.stderr
    (run_dir,) = [line.split(None, 2)[2] for line in res.stdout.splitlines() if line.startswith("  run dir")]
    assert tool_results(run_dir)[0].strip() == "hello from the test host: GET /report"
    (event,) = proxy_events(run_dir)
    assert event["decision"] == "would_deny" and event["bytes_down"] > 0
    # Every reason enforce mode would refuse it for: the host rule, and the address.
    kind = address_kind(hosts.address, host_addresses())
    reasons = [f"no allow rule matches {NAME}:{h}", f"{NAME} resolves to {hosts.address}, {article(kind)}"]
    assert event["reason"] == "; ".join(reasons)
    # The summary lists it apart from the allowed hosts, and says what to add.
    summary = json.loads(Path(run_dir, "summary.json").read_text())
    assert summary["egress_would_deny"] == 1 and summary["egress_allowed"] == 0 and summary["egress_denied"] == 0
    assert summary["egress_hosts_would_deny"] == [{"host": NAME, "port": h, "connections": 1, "reasons": reasons}]
    assert summary["egress_hosts_allowed"] == [] and summary["egress_hosts_denied"] == []
    yaml_lines = ["egress:", f'  allow: ["{NAME}:{h}"]', f'  allow_addresses: ["{hosts.address}/32"]']
    assert summary["egress_suggestion"] == {"allow": [f"{NAME}:{h}"], "allow_addresses": [f"{hosts.address}/32"]}
    report = Path(run_dir, "report.md").read_text()
    assert "Hosts allowed: none" in report and "Hosts denied: none" in report
    assert f"Would be denied (report mode):\n\n- `{NAME}:{h}` (1): {'; '.join(reasons)}" in report
    assert report.rstrip().endswith("```yaml\n" + "\n".join(yaml_lines) + "\n```")
    # The human summary at the end of `sandbox run` shows the same.
    assert f"would deny {NAME}:{h} (1): {'; '.join(reasons)}" in res.stdout
    assert "\n".join(f"    {line}" for line in yaml_lines) in res.stdout


def test_killing_the_sidecar_cuts_the_network_and_fails_the_run(
    hosts, make_repo, state_dir, write_script, tmp_path
) -> None:
    loop = (
        f"ip route > net.log; trap '' TERM; for i in $(seq 1 200); do "
        f"printf '%s\\n' $(curl -s -m 1 -o /dev/null -w '%{{http_code}}' http://{NAME}:{hosts.http_port}/ping)"
        " >> net.log; sleep 0.1; done"
    )
    sc = f"turns:\n  - bash: {json.dumps(loop)}\n    timeout_ms: 120000\n  - text: done\n"
    repo = make_repo()
    proc = start_run(
        state_dir,
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--policy",
        str(policy(tmp_path, hosts)),
        "--model-script",
        str(write_script(sc)),
        "--json",
    )
    try:
        deadline = time.monotonic() + 60
        while sum(1 for r in hosts.requests if r[2] == "/ping") < 3:
            assert time.monotonic() < deadline, "the agent never reached the test host"
            time.sleep(0.1)
        (run_id,) = [p.name for p in (state_dir / "runs").iterdir()]
        subprocess.run(["docker", "kill", f"sbx-{run_id}-sidecar"], check=True, capture_output=True)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 10, stderr
    summary = json.loads(stdout)
    assert summary["reason"] == "error" and "sidecar stopped" in summary["message"]
    log = git(repo, "show", f"{summary['branch']}:net.log").splitlines()
    assert "default" not in log[0]
    codes = log[1:]
    assert codes[0] == "200"
    first_fail = next(i for i, c in enumerate(codes) if c != "200")
    assert all(c != "200" for c in codes[first_fail:]), codes
    audit = [json.loads(x) for x in Path(summary["run_dir"], "audit.jsonl").read_text().splitlines()]
    hit = [e for e in audit if e["type"] == "limit_hit"]
    assert hit and hit[0]["payload"]["limit"] == "error" and "sidecar" in hit[0]["payload"]["message"]
    assert labelled(run_id) == []


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ("*", "a bare '*' would allow every host"),
        ("https://x.example.com", "no scheme in a rule"),
        ("example.com/path", "no path in a rule"),
    ],
)
def test_bad_rules_are_rejected_by_check_and_run(
    rule, fragment, make_repo, sandbox, write_script, tmp_path, state_dir
) -> None:
    pol = tmp_path / "bad.yaml"
    pol.write_text(json.dumps({"egress": {"allow": ["ok.example.com", rule]}}))
    res = sandbox("policy", "check", str(pol))
    assert res.code == 2 and fragment in res.stderr and repr(rule) in res.stderr
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "t",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script("turns: []\n")),
    )
    assert res.code == 2 and fragment in res.stderr
    assert not (state_dir / "runs").exists()


def test_unknown_egress_key_is_rejected(sandbox, make_repo, write_script, tmp_path, state_dir) -> None:
    pol = tmp_path / "bad.yaml"
    pol.write_text("egress:\n  allow: [ok.example.com]\n  allowed_private: true\n")
    res = sandbox("policy", "check", str(pol))
    assert res.code == 2 and "egress.allowed_private: unknown key" in res.stderr
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "t",
        "--policy",
        str(pol),
        "--model-script",
        str(write_script("turns: []\n")),
    )
    assert res.code == 2 and "egress.allowed_private: unknown key" in res.stderr
    assert not (state_dir / "runs").exists()


def test_policy_check_prints_effective_rules(sandbox) -> None:
    res = sandbox("policy", "check", "dependency-update")
    assert res.code == 0
    assert "allow  pypi.org" in res.stdout and "allow  *.pythonhosted.org" not in res.stdout
    assert "mode enforce; private addresses refused" in res.stdout
    assert "169.254.169.254" in res.stdout and "names exactly that address" in res.stdout
    res = sandbox("policy", "check", "default", "--json")
    data = res.json()
    assert data["policy"]["egress"]["allow"] == [] and len(data["sha256"]) == 64


def test_policy_check_describes_report_mode_and_allow_addresses(sandbox, tmp_path) -> None:
    pol = tmp_path / "report.yaml"
    pol.write_text(
        json.dumps(
            {"egress": {"mode": "report", "allow": ["pypi.org"], "allow_addresses": ["203.0.113.80", "169.254.0.0/16"]}}
        )
    )
    res = sandbox("policy", "check", str(pol))
    assert res.code == 0, res.stderr
    assert (
        "mode report: connections are allowed and logged; what enforce mode would refuse is logged as "
        "would_deny" in res.stdout
    )
    assert "cloud metadata, loopback and unspecified addresses are refused all the same" in res.stdout
    assert "nothing but the model gateway" not in res.stdout
    assert "allow_addresses  203.0.113.80" in res.stdout and "the address 203.0.113.80" in res.stdout
    assert "169.254.0.0/16" in res.stdout and "not the cloud metadata addresses among them" in res.stdout
    assert res.stdout.count("\n") >= 6
    data = sandbox("policy", "check", str(pol), "--json").json()
    assert data["policy"]["egress"]["allow_addresses"] == ["203.0.113.80", "169.254.0.0/16"]
    pol.write_text(json.dumps({"egress": {"allow_addresses": ["0.0.0.0/0"]}}))
    res = sandbox("policy", "check", str(pol))
    assert res.code == 2
    assert (
        "egress.allow_addresses: '0.0.0.0/0' would lift the block on every address; name narrower ranges" in res.stderr
    )
