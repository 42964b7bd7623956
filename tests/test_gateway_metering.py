"""The gateway's metering, in-process against a fake model API on 127.0.0.1: what each answer costs (input,
output, cache reads, 5-minute and 1-hour cache writes, web searches) at each model's price from pricing.py,
streamed and whole; the budget's reservation and settlement; token counting; and the UsageMeter itself.

test_model_gateway.py and test_gateway_rules.py cover the rest (key injection, routes, server tools, many
parallel calls, waiting for room, a client that goes away); this file adds what they leave out. Nothing here
sleeps: a call is held in flight by an event the test sets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent_sandbox.sidecar.__main__ import settle_on_request
from agent_sandbox.sidecar.gateway import Gateway, UsageMeter, estimate_input_tokens
from agent_sandbox.sidecar.pricing import DEFAULT_PRICES, FALLBACK, Price

KEY = "sk-ant-metering-test-key"
Answer = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def stream_events(
    model: str | None,
    start_usage: dict[str, Any],
    final_usage: dict[str, Any],
    text: str = "hi",
    tool: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A Messages stream as the API sends it: usage in message_start, the final (cumulative) usage in
    message_delta."""
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "usage": start_usage}
    if model is not None:
        message["model"] = model
    block = {"type": "tool_use", **tool, "input": {}} if tool else {"type": "text", "text": ""}
    return [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": block},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use" if tool else "end_turn"}, "usage": final_usage},
        {"type": "message_stop"},
    ]


def whole(usage: dict[str, Any], model: str | None = "claude-sonnet-4-5") -> Answer:
    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        msg: dict[str, Any] = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "stop_reason": "end_turn",
            "content": [{"type": "text", "text": "hi"}],
            "usage": usage,
        }
        if model is not None:
            msg["model"] = model
        return web.json_response(msg)

    return answer


def streamed(
    events: list[dict[str, Any]], hold: asyncio.Event | None = None, after: int = 1, crlf: bool = False
) -> Answer:
    """An SSE answer; with `hold`, the first `after` events go out and the rest wait for it."""

    async def answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, event in enumerate(events):
            if hold is not None and i == after:
                await asyncio.wait_for(hold.wait(), 5)
            data = sse(event)
            await resp.write(data.replace(b"\n", b"\r\n") if crlf else data)
        await resp.write_eof()
        return resp

    return answer


@dataclass
class FakeAPI:
    """The model API: /v1/messages answers with the next scripted answer (the last one repeats), token
    counting and the model list answer at once; every request is recorded."""

    answers: list[Answer] = field(default_factory=list)
    requests: list[tuple[str, dict[str, Any] | None, str | None]] = field(default_factory=list)
    closed: int = 0  # streams the gateway closed before they ended

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.requests.append((request.path, body, request.headers.get("x-api-key")))
        if request.path == "/v1/messages/count_tokens":
            return web.json_response({"input_tokens": 42})
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": "claude-sonnet-4-5"}]})
        assert body is not None
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        try:
            return await answer(request, body)
        except (ConnectionError, asyncio.CancelledError):
            self.closed += 1
            raise


@dataclass
class Harness:
    gw: Gateway
    url: str
    events: list[dict[str, Any]]
    session: aiohttp.ClientSession

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def post(self, body: dict[str, Any], path: str = "/v1/messages") -> tuple[int, bytes, dict[str, str]]:
        async with self.session.post(self.url + path, json=body, headers={"x-api-key": "placeholder"}) as r:
            return r.status, await r.read(), dict(r.headers)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Yield to the loop until the condition holds (the gateway and the fake API share it)."""
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0.001)


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@contextlib.asynccontextmanager
async def gateway(
    api: FakeAPI | None, budget: float = 100.0, prices: dict[str, Price] | None = None, upstream: str | None = None
) -> AsyncIterator[Harness]:
    """The real Gateway on 127.0.0.1 in front of the fake API (or of `upstream`)."""
    events: list[dict[str, Any]] = []
    runners = []
    if api is not None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", api.handle)
        up, uport = await _serve(app)
        runners.append(up)
        upstream = f"http://127.0.0.1:{uport}"
    assert upstream is not None
    gw = Gateway("run-metering", upstream, KEY, budget, prices or {}, events.append)
    runner, gport = await _serve(gw.app())
    runners.insert(0, runner)
    try:
        async with aiohttp.ClientSession() as session:
            yield Harness(gw, f"http://127.0.0.1:{gport}", events, session)
    finally:
        for r in runners:
            await r.cleanup()


def message(
    max_tokens: int = 1000, stream: bool = False, model: str = "claude-sonnet-4-5", **extra: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
        **extra,
    }


def usd(tokens: int, per_million: float) -> float:
    return tokens * per_million / 1_000_000


# --- what an answer costs, per model ---------------------------------------------------------------------------

# (model as the API names it, $/M input, $/M output): the list prices, with the 5-minute cache write at 1.25x
# input and a cache read at 0.1x input. Written out here, not read from pricing.py, so a wrong match (a family
# rule before a specific one) shows.
MODELS = [
    ("claude-opus-4-1-20250805", 15.0, 75.0),
    ("claude-opus-4-20250514", 15.0, 75.0),
    ("claude-opus-4-0", 15.0, 75.0),
    ("claude-3-opus-20240229", 15.0, 75.0),
    ("claude-opus-4-5-20251101", 5.0, 25.0),
    ("claude-sonnet-4-5-20250929", 3.0, 15.0),
    ("claude-3-7-sonnet-latest", 3.0, 15.0),
    ("claude-haiku-4-5", 1.0, 5.0),
    ("claude-3-5-haiku-20241022", 0.8, 4.0),
    ("claude-3-haiku-20240307", 0.25, 1.25),
    ("CLAUDE-SONNET-4-5", 3.0, 15.0),
    ("some-future-model", 15.0, 75.0),  # unknown: the dearest known rates, so a budget errs towards stopping
]
USAGE = {
    "input_tokens": 20_000,
    "output_tokens": 3_000,
    "cache_read_input_tokens": 150_000,
    "cache_creation_input_tokens": 8_000,
}


def expected_cost(inp: float, out: float, usage: dict[str, int] = USAGE, one_hour: int = 0, searches: int = 0) -> float:
    return (
        usd(usage["input_tokens"], inp)
        + usd(usage["output_tokens"], out)
        + usd(usage["cache_read_input_tokens"], inp * 0.1)
        + usd(usage["cache_creation_input_tokens"] - one_hour, inp * 1.25)
        + usd(one_hour, inp * 2)
        + searches * 0.01
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("model", "inp", "out"), MODELS)
def test_each_model_is_priced_from_its_usage(model: str, inp: float, out: float, stream: bool) -> None:
    start = {k: v for k, v in USAGE.items() if k != "output_tokens"} | {"output_tokens": 1}
    api = FakeAPI(
        [
            streamed(stream_events(model, start, {"output_tokens": USAGE["output_tokens"]}))
            if stream
            else whole(USAGE, model)
        ]
    )

    async def main() -> None:
        async with gateway(api) as h:
            status, _, _ = await h.post(message(stream=stream, model=model))
            assert status == 200
            (call,) = h.of("model_call")
            assert call["model"] == model and call["stream"] is stream and call["status"] == 200
            assert call["usage"] == USAGE
            assert call["cost_usd"] == pytest.approx(expected_cost(inp, out), abs=1e-6)
            assert call["spent_usd"] == pytest.approx(h.gw.spent_usd, abs=1e-6)
            assert call["complete"] is True and call["cut"] is None and h.gw.reserved == {} and h.gw.live == {}

    asyncio.run(main())


def test_every_family_of_the_price_table_is_exercised() -> None:
    """Every family of the table is exercised above, and an unknown model gets the highest rates."""
    assert (FALLBACK.input, FALLBACK.output) == (
        max(p.input for p in DEFAULT_PRICES.values()),
        max(p.output for p in DEFAULT_PRICES.values()),
    )
    names = [m for m, _, _ in MODELS]
    for key in DEFAULT_PRICES:
        assert any(key in n.lower() for n in names), key


def test_the_answers_model_is_billed_not_the_requests() -> None:
    """The API reports the model that ran; without one, the request's model is billed."""
    api = FakeAPI(
        [
            whole({"input_tokens": 1000, "output_tokens": 1000}, model="claude-opus-4-1"),
            whole({"input_tokens": 1000, "output_tokens": 1000}, model=None),
        ]
    )

    async def main() -> None:
        async with gateway(api) as h:
            await h.post(message(model="claude-sonnet-4-5"))
            await h.post(message(model="claude-haiku-4-5"))
            opus, haiku = h.of("model_call")
            assert opus["model"] == "claude-opus-4-1" and opus["cost_usd"] == pytest.approx(0.015 + 0.075)
            assert haiku["model"] == "claude-haiku-4-5" and haiku["cost_usd"] == pytest.approx(0.001 + 0.005)

    asyncio.run(main())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_one_hour_cache_writes_and_web_searches(stream: bool) -> None:
    """Of 100,000 cache-written tokens, 40,000 went to the 1-hour cache (twice the input price, not 1.25x);
    three server-side web searches cost $0.01 each on top of the tokens."""
    usage = {
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 100_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 60_000, "ephemeral_1h_input_tokens": 40_000},
        "server_tool_use": {"web_search_requests": 3},
    }
    if stream:
        start = {k: v for k, v in usage.items() if k not in ("output_tokens", "server_tool_use")}
        final = {"output_tokens": 500, "server_tool_use": {"web_search_requests": 3}}
        api = FakeAPI([streamed(stream_events("claude-sonnet-4-5", start, final))])
    else:
        api = FakeAPI([whole(usage)])

    async def main() -> None:
        async with gateway(api) as h:
            await h.post(message(stream=stream))
            (call,) = h.of("model_call")
            plain = {
                "input_tokens": 1000,
                "output_tokens": 500,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 100_000,
            }
            assert call["usage"] == plain
            assert call["cost_usd"] == pytest.approx(
                expected_cost(3.0, 15.0, plain, one_hour=40_000, searches=3), abs=1e-6
            )
            assert call["cost_usd"] == pytest.approx(0.003 + 0.0075 + 0.225 + 0.24 + 0.03, abs=1e-6)

    asyncio.run(main())


def test_a_stream_that_repeats_its_usage_is_not_counted_twice() -> None:
    """The API repeats the cumulative counts in message_delta (input and cache too): the largest is the total,
    never the sum. CRLF line ends are read the same."""
    start = {"input_tokens": 5000, "output_tokens": 1, "cache_read_input_tokens": 10_000}
    final = {"input_tokens": 5000, "output_tokens": 800, "cache_read_input_tokens": 10_000}
    api = FakeAPI([streamed(stream_events("claude-sonnet-4-5", start, final), crlf=True)])

    async def main() -> None:
        async with gateway(api) as h:
            status, data, _ = await h.post(message(stream=True))
            assert status == 200 and data.count(b"\r\n\r\n") == 6  # handed over as it came
            (call,) = h.of("model_call")
            assert call["usage"] == {
                "input_tokens": 5000,
                "output_tokens": 800,
                "cache_read_input_tokens": 10_000,
                "cache_creation_input_tokens": 0,
            }
            assert call["cost_usd"] == pytest.approx(0.015 + 0.012 + 0.003, abs=1e-6)

    asyncio.run(main())


def test_the_call_line_names_the_stop_reason_and_the_tools_asked_for() -> None:
    events = stream_events(
        "claude-sonnet-4-5", {"input_tokens": 10}, {"output_tokens": 5}, tool={"id": "toolu_1", "name": "Bash"}
    )
    api = FakeAPI([streamed(events)])
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}, {"name": "Edit", "input_schema": {"type": "object"}}]

    async def main() -> None:
        async with gateway(api) as h:
            await h.post(message(stream=True, tools=tools))
            (call,) = h.of("model_call")
            assert call["stop_reason"] == "tool_use" and call["tool_uses"] == [{"id": "toolu_1", "name": "Bash"}]
            assert call["tools_offered"] == 2 and call["path"] == "/v1/messages" and call["call"] == 1

    asyncio.run(main())


# --- answers that are not a whole message ----------------------------------------------------------------------


def test_an_error_answer_costs_nothing_and_releases_its_reservation() -> None:
    async def error(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(
            {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, status=529
        )

    api = FakeAPI([error])

    async def main() -> None:
        async with gateway(api, budget=1.0) as h:
            status, data, _ = await h.post(message(max_tokens=20_000))
            assert status == 529 and json.loads(data)["error"]["type"] == "overloaded_error"
            (call,) = h.of("model_call")
            assert call["status"] == 529 and call["cost_usd"] == 0 and h.gw.spent_usd == 0
            assert call["reserved_usd"] > 0.3 and h.gw.reserved == {}

    asyncio.run(main())


def test_an_unreachable_api_is_a_502_and_nothing_is_spent() -> None:
    async def main() -> None:
        # A port nothing listens on: the listening socket is closed before the gateway starts.
        probe, port = await _serve(web.Application())
        await probe.cleanup()
        async with gateway(None, upstream=f"http://127.0.0.1:{port}") as h:
            status, data, _ = await h.post(message())
            assert status == 502 and b"upstream unreachable" in data
            assert [e["event"] for e in h.events] == ["model_call_failed"]
            assert h.gw.spent_usd == 0 and h.gw.reserved == {} and h.gw.calls == 0

    asyncio.run(main())


def test_a_stream_cut_before_its_first_event_is_booked_at_the_input_estimate() -> None:
    """The API answered 200 and the connection broke before message_start: no usage came, so the input is
    booked as estimated (one token per request byte plus the overhead), with no output."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        writer.close()

    body = message(max_tokens=4000, stream=True)

    async def main() -> None:
        server = await asyncio.start_server(broken, "127.0.0.1", 0)
        try:
            upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            async with gateway(None, upstream=upstream) as h:
                status, _, _ = await h.post(body)
                assert status == 200
                (call,) = h.of("model_call")
        finally:
            server.close()
        bound = estimate_input_tokens(json.dumps(body).encode(), body)
        assert call["complete"] is False and call["cut"] == "upstream"
        assert call["usage"]["input_tokens"] == bound and call["usage"]["output_tokens"] == 0
        assert call["cost_usd"] == pytest.approx(usd(bound, 3.0), abs=1e-6)

    asyncio.run(main())


def test_a_stream_that_ends_without_its_final_usage_is_booked_from_what_was_streamed() -> None:
    """message_start and 5,000 bytes of text, then the stream ends: the output is at least a token per byte."""
    events = stream_events("claude-sonnet-4-5", {"input_tokens": 2000, "output_tokens": 1}, {}, text="y" * 5000)
    api = FakeAPI([streamed(events[:4])])

    async def main() -> None:
        async with gateway(api) as h:
            await h.post(message(max_tokens=8000, stream=True))
            (call,) = h.of("model_call")
            assert call["complete"] is False and call["cut"] is None
            assert call["usage"]["output_tokens"] == 5000
            assert call["cost_usd"] == pytest.approx(usd(2000, 3.0) + usd(5000, 15.0), abs=1e-6)
            # Never more output than max_tokens allows.
            await h.post(message(max_tokens=100, stream=True))
            assert h.of("model_call")[1]["usage"]["output_tokens"] == 100

    asyncio.run(main())


# --- the budget: reserve, settle, refuse --------------------------------------------------------------------------


def test_a_call_that_does_not_fit_beside_one_in_flight_is_refused_with_403() -> None:
    """Each call reserves its worst case (every input token at the cache-write rate, max_tokens of output)
    before it goes; one that does not fit beside the reservations in flight waits (here: not at all) and is
    refused. A smaller one that fits goes ahead, and settling gives the reservation back."""
    hold = asyncio.Event()
    big_events = stream_events("claude-sonnet-4-5", {"input_tokens": 100, "output_tokens": 1}, {"output_tokens": 50})
    api = FakeAPI([streamed(big_events, hold=hold), whole({"input_tokens": 100, "output_tokens": 10})])
    big = message(max_tokens=20_000, stream=True)

    async def main() -> None:
        async with gateway(api, budget=0.5) as h:
            h.gw.admit_wait = 0
            first = asyncio.create_task(h.post(big))
            await h.until(lambda: bool(h.gw.reserved) and len(api.requests) == 1)
            (reserve,) = h.gw.reserved.values()
            bound = estimate_input_tokens(json.dumps(big).encode(), big)
            assert reserve == pytest.approx(usd(bound, 3.75) + usd(20_000, 15.0))
            status, data, headers = await h.post(big)
            assert status == 403 and headers["x-sandbox-refused"] == "reservation"
            err = json.loads(data)["error"]
            assert err["type"] == "permission_error"
            assert "does not fit in the run's model budget of $0.50" in err["message"]
            (refused,) = h.of("model_call_refused")
            assert refused["reserve_usd"] == pytest.approx(reserve, abs=1e-6)
            assert refused["outstanding_usd"] == pytest.approx(reserve, abs=1e-6)
            status, _, _ = await h.post(message(max_tokens=100))  # ~$0.02 worst case: fits
            assert status == 200 and len(h.gw.reserved) == 1
            hold.set()
            assert (await first)[0] == 200
            assert h.gw.reserved == {} and h.gw.live == {} and h.gw.outstanding_usd == 0
            assert len(api.requests) == 2, "the refused call never reached the API"
            assert h.gw.spent_usd == pytest.approx(sum(c["cost_usd"] for c in h.of("model_call")), abs=1e-6)

    asyncio.run(main())


def test_a_lone_call_goes_even_when_its_worst_case_is_over_what_is_left_then_spend_refuses_the_next() -> None:
    """With nothing in flight a call needs only spend below the cap. A whole answer cannot be cut, so it is
    booked in full even past the cap; from then on every call is refused with 403 (token counting and the model
    list too), and nothing more reaches the API."""
    api = FakeAPI([whole({"input_tokens": 10_000, "output_tokens": 2000})])

    async def main() -> None:
        async with gateway(api, budget=0.05) as h:
            status, _, _ = await h.post(message(max_tokens=64_000))  # worst case ~$0.98
            assert status == 200
            (call,) = h.of("model_call")
            assert call["cost_usd"] == pytest.approx(0.03 + 0.03) and h.gw.spent_usd > h.gw.budget_usd
            for path, body in (("/v1/messages", message()), ("/v1/messages/count_tokens", message())):
                status, data, headers = await h.post(body, path)
                assert status == 403 and headers["x-sandbox-refused"] == "budget"
                assert json.loads(data)["error"]["message"] == (
                    "sandbox: the run's model budget of $0.05 is spent ($0.0600); no further model calls are allowed"
                )
            async with h.session.get(h.url + "/v1/models") as r:
                assert r.status == 403
            assert len(api.requests) == 1
            assert [e["reason"] for e in h.of("model_call_refused")] == ["budget"] * 3
            async with h.session.get(h.url + "/_sandbox/health") as r:
                health = await r.json()
            assert health == {
                "ok": True,
                "spent_usd": pytest.approx(0.06),
                "calls": 1,
                "reserved_usd": 0,
                "watchdog": None,
            }

    asyncio.run(main())


def test_a_stream_is_cut_as_soon_as_its_input_alone_crosses_the_cap() -> None:
    """message_start reports 500,000 cache-read and 60,000 input tokens: $0.33 on a $0.25 budget before any
    output. The stream is cut right there, the client gets an error event, and the API's stream is closed."""
    never = asyncio.Event()
    events = stream_events(
        "claude-sonnet-4-5",
        {"input_tokens": 60_000, "cache_read_input_tokens": 500_000, "output_tokens": 1},
        {"output_tokens": 10},
    )
    api = FakeAPI([streamed(events, hold=never)])

    async def main() -> None:
        async with gateway(api, budget=0.25) as h:
            status, data, _ = await h.post(message(max_tokens=1000, stream=True))
            assert status == 200
            text = data.decode()
            assert text.startswith("event: message_start") and "content_block" not in text
            assert "event: error" in text and "the run's model budget of $0.25 is spent" in text
            (call,) = h.of("model_call")
            assert call["complete"] is False and call["cut"] == "budget"
            assert call["cost_usd"] == pytest.approx(usd(60_000, 3.0) + usd(500_000, 0.3) + usd(1, 15.0), abs=1e-6)
            await h.until(lambda: api.closed == 1)

    asyncio.run(main())


# --- token counting ---------------------------------------------------------------------------------------------


def test_token_counting_is_forwarded_but_neither_metered_nor_reserved() -> None:
    """count_tokens costs nothing: it takes no reservation (it goes through even while a call holds nearly the
    whole budget) and books no model_call; the real key goes with it."""
    hold = asyncio.Event()
    events = stream_events("claude-sonnet-4-5", {"input_tokens": 10, "output_tokens": 1}, {"output_tokens": 5})
    api = FakeAPI([streamed(events, hold=hold)])

    async def main() -> None:
        async with gateway(api, budget=0.32) as h:
            h.gw.admit_wait = 0
            call = asyncio.create_task(h.post(message(max_tokens=20_000, stream=True)))
            await h.until(lambda: bool(h.gw.reserved) and len(api.requests) == 1)
            for _ in range(3):
                status, data, _ = await h.post(message(max_tokens=20_000), "/v1/messages/count_tokens")
                assert status == 200 and json.loads(data) == {"input_tokens": 42}
            assert len(h.gw.reserved) == 1
            hold.set()
            await call
            assert [e["event"] for e in h.events] == ["model_call"] and h.gw.calls == 1
            counted = [r for r in api.requests if r[0] == "/v1/messages/count_tokens"]
            assert len(counted) == 3 and {k for _, _, k in counted} == {KEY}

    asyncio.run(main())


# --- the meter on its own ------------------------------------------------------------------------------------------

STREAM = b"".join(
    sse(e)
    for e in stream_events(
        "claude-sonnet-4-5",
        {"input_tokens": 1200, "output_tokens": 1, "cache_creation_input_tokens": 300},
        {"output_tokens": 90},
        text="z" * 40,
        tool={"id": "toolu_9", "name": "Read"},
    )
)


def test_the_meter_reads_a_stream_however_it_is_split() -> None:
    whole_meter = UsageMeter()
    whole_meter.feed_sse(STREAM)
    expected = (
        whole_meter.model,
        whole_meter.input_tokens,
        whole_meter.output_tokens,
        whole_meter.cache_write,
        whole_meter.streamed_bytes,
        whole_meter.stop_reason,
        whole_meter.tool_uses,
        whole_meter.final,
    )
    assert expected == ("claude-sonnet-4-5", 1200, 90, 300, 40, "tool_use", [{"id": "toolu_9", "name": "Read"}], True)
    for size in (1, 2, 7, 64):
        m = UsageMeter()
        for i in range(0, len(STREAM), size):
            m.feed_sse(STREAM[i : i + size])
        assert (
            m.model,
            m.input_tokens,
            m.output_tokens,
            m.cache_write,
            m.streamed_bytes,
            m.stop_reason,
            m.tool_uses,
            m.final,
        ) == expected, size


def test_the_meter_ignores_what_is_not_usage() -> None:
    m = UsageMeter()
    m.feed_sse(
        b'event: ping\ndata: {"type": "ping"}\n\n: a comment\n\ndata: not json\n\ndata: [1, 2]\n\n'
        b'data: {"type": "message_start", "message": "not an object"}\n\n'
    )
    assert (m.input_tokens, m.output_tokens, m.model) == (0, 0, "")
    m.feed_sse(
        sse(
            {
                "type": "message_start",
                "message": {
                    "usage": {
                        "input_tokens": True,
                        "output_tokens": -5,
                        "cache_read_input_tokens": "100",
                        "cache_creation_input_tokens": 7.5,
                        "cache_creation": [],
                        "server_tool_use": {"web_search_requests": None},
                    }
                },
            }
        )
    )
    assert (m.input_tokens, m.output_tokens, m.cache_read, m.cache_write, m.web_searches) == (0, 0, 0, 0, 0)
    m.feed_sse(sse({"type": "message_delta", "delta": "x", "usage": None}))
    assert m.final and m.stop_reason is None


def test_the_meter_caps_the_tools_it_lists_and_reads_whole_messages() -> None:
    m = UsageMeter()
    m.feed_json(
        json.dumps(
            {
                "type": "message",
                "model": "claude-haiku-4-5",
                "stop_reason": "tool_use",
                "content": [{"type": "tool_use", "id": f"t{i}", "name": "Bash"} for i in range(150)],
                "usage": {"input_tokens": 3, "output_tokens": 4},
            }
        ).encode()
    )
    assert m.started and m.final and len(m.tool_uses) == 100 and (m.input_tokens, m.output_tokens) == (3, 4)
    error = UsageMeter()
    error.feed_json(b'{"type": "error", "error": {"type": "overloaded_error"}}')
    assert not error.started and not error.final
    error.feed_json(b"<html>bad gateway</html>")
    assert error.cost({}, 1000, "claude-sonnet-4-5") == 0


def test_output_before_the_final_usage_is_estimated_within_max_tokens() -> None:
    m = UsageMeter()
    m.feed_sse(sse({"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 3}}}))
    assert m.output_estimate(1000) == 3
    m.feed_sse(sse({"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "t" * 50}}))
    m.feed_sse(sse({"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "{}"}}))
    assert m.streamed_bytes == 52 and m.output_estimate(1000) == 52 and m.output_estimate(20) == 20
    m.feed_sse(sse({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 20}}))
    assert m.output_estimate(1000) == 20 and m.as_dict(1000)["output_tokens"] == 20


def test_a_settle_request_is_answered_after_the_calls_in_flight_end() -> None:
    """The supervisor's settle request (sidecar/__main__.py, on the control socket): `settled` comes out only
    once the call in flight has ended, after its `model_call` line; with nothing in flight, at once."""
    hold = asyncio.Event()
    events = stream_events("claude-sonnet-4-5", {"input_tokens": 10}, {"output_tokens": 5})
    api = FakeAPI([streamed(events, hold)])

    async def main() -> None:
        async with gateway(api) as h, contextlib.AsyncExitStack() as stack:
            sock_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sbx-settle-"))
            path = os.path.join(sock_dir, "control.sock")
            server = await asyncio.start_unix_server(
                lambda r, w: settle_on_request(h.gw, h.events.append, r, w), path=path
            )
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)

            async def ask(token: str) -> bytes:
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(token.encode() + b"\n")
                answer = await reader.read(16)
                writer.close()
                return answer

            call = asyncio.create_task(h.post(message(stream=True)))
            await h.until(lambda: bool(h.gw.reserved))
            asking = asyncio.create_task(ask("t1"))
            await asyncio.sleep(0.05)
            assert not asking.done() and not h.of("settled"), "no answer while a call is in flight"
            hold.set()
            assert await asking == b"ok\n"
            await call
            kinds = [e["event"] for e in h.events]
            assert kinds.index("model_call") < kinds.index("settled")
            assert h.of("settled") == [{"event": "settled", "token": "t1", "inflight": 0, "calls": 1}]
            assert await asyncio.wait_for(ask("t2"), 1) == b"ok\n"
            assert h.of("settled")[-1]["token"] == "t2"

    asyncio.run(main())
