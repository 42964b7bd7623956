"""The model gateway: the agent's ANTHROPIC_BASE_URL.

It replaces whatever key the agent sends with the real one (which only the sidecar holds), streams the
upstream's response through as it arrives, meters usage from the response itself, and refuses every call
once the run's budget is spent. It answers 403, not 429, because clients retry a 429.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from ..pricing import Price, cost_usd

# Headers we pass upstream. Everything else from the agent (its placeholder key above all) stays behind.
FORWARD_REQUEST_HEADERS = ("anthropic-version", "anthropic-beta", "content-type", "accept", "user-agent",
                           "x-app", "anthropic-dangerous-direct-browser-access")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "upgrade",
              "proxy-authenticate", "proxy-authorization", "te", "trailer"}

Emit = Callable[[dict[str, Any]], None]


class UsageMeter:
    """Reads usage from a Messages response, streamed (SSE) or whole (JSON)."""

    def __init__(self) -> None:
        self.model = ""
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read = 0
        self.cache_write = 0
        self._buf = b""

    def _usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        # Stream events repeat counts cumulatively, so the largest seen is the total.
        self.input_tokens = max(self.input_tokens, int(usage.get("input_tokens") or 0))
        self.output_tokens = max(self.output_tokens, int(usage.get("output_tokens") or 0))
        self.cache_read = max(self.cache_read, int(usage.get("cache_read_input_tokens") or 0))
        self.cache_write = max(self.cache_write, int(usage.get("cache_creation_input_tokens") or 0))

    def feed_sse(self, chunk: bytes) -> None:
        self._buf += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buf:
            event, self._buf = self._buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        try:
            ev = json.loads(data)
        except ValueError:
            return
        if ev.get("type") == "message_start":
            msg = ev.get("message") or {}
            self.model = msg.get("model") or self.model
            self._usage(msg.get("usage"))
        elif ev.get("type") == "message_delta":
            self._usage(ev.get("usage"))

    def feed_json(self, body: bytes) -> None:
        try:
            msg = json.loads(body)
        except ValueError:
            return
        if isinstance(msg, dict):
            self.model = msg.get("model") or self.model
            self._usage(msg.get("usage"))

    def as_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_read_input_tokens": self.cache_read, "cache_creation_input_tokens": self.cache_write}


class Gateway:
    def __init__(self, run_id: str, upstream: str, api_key: str | None, budget_usd: float,
                 prices: dict[str, Price], emit: Emit, extra_ca_pem: str = "") -> None:
        self.run_id = run_id
        self.extra_ca_pem = extra_ca_pem
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key
        self.budget_usd = budget_usd
        self.prices = prices
        self.emit = emit
        self.spent_usd = 0.0
        self.calls = 0
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        connector = None
        if self.extra_ca_pem:
            # The system's authorities plus the policy's (a company's TLS-inspecting proxy, say).
            ctx = ssl.create_default_context()
            ctx.load_verify_locations(cadata=self.extra_ca_pem)
            connector = aiohttp.TCPConnector(ssl=ctx)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900),
        )

    async def stop(self, app: web.Application) -> None:
        if self.session:
            await self.session.close()

    def _refuse(self, reason: str, message: str) -> web.Response:
        self.emit({"event": "model_call_refused", "reason": reason, "spent_usd": round(self.spent_usd, 6),
                   "budget_usd": self.budget_usd})
        return web.json_response({"type": "error", "error": {"type": "permission_error", "message": message}},
                                 status=403, headers={"x-sandbox-refused": reason})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.spent_usd >= self.budget_usd:
            return self._refuse("budget", f"sandbox: the run's model budget of ${self.budget_usd:.2f} is spent "
                                          f"(${self.spent_usd:.4f}); no further model calls are allowed")
        assert self.session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST_HEADERS}
        headers["accept-encoding"] = "identity"  # we read usage out of the stream, so no compression
        if self.api_key:
            headers["x-api-key"] = self.api_key
        url = self.upstream + request.rel_url.path_qs
        started = time.monotonic()
        metered = request.path.rstrip("/") == "/v1/messages" and request.method == "POST"
        meter = UsageMeter()
        try:
            upstream = await self.session.request(request.method, url, data=body, headers=headers)
        except aiohttp.ClientError as exc:
            self.emit({"event": "model_call_failed", "path": request.path, "error": str(exc)[:300]})
            return web.json_response({"type": "error", "error": {"type": "api_error",
                                      "message": f"sandbox gateway: upstream unreachable: {exc}"}}, status=502)
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            await resp.prepare(request)
            is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
            whole = bytearray()
            # iter_any hands over whatever has arrived: nothing waits for a full buffer.
            async for chunk in upstream.content.iter_any():
                if metered:
                    if is_sse:
                        meter.feed_sse(chunk)
                    elif len(whole) < 8 * 1024 * 1024:
                        whole.extend(chunk)
                await resp.write(chunk)
            await resp.write_eof()
        if metered:
            if not is_sse:
                meter.feed_json(bytes(whole))
            self._account(request, upstream.status, meter, started, is_sse)
        return resp

    def _account(self, request: web.Request, status: int, meter: UsageMeter, started: float, stream: bool) -> None:
        model = meter.model or "unknown"
        cost = cost_usd(model, meter.input_tokens, meter.output_tokens, meter.cache_read, meter.cache_write,
                        self.prices)
        self.spent_usd += cost
        self.calls += 1
        self.emit({
            "event": "model_call", "call": self.calls, "path": request.path, "status": status, "stream": stream,
            "model": model, "usage": meter.as_dict(), "cost_usd": round(cost, 6),
            "spent_usd": round(self.spent_usd, 6), "budget_usd": self.budget_usd,
            "duration_ms": int((time.monotonic() - started) * 1000),
        })

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_get("/_sandbox/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "spent_usd": self.spent_usd, "calls": self.calls})
