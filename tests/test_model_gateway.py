"""The scripted model and the gateway in front of it, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from agent_sandbox.sidecar.gateway import Gateway
from agent_sandbox.sidecar.pricing import Price
from agent_sandbox.sidecar.script import parse_script
from agent_sandbox.sidecar.scripted_model import ScriptedModel, serve

SCRIPT = {
    "turns": [
        {"bash": "echo hi"},
        {"edit": {"path": "a.py", "old": "x = 1", "new": "x = 2"}},
        {"text": "Done.", "usage": {"input_tokens": 1000, "output_tokens": 200}},
    ],
    "usage": {"input_tokens": 100, "output_tokens": 50},
}
TOOLS = [{"name": "Bash", "input_schema": {"type": "object"}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(assistant_turns: int, stream: bool = False, tools: bool = True, result: str | None = None) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "task"}]
    for i in range(assistant_turns):
        call = {"type": "tool_use", "id": f"t{i}", "name": "Bash", "input": {}}
        msgs.append({"role": "assistant", "content": [call]})
        msgs.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": result or f"out {i}"}],
            }
        )
    b: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": msgs, "stream": stream}
    if tools:
        b["tools"] = TOOLS
    return b


async def read_sse(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    events = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data:"):
            events.append(json.loads(line[5:]))
    return events


def test_scripted_model_answers_from_the_conversation(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        tr = tmp_path / "t.jsonl"
        runner = await serve(ScriptedModel(parse_script(SCRIPT), tr), "127.0.0.1", port)
        url = f"http://127.0.0.1:{port}/v1/messages"
        try:
            async with aiohttp.ClientSession() as s:
                # A side request without tools gets a short text and consumes nothing.
                r = await (await s.post(url, json=body(0, tools=False))).json()
                assert r["content"] == [{"type": "text", "text": "OK."}]
                r = await (await s.post(url, json=body(0))).json()
                assert r["content"][0]["name"] == "Bash" and r["stop_reason"] == "tool_use"
                # The same conversation again (a retry) gets the same answer.
                r2 = await (await s.post(url, json=body(0))).json()
                assert r2["content"][0]["input"] == r["content"][0]["input"]
                r = await (await s.post(url, json=body(1))).json()
                assert r["content"][0]["name"] == "Read"
                r = await (await s.post(url, json=body(2))).json()
                assert r["content"][0]["name"] == "Edit"
                assert r["content"][0]["input"]["new_string"] == "x = 2"
                resp = await s.post(url, json=body(3, stream=True, result="the tests passed"))
                assert resp.headers["content-type"].startswith("text/event-stream")
                events = await read_sse(resp)
                kinds = [e["type"] for e in events]
                assert kinds == [
                    "message_start",
                    "content_block_start",
                    "content_block_delta",
                    "content_block_stop",
                    "message_delta",
                    "message_stop",
                ]
                assert events[2]["delta"]["text"] == "Done."
                assert events[4]["delta"]["stop_reason"] == "end_turn"
                assert events[0]["message"]["usage"]["input_tokens"] == 1000
                assert events[4]["usage"]["output_tokens"] == 200
                # Used up: every further request gets a final text answer.
                r = await (await s.post(url, json=body(9))).json()
                assert r["stop_reason"] == "end_turn"
                c = await (await s.post(url + "/count_tokens", json=body(0))).json()
                assert c["input_tokens"] > 0
        finally:
            await runner.cleanup()
        lines = [json.loads(x) for x in tr.read_text().splitlines()]
        streamed = next(x for x in lines if x.get("stream"))
        assert streamed["tool_results"][0]["content"] == "the tests passed"
        assert lines[0]["offers_tools"] is False

    asyncio.run(main())


def test_gateway_injects_key_meters_and_refuses_over_budget(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []

    async def main() -> None:
        mport, gport = free_port(), free_port()
        tr = tmp_path / "t.jsonl"
        model = await serve(ScriptedModel(parse_script(SCRIPT), tr), "127.0.0.1", mport)
        # Sonnet: $3/M in, $15/M out. 100 in + 50 out = $0.00105 per call; the budget lasts two calls.
        gw = Gateway("run-x", f"http://127.0.0.1:{mport}", "sk-ant-real-key-123456", 0.002, {}, events.append)
        runner = web.AppRunner(gw.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", gport).start()
        url = f"http://127.0.0.1:{gport}/v1/messages"
        headers = {
            "x-api-key": "placeholder-from-agent",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "some-beta",
        }
        try:
            async with aiohttp.ClientSession() as s:
                resp = await s.post(url, json=body(0, stream=True), headers=headers)
                assert resp.status == 200
                sse = await read_sse(resp)
                assert sse[1]["content_block"]["name"] == "Bash"
                resp = await s.post(url, json=body(1), headers=headers)
                assert resp.status == 200 and (await resp.json())["content"][0]["name"] == "Read"
                resp = await s.post(url, json=body(2), headers=headers)
                assert resp.status == 403
                err = await resp.json()
                assert err["error"]["type"] == "permission_error" and "budget" in err["error"]["message"]
                assert resp.headers["x-sandbox-refused"] == "budget"
        finally:
            await runner.cleanup()
            await model.cleanup()
        seen = [json.loads(x) for x in tr.read_text().splitlines()]
        assert len(seen) == 2, "the refused call must never reach the model"
        real = hashlib.sha256(b"sk-ant-real-key-123456").hexdigest()
        assert {x["api_key_sha256"] for x in seen} == {real}
        assert {x["anthropic_version"] for x in seen} == {"2023-06-01"}
        assert {x["anthropic_beta"] for x in seen} == {"some-beta"}

    asyncio.run(main())
    calls = [e for e in events if e["event"] == "model_call"]
    assert [c["usage"]["input_tokens"] for c in calls] == [100, 100]
    assert [c["usage"]["output_tokens"] for c in calls] == [50, 50]
    assert calls[0]["cost_usd"] == 0.00105 and calls[1]["spent_usd"] == 0.0021
    assert calls[0]["stream"] is True and calls[1]["stream"] is False
    assert [e["event"] for e in events][-1] == "model_call_refused"


def test_gateway_streams_without_buffering_and_applies_price_overrides() -> None:
    """The upstream sends one event and then waits until the client has it: a buffering gateway deadlocks."""
    events: list[dict[str, Any]] = []
    client_got_first = asyncio.Event()

    async def upstream_handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        start = {
            "type": "message_start",
            "message": {
                "model": "claude-sonnet-x",
                "usage": {"input_tokens": 1_000_000, "cache_read_input_tokens": 1_000_000},
            },
        }
        await resp.write(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
        await asyncio.wait_for(client_got_first.wait(), 10)
        delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1_000_000}}
        await resp.write(f"event: message_delta\ndata: {json.dumps(delta)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def main() -> None:
        up_app = web.Application()
        up_app.router.add_post("/v1/messages", upstream_handler)
        up = web.AppRunner(up_app)
        await up.setup()
        uport, gport = free_port(), free_port()
        await web.TCPSite(up, "127.0.0.1", uport).start()
        # A negotiated rate for sonnet: $1 in, $2 out, $0.5 cache read, per million tokens.
        prices = {"sonnet": Price(input=1, output=2, cache_write=1, cache_read=0.5)}
        gw = Gateway("run-s", f"http://127.0.0.1:{uport}", None, 100.0, prices, events.append)
        runner = web.AppRunner(gw.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", gport).start()
        try:
            async with aiohttp.ClientSession() as s:
                resp = await s.post(f"http://127.0.0.1:{gport}/v1/messages", json={"stream": True})
                first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                assert b"message_start" in first
                client_got_first.set()
                rest = await asyncio.wait_for(resp.read(), 5)
                assert b"message_delta" in rest
        finally:
            await runner.cleanup()
            await up.cleanup()

    asyncio.run(main())
    (call,) = [e for e in events if e["event"] == "model_call"]
    assert call["usage"] == {
        "input_tokens": 1_000_000,
        "output_tokens": 1_000_000,
        "cache_read_input_tokens": 1_000_000,
        "cache_creation_input_tokens": 0,
    }
    assert call["cost_usd"] == 3.5  # 1 + 2 + 0.5 at the overridden rates, not the table's $3/$15


def _company_ca_and_server_cert(tmp: Path) -> tuple[str, ssl.SSLContext]:
    """A company CA (PEM text) and a TLS context for a server on 127.0.0.1 whose certificate it signed."""
    import subprocess

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    # EC keys: generated in milliseconds, where RSA takes a good part of a second on a small machine.
    run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=company inspecting proxy CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    )
    run(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "srv.pem", tmp / "srv.key")
    return (tmp / "ca.pem").read_text(), ctx


def test_gateway_trusts_the_policys_extra_certificate_authorities(tmp_path: Path) -> None:
    """Behind a TLS-inspecting proxy the model API's certificate is signed by the company's CA: the gateway
    trusts it only when the policy names it (egress.ca_certificates), and never skips verification."""
    ca_pem, server_ctx = _company_ca_and_server_cert(tmp_path)

    async def call(extra_ca_pem: str) -> tuple[int, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []
        mport, gport = free_port(), free_port()
        model = web.AppRunner(ScriptedModel(parse_script(SCRIPT), tmp_path / "t.jsonl").app())
        await model.setup()
        await web.TCPSite(model, "127.0.0.1", mport, ssl_context=server_ctx).start()
        gw = Gateway(
            "run-ca", f"https://127.0.0.1:{mport}", "sk-ant-real", 10.0, {}, events.append, extra_ca_pem=extra_ca_pem
        )
        runner = web.AppRunner(gw.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", gport).start()
        try:
            async with aiohttp.ClientSession() as s:
                resp = await s.post(
                    f"http://127.0.0.1:{gport}/v1/messages", json=body(0), headers={"anthropic-version": "2023-06-01"}
                )
                return resp.status, events
        finally:
            await runner.cleanup()
            await model.cleanup()

    status, events = asyncio.run(call(""))
    assert status == 502 and [e["event"] for e in events] == ["model_call_failed"]
    assert "certificate verify failed" in events[0]["error"], events
    status, events = asyncio.run(call(ca_pem))
    assert status == 200 and [e["event"] for e in events] == ["model_call"], events
