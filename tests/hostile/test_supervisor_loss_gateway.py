"""Red team of the sidecar's backstop (issue 12), at the gateway, without Docker: once the supervisor's
heartbeat is stale the gateway must forward nothing more to the model API and hand the agent no further
answer. The attacks are requests the agent starts just before the trip and finishes, or gets answered, after
it: a body sent slowly, and a non-streamed call the upstream answers late."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from agent_sandbox.sidecar.gateway import Gateway
from agent_sandbox.sidecar.watchdog import Watchdog

from ..test_model_gateway import body, free_port

ANSWER = web.AppKey("answer", asyncio.Event)
SEEN = web.AppKey("seen", list)


def beat(path: Path, age: float = 0.0) -> None:
    path.touch()
    t = time.time() - age
    import os

    os.utime(path, (t, t))


class Harness:
    """A fake upstream (records what reaches it; answers /v1/messages only once `answer` is set), the real
    gateway with a watchdog on a heartbeat file, both on loopback."""

    def __init__(self, tmp_path: Path) -> None:
        self.hb = tmp_path / "beat"
        self.events: list[dict[str, Any]] = []
        self.wd = Watchdog(self.events.append, str(self.hb), heartbeat_timeout_s=30)
        beat(self.hb)
        assert self.wd.check() is None

    def trip(self) -> None:
        beat(self.hb, age=45)
        assert self.wd.check() == "supervisor_lost"

    async def start(self) -> None:
        async def messages(request: web.Request) -> web.Response:
            request.app[SEEN].append(("messages", await request.read()))
            await request.app[ANSWER].wait()
            return web.json_response(
                {
                    "id": "msg_late",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5",
                    "content": [{"type": "text", "text": "THE LATE ANSWER"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 10, "output_tokens": 5},
                }
            )

        async def count_tokens(request: web.Request) -> web.Response:
            request.app[SEEN].append(("count_tokens", await request.read()))
            return web.json_response({"input_tokens": 7})

        self.up_app = web.Application()
        self.up_app[ANSWER] = asyncio.Event()
        self.up_app[SEEN] = []
        self.up_app.router.add_post("/v1/messages", messages)
        self.up_app.router.add_post("/v1/messages/count_tokens", count_tokens)
        self.up = web.AppRunner(self.up_app)
        await self.up.setup()
        uport, self.gport = free_port(), free_port()
        await web.TCPSite(self.up, "127.0.0.1", uport).start()
        gw = Gateway("run-x", f"http://127.0.0.1:{uport}", "sk-real", 10.0, {}, self.events.append, watchdog=self.wd)
        self.runner = web.AppRunner(gw.app())
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.gport).start()

    @property
    def seen(self) -> list[tuple[str, bytes]]:
        return self.up_app[SEEN]

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.up.cleanup()

    async def slow_post(self, path: str, payload: bytes, before_rest: Any) -> tuple[int, bytes]:
        """POST with the headers and half the body before `before_rest()` runs, the other half after; returns
        the status and the response body."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.gport)
        half = len(payload) // 2
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: sidecar:8080\r\nContent-Type: application/json\r\n"
            f"anthropic-version: 2023-06-01\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + payload[:half]
        )
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler has started and waits in request.read()
        before_rest()
        writer.write(payload[half:])
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), rest


def test_a_token_count_whose_body_ends_after_the_trip_is_not_forwarded(tmp_path: Path) -> None:
    # Fixed bug: Gateway.handle checks the watchdog once, before `await request.read()`; only calls to
    # /v1/messages are checked again (in _admit). A count_tokens request whose headers came before the trip and
    # whose body trickles in after it is forwarded upstream, with the real key, after the supervisor is gone.
    h = Harness(tmp_path)

    async def main() -> tuple[int, bytes]:
        await h.start()
        try:
            payload = json.dumps(body(0, tools=False) | {"pad": "x" * 2000}).encode()
            return await h.slow_post("/v1/messages/count_tokens", payload, h.trip)
        finally:
            await h.stop()

    status, _ = asyncio.run(main())
    assert h.seen == [], "nothing may reach the model API once the supervisor is gone"
    assert status == 403


def test_a_model_call_whose_body_ends_after_the_trip_is_refused(tmp_path: Path) -> None:
    """Defended: the same slow body on /v1/messages is refused (the admission looks at the watchdog again)."""
    h = Harness(tmp_path)

    async def main() -> tuple[int, bytes]:
        await h.start()
        h.up_app[ANSWER].set()
        try:
            payload = json.dumps(body(0) | {"pad": "x" * 2000}).encode()
            return await h.slow_post("/v1/messages", payload, h.trip)
        finally:
            await h.stop()

    status, rest = asyncio.run(main())
    assert h.seen == []
    assert status == 403 and b"supervisor is gone" in rest


def test_a_non_streamed_answer_is_not_handed_over_after_the_trip(tmp_path: Path) -> None:
    # Fixed bug: only SSE streams are cut when the watchdog trips (_forward checks `is_sse`); a call with
    # "stream": false admitted just before the trip is answered in full however long after it the upstream
    # finishes (with the real API, a long generation: minutes of model work after the supervisor is gone).
    h = Harness(tmp_path)

    async def main() -> tuple[int, bytes]:
        await h.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.gport)
            payload = json.dumps(body(0, stream=False)).encode()
            writer.write(
                f"POST /v1/messages HTTP/1.1\r\nHost: sidecar:8080\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            for _ in range(100):  # the upstream is working on it
                if h.seen:
                    break
                await asyncio.sleep(0.02)
            assert h.seen, "the call reached the upstream before the trip"
            h.trip()
            await asyncio.sleep(0.2)
            h.up_app[ANSWER].set()  # the upstream finishes, after the supervisor is gone
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, rest = raw.partition(b"\r\n\r\n")
            return int(head.split()[1]), rest
        finally:
            await h.stop()

    status, rest = asyncio.run(main())
    assert b"THE LATE ANSWER" not in rest, f"the agent got a model answer after the trip (status {status})"
    (call,) = [e for e in h.events if e["event"] == "model_call"]
    assert call.get("cut") == "supervisor_lost"
