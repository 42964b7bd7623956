"""The gateway's rules, without Docker: what it forwards (issue 11, class 2), what the model API may fetch on
the agent's behalf (class 3), and the budget as a hard cap (class 4). Real HTTP on loopback against a stub
upstream that records what reaches it."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent_sandbox.config.policy import AgentSettings
from agent_sandbox.sidecar.gateway import Gateway, ModelSidePolicy, Refusal, estimate_input_tokens
from agent_sandbox.sidecar.pricing import cost_usd, worst_case_usd

KEY = "sk-ant-real-key-for-the-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Upstream:
    """A stub model API: streams a message whose usage the test decides, and records every request."""

    port: int = 0
    requests: list[tuple[str, str, dict[str, Any] | None, str | None]] = field(default_factory=list)
    input_tokens: Callable[[dict[str, Any]], int] = lambda body: 1000
    output_tokens: Callable[[dict[str, Any]], int] = lambda body: int(body.get("max_tokens", 100))
    delay: float = 0.0
    chunks: int = 1  # text deltas the output is spread over
    chunk_delay: float = 0.0
    aborted: int = 0  # streams whose client went away before the end
    in_flight: int = 0
    most_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.requests.append((request.method, request.raw_path, body, request.headers.get("x-api-key")))
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": "claude-sonnet-4-5"}]})
        if request.path == "/v1/messages/count_tokens":
            return web.json_response({"input_tokens": 42})
        assert body is not None
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            n_in, n_out = self.input_tokens(body), self.output_tokens(body)
            if not body.get("stream"):
                return web.json_response(
                    {
                        "type": "message",
                        "model": body["model"],
                        "stop_reason": "end_turn",
                        "content": [{"type": "text", "text": "x" * n_out}],
                        "usage": {"input_tokens": n_in, "output_tokens": n_out},
                    }
                )
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            start = {
                "type": "message_start",
                "message": {"model": body["model"], "usage": {"input_tokens": n_in, "output_tokens": 1}},
            }
            await resp.write(sse(start))
            per = max(1, n_out // self.chunks)
            try:
                for _ in range(self.chunks):
                    await asyncio.sleep(self.chunk_delay)
                    await resp.write(
                        sse(
                            {
                                "type": "content_block_delta",
                                "index": 0,
                                "delta": {"type": "text_delta", "text": "y" * per},
                            }
                        )
                    )
                await resp.write(
                    sse(
                        {
                            "type": "message_delta",
                            "delta": {"stop_reason": "end_turn"},
                            "usage": {"output_tokens": n_out},
                        }
                    )
                )
                await resp.write(sse({"type": "message_stop"}))
                await resp.write_eof()
            except (ConnectionError, asyncio.CancelledError):
                self.aborted += 1
                raise
            return resp
        finally:
            self.in_flight -= 1


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


@asynccontextmanager
async def gateway(
    upstream: Upstream | None = None,
    budget: float = 100.0,
    routes: web.Application | None = None,
    cancel_handlers: bool = False,
    **kwargs: Any,
) -> AsyncIterator[tuple[Gateway, str, list[Any]]]:
    """A gateway on loopback in front of the stub (or of `routes`); yields it, its URL and its events."""
    events: list[dict[str, Any]] = []
    up_app = routes
    if up_app is None:
        assert upstream is not None
        up_app = web.Application(client_max_size=64 * 1024 * 1024)
        up_app.router.add_route("*", "/{tail:.*}", upstream.handle)
    up = web.AppRunner(up_app, handler_cancellation=True)
    await up.setup()
    uport, gport = free_port(), free_port()
    await web.TCPSite(up, "127.0.0.1", uport).start()
    if upstream is not None:
        upstream.port = uport
    gw = Gateway("run-rules", f"http://127.0.0.1:{uport}", KEY, budget, {}, events.append, **kwargs)
    runner = web.AppRunner(gw.app(), handler_cancellation=cancel_handlers)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", gport).start()
    try:
        yield gw, f"http://127.0.0.1:{gport}", events
    finally:
        await runner.cleanup()
        await up.cleanup()


async def raw_http(url: str, method: str, target: str, body: bytes = b"") -> tuple[int, dict[str, Any] | None]:
    """One request with the target exactly as given (HTTP clients normalise paths; an attacker does not)."""
    host, port = url.removeprefix("http://").split(":")
    r, w = await asyncio.open_connection(host, int(port))
    w.write(
        f"{method} {target} HTTP/1.1\r\nHost: sidecar:8080\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await w.drain()
    data = await r.read()
    w.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(rest)
    except ValueError:
        return status, None


def message(
    max_tokens: int = 100, stream: bool = True, model: str = "claude-sonnet-4-5", **extra: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
        **extra,
    }


# --- class 2: only what it meters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "kind"),
    [
        ("POST", "/v1/messages", "messages"),
        ("POST", "/v1/messages?beta=true", "messages"),
        ("POST", "/v1/messages/count_tokens?beta=true", "count_tokens"),
        ("GET", "/v1/models", "models"),
        ("GET", "/v1/models?limit=20&after_id=claude-x", "models"),
        ("GET", "/v1/models/claude-sonnet-4-5-20250929", "model"),
    ],
)
def test_route_allows_what_claude_code_sends(method: str, target: str, kind: str) -> None:
    assert Gateway.route(method, target) == kind


@pytest.mark.parametrize(
    ("method", "target", "reason"),
    [
        ("POST", "/v1/./messages", "path"),
        ("POST", "/v1/%2e/messages", "path"),
        ("POST", "/v1/%2E%2E/v1/messages", "path"),
        ("POST", "/v1/messages%2fcount_tokens", "path"),
        ("POST", "/v1/foo/../messages", "path"),
        ("POST", "//v1/messages", "path"),
        ("POST", "/v1//messages", "path"),
        ("POST", "/v1\\messages", "path"),
        ("POST", "/v1/messages/", "path"),
        ("POST", "/v1/messages;x=1", "path"),
        ("POST", "http://api.anthropic.com/v1/messages", "path"),
        ("POST", "/v1/messages/batches", "endpoint"),
        ("GET", "/v1/messages/batches/msgbatch_1/results", "endpoint"),
        ("POST", "/v1/files", "endpoint"),
        ("POST", "/v1/complete", "endpoint"),
        ("GET", "/v1/organizations/api_keys", "endpoint"),
        ("GET", "/v1/messages", "endpoint"),
        ("DELETE", "/v1/models/claude-x", "endpoint"),
        ("GET", "/v1/models/claude-x/..", "path"),
        ("POST", "/v1/messages?beta=false", "query"),
        ("POST", "/v1/messages?beta=true&beta=true", "query"),
        ("POST", "/v1/messages?redirect=http://evil", "query"),
        ("GET", "/v1/models?limit=%2e", "query"),
    ],
)
def test_route_refuses_everything_else(method: str, target: str, reason: str) -> None:
    with pytest.raises(Refusal) as exc:
        Gateway.route(method, target)
    assert exc.value.reason == reason


def test_unlisted_and_abnormal_paths_never_reach_the_upstream() -> None:
    up = Upstream()
    targets = [
        ("POST", "/v1/messages/batches"),
        ("POST", "/v1/files"),
        ("POST", "/v1/complete"),
        ("GET", "/v1/organizations/users"),
        ("POST", "/v1/./messages"),
        ("POST", "/v1/%2e/messages"),
        ("POST", "/v1/messages/../messages/batches"),
        ("POST", "//v1/messages"),
        ("POST", "/v1\\messages"),
    ]

    async def main() -> list[tuple[int, dict[str, Any] | None]]:
        async with gateway(up) as (_gw, url, events):
            out = [await raw_http(url, m, t, json.dumps(message()).encode()) for m, t in targets]
            # What Claude Code sends still goes through, with the real key.
            ok = [
                await raw_http(url, "POST", "/v1/messages?beta=true", json.dumps(message(stream=False)).encode()),
                await raw_http(url, "POST", "/v1/messages/count_tokens?beta=true", json.dumps(message()).encode()),
                await raw_http(url, "GET", "/v1/models"),
            ]
            assert [s for s, _ in ok] == [200, 200, 200]
            refused = [e for e in events if e["event"] == "model_call_refused"]
            assert len(refused) >= len(targets) - 1  # the backslash may be refused by the HTTP parser itself
            assert {e["reason"] for e in refused} == {"endpoint", "path"}
            assert all(e["path"] and e["method"] for e in refused)
            return out

    out = asyncio.run(main())
    for (_m, target), (status, body) in zip(targets, out, strict=True):
        assert status in (400, 403, 404), target
        if body is not None:
            assert body["type"] == "error" and body["error"]["type"] in (
                "not_found_error",
                "permission_error",
                "invalid_request_error",
            ), body
    assert [(m, p) for m, p, _b, _k in up.requests] == [
        ("POST", "/v1/messages?beta=true"),
        ("POST", "/v1/messages/count_tokens?beta=true"),
        ("GET", "/v1/models"),
    ]
    assert {k for *_x, k in up.requests} == {KEY}


def test_upstream_redirects_are_never_followed() -> None:
    """A 30x from the upstream must not carry the real key to another origin, nor reach the agent."""
    stolen: list[dict[str, str]] = []

    async def thief(request: web.Request) -> web.Response:
        stolen.append(dict(request.headers))
        return web.json_response({"stolen": True})

    async def main() -> None:
        other = web.Application()
        other.router.add_route("*", "/{tail:.*}", thief)
        orunner = web.AppRunner(other)
        await orunner.setup()
        oport = free_port()
        await web.TCPSite(orunner, "127.0.0.1", oport).start()

        async def redirect(request: web.Request) -> web.Response:
            status = 307 if request.method == "POST" else 302
            return web.Response(status=status, headers={"Location": f"http://127.0.0.1:{oport}/steal"})

        routes = web.Application()
        routes.router.add_route("*", "/{tail:.*}", redirect)
        try:
            async with gateway(routes=routes) as (_gw, url, events):
                async with aiohttp.ClientSession() as s:
                    for method, path, body in (
                        ("GET", "/v1/models", None),
                        ("POST", "/v1/messages", message()),
                        ("POST", "/v1/messages/count_tokens", message()),
                    ):
                        r = await s.request(method, url + path, json=body, allow_redirects=False)
                        assert r.status == 502 and "location" not in r.headers
                        err = await r.json()
                        assert err["error"]["type"] == "api_error" and "redirect" in err["error"]["message"]
                failed = [e for e in events if e["event"] == "model_call_failed"]
                assert len(failed) == 3 and all("redirect" in e["error"] for e in failed)
                assert not [e for e in events if e["event"] == "model_call"]
        finally:
            await orunner.cleanup()

    asyncio.run(main())
    assert stolen == []


# --- class 3: model-side egress ---------------------------------------------------------------------------------

ALLOW = ["docs.python.org", "*.pypi.org", "files.example.com:443", "10.0.0.1", "git.example.com:22"]


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search_20250305", "name": "web_search"},
        {"type": "web_search_20260209", "name": "web_search"},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"type": "mcp_toolset", "mcp_server_name": "x"},
        {"type": "advisor_20260301", "name": "advisor"},
        {"type": "some_future_server_tool_20300101", "name": "x"},
    ],
)
def test_server_tools_are_refused_by_default(tool: dict[str, Any]) -> None:
    with pytest.raises(Refusal) as exc:
        ModelSidePolicy([], ALLOW, []).apply(message(tools=[tool]))
    assert exc.value.reason == "server_tool" and exc.value.status == 403


def test_client_tools_and_tool_search_pass_untouched() -> None:
    body = message(
        tools=[
            {"name": "Bash", "input_schema": {"type": "object"}},
            {"type": "custom", "name": "Edit", "input_schema": {"type": "object"}},
            {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
            {"type": "tool_search_tool_regex_20251119", "name": "tool_search"},
        ]
    )
    before = json.dumps(body)
    assert ModelSidePolicy([], ALLOW, []).apply(body) is False
    assert json.dumps(body) == before


def test_allowed_web_tools_are_held_to_the_egress_allowlist() -> None:
    policy = ModelSidePolicy(["web_search", "web_fetch"], ALLOW, ["docs.python.org:80"])
    # Hosts only (no IPs, no other ports), and none a deny rule names.
    assert policy.domains == ["pypi.org", "files.example.com"]
    body = message(
        tools=[
            {"type": "web_fetch_20250910", "name": "web_fetch"},
            {"type": "web_search_20250305", "name": "web_search", "blocked_domains": ["pypi.org"]},
        ]
    )
    assert policy.apply(body) is True
    assert body["tools"][0]["allowed_domains"] == ["pypi.org", "files.example.com"]
    assert body["tools"][1]["allowed_domains"] == ["files.example.com"] and "blocked_domains" not in body["tools"][1]
    # Asking for a narrower list inside the allowlist is kept; asking for anything outside is refused.
    narrow = message(tools=[{"type": "web_fetch_20250910", "name": "web_fetch", "allowed_domains": ["a.pypi.org"]}])
    assert policy.apply(narrow) is False and narrow["tools"][0]["allowed_domains"] == ["a.pypi.org"]
    for outside in (["evil.example"], ["pypi.org.evil.example"], ["example.com"], ["https://pypi.org/"]):
        with pytest.raises(Refusal):
            policy.apply(
                message(tools=[{"type": "web_fetch_20250910", "name": "web_fetch", "allowed_domains": outside}])
            )
    # An allowlist with no domain at all cannot restrict them: refused rather than unrestricted.
    with pytest.raises(Refusal):
        ModelSidePolicy(["web_fetch"], ["10.0.0.1"], []).apply(message(tools=[{"type": "web_fetch_20250910"}]))


def test_mcp_servers_and_url_sources_follow_the_egress_allowlist() -> None:
    mcp = message(
        mcp_servers=[{"type": "url", "url": "https://evil.example/mcp", "name": "x"}],
        tools=[{"type": "mcp_toolset", "mcp_server_name": "x"}],
    )
    with pytest.raises(Refusal):  # not allowed at all
        ModelSidePolicy([], ALLOW, []).apply(json.loads(json.dumps(mcp)))
    with pytest.raises(Refusal):  # allowed, but the server is not on the allowlist
        ModelSidePolicy(["mcp"], ALLOW, []).apply(json.loads(json.dumps(mcp)))
    mcp["mcp_servers"][0]["url"] = "https://files.example.com/mcp"
    assert ModelSidePolicy(["mcp"], ALLOW, []).apply(mcp) is False
    # An image or document by URL is fetched by the model API: only from hosts the allowlist allows.
    for url in ("https://evil.example/x.png?secret=1", "http://files.example.com/x.png", "ftp://pypi.org/x"):
        body = message()
        body["messages"][0]["content"] = [
            {
                "type": "tool_result",
                "tool_use_id": "t",
                "content": [{"type": "image", "source": {"type": "url", "url": url}}],
            }
        ]
        with pytest.raises(Refusal) as exc:
            ModelSidePolicy([], ALLOW, []).apply(body)
        assert exc.value.reason == "url_source"
    body = message()
    body["messages"][0]["content"] = [
        {"type": "document", "source": {"type": "url", "url": "https://a.pypi.org/doc.pdf"}}
    ]
    assert ModelSidePolicy([], ALLOW, []).apply(body) is False
    with pytest.raises(Refusal):
        ModelSidePolicy([], ALLOW, []).apply(message(container="container_123"))


def test_server_tool_rules_end_to_end_through_the_gateway() -> None:
    up = Upstream(output_tokens=lambda b: 5)

    async def main() -> None:
        async with (
            gateway(up, server_tools=["web_fetch"], egress_allow=ALLOW) as (_gw, url, events),
            aiohttp.ClientSession() as s,
        ):
            r = await s.post(
                url + "/v1/messages", json=message(tools=[{"type": "web_search_20250305", "name": "web_search"}])
            )
            assert r.status == 403 and r.headers["x-sandbox-refused"] == "server_tool"
            assert (await r.json())["error"]["type"] == "permission_error"
            r = await s.post(
                url + "/v1/messages",
                json=message(stream=False, tools=[{"type": "web_fetch_20250910", "name": "web_fetch"}]),
            )
            assert r.status == 200
            r = await s.post(url + "/v1/messages", data=b"not json")
            assert r.status == 400
        (refused,) = [e for e in events if e["event"] == "model_call_refused" and e["reason"] == "server_tool"]
        assert refused["detail"] == "web_search_20250305"

    asyncio.run(main())
    ((_m, _p, body, _k),) = up.requests
    assert body is not None and body["tools"][0]["allowed_domains"] == [
        "docs.python.org",
        "pypi.org",
        "files.example.com",
    ]


def test_the_policy_setting_defaults_to_none() -> None:
    assert AgentSettings().server_tools == []
    assert AgentSettings(server_tools=["web_fetch", "mcp"]).server_tools == ["web_fetch", "mcp"]
    with pytest.raises(ValueError):
        AgentSettings(server_tools=["web_browse"])  # type: ignore[list-item]  # the invalid value under test


# --- class 4: the budget is a hard cap ------------------------------------------------------------------------


def test_prices_and_worst_case() -> None:
    # Sonnet: $3 in, $15 out, $3.75 5-minute cache write, $6 1-hour cache write; searches $0.01 each.
    assert cost_usd("claude-sonnet-4-5", 0, 0, 0, 1_000_000, cache_write_1h=400_000) == pytest.approx(
        0.6 * 3.75 + 0.4 * 6
    )
    assert cost_usd("claude-sonnet-4-5", 1_000_000, web_searches=3) == pytest.approx(3.03)
    assert worst_case_usd("claude-sonnet-4-5", 1_000_000, 1_000_000) == pytest.approx(3.75 + 15)
    assert worst_case_usd("claude-sonnet-4-5", 1_000_000, 0, one_hour_cache=True) == pytest.approx(6)
    body = message()
    body["messages"][0]["content"] = [{"type": "image", "source": {"type": "base64", "data": "AAAA"}}]
    raw = json.dumps(body).encode()
    assert estimate_input_tokens(raw, body) == len(raw) + 4096 + 8000


def worst_cost(body: dict[str, Any]) -> float:
    return worst_case_usd(body["model"], estimate_input_tokens(json.dumps(body).encode(), body), body["max_tokens"])


@pytest.mark.parametrize("stream", [True, False])
def test_twenty_parallel_calls_never_overspend_by_more_than_one_call(stream: bool) -> None:
    """Issue 11 measured $15.03 spent on a $1 budget by ten parallel calls. Here 20 calls go at once, each
    costing about its worst case; the total must stay within the budget plus one call."""
    # Each call: ~1,100 input tokens (a request of ~1 KB) and 20,000 output tokens: about $0.30 at sonnet rates.
    # The delay only has to outlast admitting all 20 (milliseconds): every call is then in flight at once.
    up = Upstream(input_tokens=lambda b: 1000, output_tokens=lambda b: b["max_tokens"], delay=0.15, chunks=4)
    budget = 1.0
    body = message(max_tokens=20_000, stream=stream)
    one_call = cost_usd("claude-sonnet-4-5", 1000, 20_000)

    async def main() -> list[int]:
        async with gateway(up, budget=budget) as (gw, url, events):
            async with aiohttp.ClientSession() as s:

                async def call() -> int:
                    async with s.post(url + "/v1/messages", json=body) as r:
                        await r.read()
                        return r.status

                statuses = await asyncio.gather(*(call() for _ in range(20)))
                # And again, now that the first wave has settled: whatever fits still goes, nothing more.
                statuses += await asyncio.gather(*(call() for _ in range(20)))
            calls = [e for e in events if e["event"] == "model_call"]
            spent = sum(c["cost_usd"] for c in calls)
            assert spent == pytest.approx(gw.spent_usd)
            print(
                f"\n20 parallel calls x2 on a ${budget} budget: {len(calls)} forwarded, spent ${spent:.4f}, "
                f"one call ${one_call:.4f}, worst case ${worst_cost(body):.4f}"
            )
            assert spent <= budget + one_call, spent
            assert gw.reserved == {} and gw.live == {}
            refused = [e for e in events if e["event"] == "model_call_refused"]
            assert {e["reason"] for e in refused} <= {"reservation", "budget"}
            assert all(e["reserve_usd"] > 0 for e in refused if e["reason"] == "reservation")
            return statuses

    statuses = asyncio.run(main())
    assert statuses.count(200) == len(up.requests) and statuses.count(403) == 40 - len(up.requests)
    assert len(up.requests) >= 3  # the budget is used, not just guarded


def test_calls_that_do_not_fit_wait_for_room_instead_of_failing() -> None:
    """Claude Code runs subagents in parallel: near the cap, calls take turns rather than fail; a call that
    waits longer than admit_wait is refused (reason reservation), and nothing overspends."""
    up = Upstream(input_tokens=lambda b: 1000, output_tokens=lambda b: 100, delay=0.15)
    body = message(max_tokens=20_000)  # worst case ~$0.30 each; actual ~$0.0045

    async def main() -> None:
        async with gateway(up, budget=0.7) as (gw, url, events):
            async with aiohttp.ClientSession() as s:

                async def call() -> int:
                    async with s.post(url + "/v1/messages", json=body) as r:
                        await r.read()
                        return r.status

                # Two reservations fit in $0.70, four do not: the other two wait, then go.
                assert await asyncio.gather(*(call() for _ in range(4))) == [200] * 4
                assert up.most_in_flight == 2 and not [e for e in events if e["event"] == "model_call_refused"]
                gw.admit_wait = 0.1
                up.delay = 0.4  # the two admitted calls outlast the third one's wait by a wide margin
                statuses = await asyncio.gather(*(call() for _ in range(3)))
            assert sorted(statuses) == [200, 200, 403]
            (refused,) = [e for e in events if e["event"] == "model_call_refused"]
            assert refused["reason"] == "reservation" and gw.reserved == {}

    asyncio.run(main())


def test_a_lone_call_over_the_cap_is_cut_off_when_spend_crosses_it() -> None:
    """The one call admitted alone may cost more than what is left: its stream is cut as soon as actual spend
    crosses the cap, the client gets an error event, and the generation upstream is stopped."""
    up = Upstream(input_tokens=lambda b: 10_000, output_tokens=lambda b: 50_000, chunks=50, chunk_delay=0.02)
    budget = 0.2  # $0.03 of input, then $0.015 per 1,000 output tokens: crossed after ~11,300 tokens

    async def main() -> None:
        async with gateway(up, budget=budget) as (gw, url, events):
            async with aiohttp.ClientSession() as s:
                r = await s.post(url + "/v1/messages", json=message(max_tokens=50_000))
                text = (await r.read()).decode()
                assert r.status == 200 and "event: error" in text and "budget" in text
                assert "message_stop" not in text
                r = await s.post(url + "/v1/messages", json=message())
                assert r.status == 403 and r.headers["x-sandbox-refused"] == "budget"
            (call,) = [e for e in events if e["event"] == "model_call"]
            assert call["complete"] is False and call["cut"] == "budget"
            full = cost_usd("claude-sonnet-4-5", 10_000, 50_000)
            assert budget < call["cost_usd"] < budget + 0.02 < full, call
            assert gw.spent_usd == pytest.approx(call["cost_usd"])

    asyncio.run(main())
    assert up.aborted == 1


def test_a_call_whose_client_resets_is_still_metered() -> None:
    """The agent reads the start of a stream and resets the connection: the call is metered from what was
    streamed, and the upstream generation is stopped."""
    up = Upstream(input_tokens=lambda b: 50_000, output_tokens=lambda b: 40_000, chunks=40, chunk_delay=0.05)

    async def main() -> None:
        async with gateway(up, budget=50.0) as (gw, url, events):
            host, port = url.removeprefix("http://").split(":")
            raw = json.dumps(message(max_tokens=40_000)).encode()
            r, w = await asyncio.open_connection(host, int(port))
            w.write(
                f"POST /v1/messages HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(raw)}\r\n\r\n".encode()
                + raw
            )
            await w.drain()
            got = b""
            while got.count(b"content_block_delta") < 3:
                got += await r.read(65536)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            w.close()
            for _ in range(100):
                if any(e["event"] == "model_call" for e in events):
                    break
                await asyncio.sleep(0.05)
            (call,) = [e for e in events if e["event"] == "model_call"]
            assert call["complete"] is False and call["cut"] == "client"
            assert call["usage"]["input_tokens"] == 50_000
            assert 3_000 <= call["usage"]["output_tokens"] < 40_000
            assert call["cost_usd"] >= cost_usd("claude-sonnet-4-5", 50_000, 3_000)
            assert gw.reserved == {}

    asyncio.run(main())
    assert up.aborted == 1


def test_a_cancelled_handler_still_books_the_call() -> None:
    """If the gateway's handler is cancelled while the upstream works (shutdown, or a dropped connection with
    handler cancellation on), the call is booked at its reservation: spend never silently disappears."""
    up = Upstream(delay=5)

    async def main() -> None:
        async with gateway(up, budget=10.0, cancel_handlers=True) as (gw, url, events):
            async with aiohttp.ClientSession() as s:
                task = asyncio.ensure_future(s.post(url + "/v1/messages", json=message(max_tokens=1000)))
                for _ in range(100):
                    if gw.reserved:
                        break
                    await asyncio.sleep(0.02)
                (reserve,) = gw.reserved.values()
            task.cancel()  # the client goes away while the upstream is still working
            for _ in range(100):
                if not gw.reserved:
                    break
                await asyncio.sleep(0.02)
        (call,) = [e for e in events if e["event"] == "model_call"]
        assert call["cut"] == "cancelled" and call["cost_usd"] == pytest.approx(reserve, abs=1e-6)

    asyncio.run(main())


def test_a_budget_shared_by_several_runs_is_as_hard_as_one_runs() -> None:
    """A sweep's budget: two runs' gateways, each with a run budget far above it, 20 parallel calls each, all
    reserving against one ledger over its unix sockets (budget_broker.py). Total spend stays within the
    shared cap plus one call, and every reservation is settled."""
    from agent_sandbox.run.budget import SharedBudget

    shared = SharedBudget(1.0, "sweep budget")
    endpoints = [shared.serve(f"run-{i}") for i in range(2)]
    body = message(max_tokens=20_000)
    one_call = cost_usd("claude-sonnet-4-5", 1000, 20_000)

    async def main() -> int:
        ups = [
            Upstream(input_tokens=lambda b: 1000, output_tokens=lambda b: b["max_tokens"], delay=0.1) for _ in endpoints
        ]
        async with (
            gateway(ups[0], budget=50.0, broker_socket=str(endpoints[0].path)) as (gw0, url0, ev0),
            gateway(ups[1], budget=50.0, broker_socket=str(endpoints[1].path)) as (gw1, url1, ev1),
        ):
            for gw in (gw0, gw1):
                gw.admit_wait = 5.0
            async with aiohttp.ClientSession() as s:

                async def call(url: str) -> int:
                    async with s.post(url + "/v1/messages", json=body) as r:
                        await r.read()
                        return r.status

                statuses = await asyncio.gather(*(call(u) for u in [url0, url1] * 20))
            async with asyncio.timeout(5):  # the last settle messages reach the ledger (each waits for its reply)
                while gw0._broker_tasks or gw1._broker_tasks:
                    await asyncio.sleep(0.01)
            forwarded = len(ups[0].requests) + len(ups[1].requests)
            assert statuses.count(200) == forwarded >= 3
            spent = gw0.spent_usd + gw1.spent_usd
            assert shared.spent_usd == pytest.approx(spent)
            print(f"\n40 parallel calls over two runs on a shared $1: {forwarded} forwarded, spent ${spent:.4f}")
            assert spent <= 1.0 + one_call
            refused = [e for e in ev0 + ev1 if e["event"] == "model_call_refused"]
            assert {e["reason"] for e in refused} <= {"budget", "reservation"} and refused
            return forwarded

    try:
        asyncio.run(main())
    finally:
        held = [e.close() for e in endpoints]
    assert held == [0.0, 0.0], "every reservation was settled"
    assert not any(e.path.parent.exists() for e in endpoints), "the sockets' directories are removed"


def test_a_run_whose_sidecar_dies_mid_call_has_its_reservation_booked() -> None:
    from agent_sandbox.run.budget import SharedBudget

    shared = SharedBudget(1.0, "sweep budget")
    ep = shared.serve("run-x")
    assert shared.reserve("run-x", 1, 0.4) == (True, "")
    assert shared.reserve("run-y", 1, 0.7, wait=0.1) == (False, "reservation")
    assert ep.close() == pytest.approx(0.4) and shared.spent_usd == pytest.approx(0.4)
    # Nothing in flight and spend below the cap: the lone call goes (the one call the cap may be overshot by).
    assert shared.reserve("run-y", 2, 0.7) == (True, "")
    assert shared.reserve("run-z", 1, 0.1, wait=0.05) == (False, "reservation")
    shared.settle("run-y", 2, 0.65)
    assert shared.reserve("run-z", 2, 0.01) == (False, "budget") and shared.exhausted


def test_blocks_nested_anywhere_are_seen() -> None:
    """Red-team finding: an image by URL inside a document whose source is content slipped past the URL
    check, and 50 images nested so reserved as text. Every block under system and messages counts."""

    def message_with(content: list[dict[str, Any]]) -> dict[str, Any]:
        return {**message(), "messages": [{"role": "user", "content": content}]}

    nested_url = message_with(
        [
            {
                "type": "document",
                "source": {
                    "type": "content",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "https://192.0.2.1/exfil?d=SECRET"}}
                    ],
                },
            }
        ]
    )
    with pytest.raises(Refusal) as err:
        ModelSidePolicy([], ["pypi.org"], []).apply(nested_url)
    assert err.value.reason == "url_source"
    images = [{"type": "image", "source": {"type": "file", "file_id": f"f{i}"}} for i in range(50)]
    direct = message_with(images)
    nested = message_with([{"type": "document", "source": {"type": "content", "content": images}}])
    bound = estimate_input_tokens(json.dumps(nested).encode(), nested)
    assert bound >= estimate_input_tokens(json.dumps(direct).encode(), direct) - 1000 and bound > 50 * 8000
