"""The sidecar's watchdog without Docker: the supervisor's heartbeat file (its mtime set with os.utime) and the
run's deadline, and what the gateway and the proxy do once it trips."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent_sandbox.sidecar.config import SidecarConfig
from agent_sandbox.sidecar.gateway import Gateway
from agent_sandbox.sidecar.proxy import EgressProxy
from agent_sandbox.sidecar.script import parse_script
from agent_sandbox.sidecar.scripted_model import ScriptedModel, serve
from agent_sandbox.sidecar.watchdog import Watchdog

from .test_model_gateway import SCRIPT, body, free_port
from .test_proxy_requests import CONNECT, Upstream, client_hello

MORE = web.AppKey("more", asyncio.Event)


def beat(path: Path, age: float = 0.0) -> None:
    """The supervisor's heartbeat, `age` seconds ago."""
    path.touch()
    t = time.time() - age
    os.utime(path, (t, t))


def watchdog(path: Path | None, events: list[dict[str, Any]], **kwargs: Any) -> Watchdog:
    return Watchdog(events.append, str(path) if path else None, heartbeat_timeout_s=30, **kwargs)


def states(events: list[dict[str, Any]]) -> list[str]:
    return [e["state"] for e in events if e["event"] == "watchdog"]


# --- the watchdog --------------------------------------------------------------------------------------------


def test_a_stale_heartbeat_trips_and_a_fresh_one_restores(tmp_path: Path) -> None:
    hb, events, cuts = tmp_path / "beat", [], []
    wd = watchdog(hb, events)
    wd.on_trip(cuts.append)
    beat(hb, age=5)
    assert wd.check() is None and wd.tripped is None and events == []
    beat(hb, age=31)
    assert wd.check() == "supervisor_lost" == wd.tripped
    assert wd.check() == "supervisor_lost"  # one event per change, not per check
    (event,) = events
    assert event["event"] == "watchdog" and event["state"] == "supervisor_lost"
    assert 30 < event["heartbeat_age_s"] < 40 and str(hb) in event["detail"]
    assert cuts == ["supervisor_lost"]
    beat(hb)  # the supervisor was only paused
    assert wd.check() is None and wd.tripped is None
    assert states(events) == ["supervisor_lost", "restored"] and events[-1]["heartbeat_age_s"] < 5


def test_a_missing_heartbeat_counts_from_the_start_then_from_the_last_beat_seen(tmp_path: Path) -> None:
    hb, events = tmp_path / "beat", []
    wd = Watchdog(events.append, str(hb), heartbeat_timeout_s=0.2)
    assert wd.check() is None, "not there yet: the sidecar may start before the first beat"
    time.sleep(0.3)
    assert wd.check() == "supervisor_lost"
    assert events[0]["heartbeat_age_s"] >= 0.2
    beat(hb)
    assert wd.check() is None
    hb.unlink()  # gone again: the last mtime seen stands, and it is fresh for a while
    assert wd.check() is None
    time.sleep(0.3)
    assert wd.check() == "supervisor_lost"
    assert states(events) == ["supervisor_lost", "restored", "supervisor_lost"]


def test_the_deadline_trips_for_good(tmp_path: Path) -> None:
    hb, events, cuts = tmp_path / "beat", [], []
    wd = watchdog(hb, events, deadline_s=60)
    wd.on_trip(cuts.append)
    beat(hb)
    assert wd.check() is None
    wd.started -= 61  # a minute has passed since the sidecar started
    assert wd.check() == "deadline" == wd.tripped
    beat(hb)
    assert wd.check() == "deadline" and wd.tripped == "deadline"
    (event,) = events
    assert event["state"] == "deadline" and "60s" in event["detail"] and event["heartbeat_age_s"] < 5
    assert cuts == ["deadline"]


def test_a_lost_supervisor_then_the_deadline(tmp_path: Path) -> None:
    hb, events = tmp_path / "beat", []
    wd = watchdog(hb, events, deadline_s=60)
    beat(hb, age=100)
    assert wd.check() == "supervisor_lost"
    wd.started -= 61
    assert wd.check() == "deadline"
    beat(hb)
    assert wd.check() == "deadline"
    assert states(events) == ["supervisor_lost", "deadline"]


def test_without_heartbeat_or_deadline_it_never_trips() -> None:
    events: list[dict[str, Any]] = []
    wd = Watchdog(events.append)
    wd.started -= 10**6
    assert wd.check() is None and events == []


def test_the_config_fields() -> None:
    config = SidecarConfig(run_id="r", budget_usd=1, heartbeat_path="/sandbox/heartbeat/beat", deadline_s=3660)
    assert (config.heartbeat_path, config.heartbeat_timeout_s, config.deadline_s) == (
        "/sandbox/heartbeat/beat",
        30.0,
        3660,
    )
    assert SidecarConfig(run_id="r", budget_usd=1).deadline_s is None
    for bad in ({"heartbeat_timeout_s": 0}, {"deadline_s": -1}):
        with pytest.raises(ValueError):
            SidecarConfig(run_id="r", budget_usd=1, **bad)


def test_run_checks_about_once_a_second(tmp_path: Path) -> None:
    hb, events = tmp_path / "beat", []
    wd = Watchdog(events.append, str(hb), heartbeat_timeout_s=30, interval_s=0.01)
    beat(hb, age=60)

    async def main() -> None:
        task = asyncio.create_task(wd.run())
        for _ in range(100):
            if wd.tripped:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert wd.tripped == "supervisor_lost" and states(events) == ["supervisor_lost"]


# --- the gateway ---------------------------------------------------------------------------------------------


def test_the_gateway_refuses_every_call_once_tripped(tmp_path: Path) -> None:
    hb = tmp_path / "beat"
    events: list[dict[str, Any]] = []
    wd = watchdog(hb, events, deadline_s=600)

    async def main() -> None:
        mport, gport = free_port(), free_port()
        model = await serve(ScriptedModel(parse_script(SCRIPT), None), "127.0.0.1", mport)
        gw = Gateway("run-x", f"http://127.0.0.1:{mport}", None, 10.0, {}, events.append, watchdog=wd)
        runner = web.AppRunner(gw.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", gport).start()
        base = f"http://127.0.0.1:{gport}"
        try:
            async with aiohttp.ClientSession() as s:

                async def call(path: str = "/v1/messages") -> aiohttp.ClientResponse:
                    resp = await s.post(base + path, json=body(0))
                    await resp.read()
                    return resp

                beat(hb)
                wd.check()
                assert (await call()).status == 200
                beat(hb, age=45)
                wd.check()
                for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/elsewhere"):
                    resp = await call(path)
                    assert resp.status == 403 and resp.headers["x-sandbox-refused"] == "supervisor_lost"
                    error = (await resp.json())["error"]
                    assert error["type"] == "permission_error" and "supervisor is gone" in error["message"]
                health = await (await s.get(base + "/_sandbox/health")).json()
                assert health["watchdog"] == "supervisor_lost"
                beat(hb)
                wd.check()
                assert (await call()).status == 200
                wd.started -= 601
                wd.check()
                beat(hb)
                wd.check()
                resp = await call()
                assert resp.status == 403 and resp.headers["x-sandbox-refused"] == "deadline"
                assert "deadline has passed" in (await resp.json())["error"]["message"]
        finally:
            await runner.cleanup()
            await model.cleanup()

    asyncio.run(main())
    refused = [e for e in events if e["event"] == "model_call_refused"]
    assert [e["reason"] for e in refused] == ["supervisor_lost"] * 3 + ["deadline"]
    assert refused[0]["path"] == "/v1/messages" and refused[0]["method"] == "POST"
    assert [e["event"] for e in events if e["event"] in ("model_call", "watchdog")] == [
        "model_call",
        "watchdog",
        "watchdog",
        "model_call",
        "watchdog",
    ]
    assert states(events) == ["supervisor_lost", "restored", "deadline"]


def test_the_gateway_cuts_a_stream_in_flight_when_tripped(tmp_path: Path) -> None:
    hb = tmp_path / "beat"
    events: list[dict[str, Any]] = []
    wd = watchdog(hb, events)
    beat(hb)
    wd.check()

    async def slow_upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        start = {"type": "message_start", "message": {"model": "claude-sonnet-4-5", "usage": {"input_tokens": 10}}}
        await resp.write(b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n")
        await request.app[MORE].wait()
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "more"}}
        with contextlib.suppress(ConnectionError):  # the gateway hangs up: it cut the stream off
            for _ in range(50):
                await resp.write(b"event: content_block_delta\ndata: " + json.dumps(delta).encode() + b"\n\n")
                await asyncio.sleep(0.01)
        return resp

    async def main() -> tuple[bytes, bytes]:
        uport, gport = free_port(), free_port()
        up_app = web.Application()
        up_app[MORE] = asyncio.Event()
        up_app.router.add_post("/v1/messages", slow_upstream)
        up = web.AppRunner(up_app)
        await up.setup()
        await web.TCPSite(up, "127.0.0.1", uport).start()
        gw = Gateway("run-x", f"http://127.0.0.1:{uport}", None, 10.0, {}, events.append, watchdog=wd)
        runner = web.AppRunner(gw.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", gport).start()
        try:
            async with aiohttp.ClientSession() as s:
                resp = await s.post(f"http://127.0.0.1:{gport}/v1/messages", json=body(0, stream=True))
                first = await resp.content.readuntil(b"\n\n")
                beat(hb, age=45)
                wd.check()
                up_app[MORE].set()
                rest = await asyncio.wait_for(resp.content.read(), 5)
                return first, rest
        finally:
            await runner.cleanup()
            await up.cleanup()

    first, rest = asyncio.run(main())
    assert b"message_start" in first
    assert rest.count(b"event: content_block_delta") <= 1, "the stream ends at the first chunk after the trip"
    assert b"event: error" in rest and b"supervisor is gone" in rest and b"permission_error" in rest
    (call,) = [e for e in events if e["event"] == "model_call"]
    assert call["cut"] == "supervisor_lost" and call["complete"] is False


# --- the proxy -----------------------------------------------------------------------------------------------


def test_the_proxy_refuses_new_connections_and_cuts_open_ones(tmp_path: Path) -> None:
    hb = tmp_path / "beat"
    events: list[dict[str, Any]] = []
    wd = watchdog(hb, events, deadline_s=600)
    beat(hb)
    wd.check()

    async def main() -> None:
        upstream = Upstream()
        up_server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        up_port = up_server.sockets[0].getsockname()[1]

        async def resolve(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        proxy = EgressProxy(
            "r1",
            ["good.example"],
            [],
            "enforce",
            False,
            [],
            ("sidecar", 8080),
            events.append,
            allow_addresses=["127.0.0.1"],
            resolve=resolve,
            watchdog=wd,
        )
        proxy.connect = lambda ip, port: asyncio.open_connection("127.0.0.1", up_port)  # type: ignore[method-assign]
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def tunnel() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(CONNECT("good.example:443") + client_hello("good.example"))
            got = b""
            async with asyncio.timeout(5):
                while b"upstream saw" not in got:  # through the tunnel, or refused and closed
                    data = await reader.read(65536)
                    if not data:
                        break
                    got += data
            return reader, writer, got

        async def egress_lines(n: int) -> list[dict[str, Any]]:
            for _ in range(200):
                lines = [e for e in events if e["event"] == "egress"]
                if len(lines) >= n:
                    return lines
                await asyncio.sleep(0.01)
            raise AssertionError(f"fewer than {n} decision lines: {events}")

        try:
            reader, writer, got = await tunnel()
            assert got.startswith(b"HTTP/1.1 200") and b"upstream saw" in got
            beat(hb, age=45)
            wd.check()  # trips: the open tunnel is cut off
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            writer.close()
            (line,) = await egress_lines(1)
            assert line["decision"] == "allow" and line["bytes_up"] > 0
            assert "cut off: supervisor_lost (the run's supervisor is gone" in line["decision_detail"]

            _, writer, got = await tunnel()
            writer.close()
            assert got.startswith(b"HTTP/1.1 403") and b"supervisor is gone" in got
            line = (await egress_lines(2))[1]
            assert line["decision"] == "deny" and line["host"] == "good.example" and line["method"] == "CONNECT"
            assert line["reason"] == "supervisor_lost: the run's supervisor is gone (its heartbeat stopped)"
            assert upstream.connections == 1, "the refused CONNECT never reached the upstream"

            beat(hb)
            wd.check()  # restored
            _, writer, got = await tunnel()
            writer.close()
            assert got.startswith(b"HTTP/1.1 200")
            assert (await egress_lines(3))[2]["decision"] == "allow"

            wd.started -= 601
            wd.check()
            _, writer, got = await tunnel()
            writer.close()
            assert got.startswith(b"HTTP/1.1 403") and b"deadline has passed" in got
            assert (await egress_lines(4))[3]["reason"] == "deadline: the run's deadline has passed"
        finally:
            server.close()
            up_server.close()

    asyncio.run(main())
    assert states(events) == ["supervisor_lost", "restored", "deadline"]
