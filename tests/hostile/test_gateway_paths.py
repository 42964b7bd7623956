"""Issue 11, class 2: the gateway forwards only what it meters.

The real agent (Claude Code, driven by the scripted model) aims raw HTTP at its own gateway
(`http://sidecar:8080`, its ANTHROPIC_BASE_URL) the way an attacker would: unmetered endpoints (batches, files,
the legacy completions API, organization endpoints) and dot-segment or encoded paths that a normalising
server would turn into /v1/messages. Every one is refused with Anthropic's error shape and a
`model_call_refused` line, and none reaches the model API behind the gateway (the scripted model records every
request it gets, handled or not).
"""

from __future__ import annotations

import json

import pytest

from ..conftest import audit_events, tool_results, transcript

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

PROBE_MODEL = "claude-sonnet-probe"
BODY = {"model": PROBE_MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "probe"}]}
PROBES = [
    ("POST", "/v1/messages/batches", 404),
    ("GET", "/v1/messages/batches", 404),
    ("POST", "/v1/files", 404),
    ("POST", "/v1/complete", 404),
    ("GET", "/v1/organizations/api_keys", 404),
    ("POST", "/v1/./messages", 400),
    ("POST", "/v1/%2e/messages", 400),
    ("POST", "/v1/x/%2E%2E/messages", 400),
    ("POST", "/v1/messages/../messages/batches", 400),
    ("POST", "//v1/messages", 400),
    ("POST", "/v1/messages?beta=true&anything=else", 400),
]


def test_unmetered_endpoints_and_abnormal_paths_are_refused(make_repo, sandbox, write_script) -> None:
    lines = [f"echo {json.dumps(json.dumps(BODY))} > /tmp/body.json"]
    for via in ("--noproxy '*'", ""):  # straight to the sidecar, and through the egress proxy
        for method, path, _status in PROBES:
            lines.append(
                f"printf '%s ' {method} '{path}'; curl -sS {via} --path-as-is -X {method} "
                f"-H 'content-type: application/json' -H 'x-api-key: placeholder' "
                f"{'-d @/tmp/body.json ' if method == 'POST' else ''}-o /tmp/out -w '%{{http_code}} ' "
                f"'http://sidecar:8080{path}'; head -c 400 /tmp/out; echo"
            )
    script = "turns:\n  - bash: " + json.dumps("\n".join(lines)) + "\n  - text: done\n"
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "probe the gateway",
        "--model-script",
        str(write_script(script)),
        "--json",
    )
    assert res.code == 0, res.stderr
    run_dir = res.json()["run_dir"]
    (out,) = tool_results(run_dir)
    rows = out.strip().splitlines()
    assert len(rows) == 2 * len(PROBES), out
    for row, (method, path, status) in zip(rows, PROBES * 2, strict=True):
        m, p, code, body = row.split(" ", 3)
        assert (m, p, int(code)) == (method, path, status), row
        err = json.loads(body)
        assert err["type"] == "error" and err["error"]["type"] in ("not_found_error", "invalid_request_error")
    # Nothing but the agent's own model calls reached the model API behind the gateway.
    seen = transcript(run_dir)
    assert seen and {(t.get("method", "POST"), t["path"]) for t in seen} == {("POST", "/v1/messages")}
    assert not any(t.get("unhandled") or t.get("model") == PROBE_MODEL for t in seen)
    refused = [e["payload"] for e in audit_events(run_dir) if e["type"] == "model_call_refused"]
    assert len(refused) == 2 * len(PROBES)
    assert {r["reason"] for r in refused} == {"endpoint", "path", "query"}
    assert {r["path"] for r in refused} == {p for _m, p, _s in PROBES}
    calls = [e["payload"] for e in audit_events(run_dir) if e["type"] == "model_call"]
    assert calls and {c["path"] for c in calls} == {"/v1/messages"}
