"""The model gateway: the agent's ANTHROPIC_BASE_URL.

It replaces whatever key the agent sends with the real one (which only the sidecar holds), streams the
upstream's response through as it arrives, meters usage from the response itself, and keeps the run's
budget a hard cap. It answers 403, not 429, because clients retry a 429.

What it forwards, and how (docs/limits.md has the full rules):

- **Only what it meters.** An explicit list of methods and paths (`ROUTES`); a raw path that is not already
  in normal form (dot segments, percent-encoding, repeated or back slashes) is refused, never rewritten, and
  upstream redirects are never followed (the key must not reach another origin).
- **Model-side egress follows the policy.** Server-side tools (web search, web fetch, code execution, the
  MCP connector) are refused unless the policy's `agent.server_tools` names them; web search and web fetch
  are restricted to the egress allowlist's domains, MCP server and URL-sourced images and documents to hosts
  the allowlist allows.
- **The budget is a hard cap.** Each call reserves its worst case before it is forwarded and settles to its
  metered cost when it ends; a stream is cut off once actual spend crosses the cap, and a call whose client
  goes away is still metered from what was streamed.
- **No supervisor, no model.** Once the run's watchdog trips (watchdog.py: the supervisor's heartbeat
  stopped, or the run's deadline passed), every call is refused with 403 and streams in flight are cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from agent_sandbox.sidecar.egress import Rule, decide, is_ip, parse_rule
from agent_sandbox.sidecar.events import ModelCall, ModelCallFailed, ModelCallRefused, to_line
from agent_sandbox.sidecar.pricing import Price, cost_usd, worst_case_usd
from agent_sandbox.sidecar.watchdog import REASONS, Watchdog

# Headers we pass upstream. Everything else from the agent (its placeholder key above all) stays behind.
FORWARD_REQUEST_HEADERS = (
    "anthropic-version",
    "anthropic-beta",
    "content-type",
    "accept",
    "user-agent",
    "x-app",
    "anthropic-dangerous-direct-browser-access",
)
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
}

Emit = Callable[[dict[str, Any]], None]

# --- what is forwarded --------------------------------------------------------------------------------------

ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/v1/messages"): "messages",
    ("POST", "/v1/messages/count_tokens"): "count_tokens",
    ("GET", "/v1/models"): "models",
}
"""(method, path) -> kind. Plus GET /v1/models/{id} (kind `model`). Nothing else reaches the upstream."""
_MODEL_PATH = re.compile(r"/v1/models/[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
# A raw path in normal form: segments of safe characters, none empty, none starting with a dot (so no `.` or
# `..`), and no percent-encoding, backslash, semicolon or repeated slash anywhere.
_NORMAL_PATH = re.compile(r"(?:/[A-Za-z0-9_@:~-][A-Za-z0-9._@:~-]*)+")
_ID = r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}"
QUERY_PARAMS: dict[str, dict[str, str]] = {
    "messages": {"beta": "true"},
    "count_tokens": {"beta": "true"},
    "models": {"beta": "true", "limit": r"\d{1,4}", "after_id": _ID, "before_id": _ID},
    "model": {"beta": "true"},
}
"""Query parameters each kind may carry (Claude Code sends `?beta=true`), with the values they may take."""

# --- the budget -----------------------------------------------------------------------------------------------

INPUT_OVERHEAD_TOKENS = 4096
"""Added to every input estimate: what the API adds around a request (tool-use system prompt, templates)."""
IMAGE_TOKENS = 8_000
"""Added per image block: an image costs at most a few thousand tokens, whatever its size in bytes."""
DOCUMENT_TOKENS = 300_000
"""Added per PDF (or URL) document block: up to 100 pages at up to 3,000 tokens a page."""
DEFAULT_MAX_TOKENS = 128_000
"""The output reserved for a request that names no usable max_tokens (the upstream will refuse it anyway)."""
SERVER_TOOL_ROUNDS = 10
"""Web searches reserved for a request offering web search without a max_uses."""


def estimate_input_tokens(raw: bytes, body: dict[str, Any]) -> int:
    """A conservative upper bound of a request's input tokens: one token per byte of the request body (a
    token is at least one byte of text, and JSON only adds bytes), plus a fixed overhead, plus a fixed
    amount per image and document block (their tokens do not follow their size)."""
    images = documents = 0
    for block in _content_blocks(body):
        if block.get("type") == "image":
            images += 1
        elif block.get("type") == "document":
            source = _obj(block.get("source"))
            if source.get("type") in ("base64", "url", "file") and source.get("media_type", "") != "text/plain":
                documents += 1
    return len(raw) + INPUT_OVERHEAD_TOKENS + images * IMAGE_TOKENS + documents * DOCUMENT_TOKENS


def _content_blocks(body: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Every content block of the request, however deeply nested: the system prompt's, the messages', and
    any block inside another (tool results, a document whose source is itself content, ...). Every object
    with a `type` under `system` and `messages` counts: a block the API would read is never skipped for
    sitting somewhere this code did not expect."""
    stack: list[Any] = [body.get("system"), body.get("messages")]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if isinstance(node.get("type"), str):
                yield node
            stack.extend(v for v in node.values() if isinstance(v, (list, dict)))


# --- server tools -----------------------------------------------------------------------------------------------

SERVER_TOOLS = ("web_search", "web_fetch", "code_execution", "mcp")
"""The server-side tools a policy can allow (`agent.server_tools`)."""
_SERVER_TOOL_TYPES = (
    ("web_search_", "web_search"),
    ("web_fetch_", "web_fetch"),
    ("code_execution_", "code_execution"),
    ("mcp_toolset", "mcp"),
)
# Tool types that run on the client (Claude Code executes them in the sandbox), or on the server without any
# network access (tool search looks through the request's own tool definitions).
_LOCAL_TOOL_TYPES = ("custom", "bash_", "text_editor_", "computer_", "memory_", "tool_search_tool_")
_DOMAIN = re.compile(r"(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


class Refusal(Exception):
    """A request the gateway will not forward."""

    def __init__(
        self, reason: str, message: str, status: int = 403, error_type: str = "permission_error", **details: Any
    ) -> None:
        super().__init__(message)
        self.reason, self.message, self.status, self.error_type, self.details = (
            reason,
            message,
            status,
            error_type,
            details,
        )


class ModelSidePolicy:
    """Which server-side tools a request may use, and where the model API may fetch on the agent's behalf."""

    def __init__(self, server_tools: Iterable[str], allow: Iterable[str], deny: Iterable[str]) -> None:
        self.server_tools = set(server_tools)
        self.allow: list[Rule] = [parse_rule(r) for r in allow]
        self.deny: list[Rule] = [parse_rule(r) for r in deny]
        domains: list[str] = []
        for rule in self.allow:
            if is_ip(rule.host) or not {80, 443} & set(rule.ports):
                continue
            if decide(rule.host, 443, [], self.deny)[1] or decide(rule.host, 80, [], self.deny)[1]:
                continue  # a deny rule names this very host
            domains.append(rule.host)
        self.domains = list(dict.fromkeys(domains))
        """The allowlist as API domains (the API's domain lists include subdomains)."""

    def _within(self, domain: str) -> bool:
        return any(domain == d or domain.endswith("." + d) for d in self.domains)

    def _url_allowed(self, url: Any) -> bool:
        if not isinstance(url, str):
            return False
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            return False
        return decide(parts.hostname, port, self.allow, self.deny)[0]

    def apply(self, body: dict[str, Any]) -> bool:
        """Check a Messages request and restrict its server tools in place; True when it was changed.
        Raise Refusal for what the policy does not allow."""
        changed = False
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise Refusal("request", "sandbox gateway: `tools` must be a list", 400, "invalid_request_error")
        for tool in tools or []:
            if not isinstance(tool, dict):
                continue
            kind = self._kind(tool)
            if kind is None:
                continue
            if kind not in self.server_tools:
                raise Refusal(
                    "server_tool",
                    f"sandbox gateway: the server-side tool {tool.get('type')!r} "
                    f"({kind}) is not allowed by the run's policy (agent.server_tools)",
                    detail=str(tool.get("type"))[:100],
                )
            if kind in ("web_search", "web_fetch"):
                changed |= self._restrict_domains(tool, kind)
        servers = body.get("mcp_servers")
        if servers:
            if "mcp" not in self.server_tools:
                raise Refusal(
                    "server_tool",
                    "sandbox gateway: the MCP connector (mcp_servers) is not allowed "
                    "by the run's policy (agent.server_tools)",
                    detail="mcp_servers",
                )
            for server in servers if isinstance(servers, list) else [servers]:
                url = server.get("url") if isinstance(server, dict) else None
                if not self._url_allowed(url):
                    raise Refusal(
                        "server_tool",
                        f"sandbox gateway: the MCP server URL {str(url)[:200]!r} is "
                        "not allowed by the run's egress allowlist",
                        detail="mcp_servers",
                    )
        if body.get("container") is not None and "code_execution" not in self.server_tools:
            raise Refusal(
                "server_tool",
                "sandbox gateway: a code execution container is not allowed by the run's policy (agent.server_tools)",
                detail="container",
            )
        for block in _content_blocks(body):
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "url" and not self._url_allowed(source.get("url")):
                raise Refusal(
                    "url_source",
                    f"sandbox gateway: the model API would fetch "
                    f"{str(source.get('url'))[:200]!r}, which the run's egress allowlist does not allow",
                    detail=str(source.get("url"))[:300],
                )
        return changed

    @staticmethod
    def _kind(tool: dict[str, Any]) -> str | None:
        """The server tool a tool definition names, or None for a client-side one. Unknown types are refused:
        a new server-side tool must be classified here before a request can use it."""
        t = tool.get("type")
        if t is None or not isinstance(t, str) or t.startswith(_LOCAL_TOOL_TYPES):
            return None
        for prefix, kind in _SERVER_TOOL_TYPES:
            if t.startswith(prefix):
                return kind
        raise Refusal(
            "server_tool",
            f"sandbox gateway: unknown tool type {t[:100]!r}: only client-side tools and "
            "the server-side tools a policy can allow are forwarded",
            detail=t[:100],
        )

    def _restrict_domains(self, tool: dict[str, Any], kind: str) -> bool:
        if not self.domains:
            raise Refusal(
                "server_tool",
                f"sandbox gateway: {kind} is allowed, but the egress allowlist names no domain it could reach",
                detail=kind,
            )
        asked = tool.get("allowed_domains")
        if asked:
            if not isinstance(asked, list):
                raise Refusal("server_tool", f"sandbox gateway: {kind}.allowed_domains must be a list", detail=kind)
            outside = [
                d
                for d in asked
                if not (
                    isinstance(d, str)
                    and _DOMAIN.fullmatch(d.lower().rstrip("."))
                    and self._within(d.lower().rstrip("."))
                )
            ]
            if outside:
                raise Refusal(
                    "server_tool",
                    f"sandbox gateway: {kind} asks for domains outside the egress "
                    f"allowlist: {', '.join(map(str, outside))[:300]}",
                    detail=kind,
                )
            return False
        blocked = [str(d).lower().rstrip(".") for d in tool.pop("blocked_domains", None) or []]
        domains = [d for d in self.domains if not any(d == b or d.endswith("." + b) for b in blocked)]
        if not domains:
            raise Refusal(
                "server_tool", f"sandbox gateway: no domain of the egress allowlist is left for {kind}", detail=kind
            )
        tool["allowed_domains"] = domains
        return True


# --- metering -------------------------------------------------------------------------------------------------


class UsageMeter:
    """Reads usage from a Messages response, streamed (SSE) or whole (JSON)."""

    def __init__(self) -> None:
        self.model = ""
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read = 0
        self.cache_write = 0
        self.cache_write_1h = 0
        self.web_searches = 0
        self.started = False  # message_start (or a whole JSON message) seen: the input usage is known
        self.final = False  # the final usage seen (message_delta, or a whole JSON message)
        self.streamed_bytes = 0  # bytes of generated content streamed so far (text, thinking, tool input)
        self.stop_reason: str | None = None
        self.tool_uses: list[dict[str, str]] = []  # the tool calls the model asked for: id, name
        self._buf = b""

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        # Stream events repeat counts cumulatively, so the largest seen is the total.
        self.input_tokens = max(self.input_tokens, _int(usage.get("input_tokens")))
        self.output_tokens = max(self.output_tokens, _int(usage.get("output_tokens")))
        self.cache_read = max(self.cache_read, _int(usage.get("cache_read_input_tokens")))
        self.cache_write = max(self.cache_write, _int(usage.get("cache_creation_input_tokens")))
        creation = usage.get("cache_creation")
        if isinstance(creation, dict):
            self.cache_write_1h = max(self.cache_write_1h, _int(creation.get("ephemeral_1h_input_tokens")))
        server = usage.get("server_tool_use")
        if isinstance(server, dict):
            self.web_searches = max(self.web_searches, _int(server.get("web_search_requests")))

    def feed_sse(self, chunk: bytes) -> None:
        self._buf += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buf:
            event, self._buf = self._buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._event(line[5:].strip())
        if len(self._buf) > 16 * 1024 * 1024:  # one event that never ends: count it as generated content
            self.streamed_bytes += len(self._buf)
            self._buf = b""

    def _event(self, data: bytes) -> None:
        try:
            ev = json.loads(data)
        except ValueError:
            return
        if not isinstance(ev, dict):
            return
        kind = ev.get("type")
        if kind == "message_start":
            msg = _obj(ev.get("message"))
            self.model = str(msg.get("model") or self.model)
            self._usage(msg.get("usage"))
            self.started = True
        elif kind == "content_block_start":
            self._block(ev.get("content_block"))
        elif kind == "content_block_delta":
            delta = _obj(ev.get("delta"))
            for key in ("text", "thinking", "partial_json"):
                if isinstance(delta.get(key), str):
                    self.streamed_bytes += len(delta[key].encode())
        elif kind == "message_delta":
            self._usage(ev.get("usage"))
            delta = _obj(ev.get("delta"))
            if isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
            self.final = True

    def _block(self, block: Any) -> None:
        if isinstance(block, dict) and block.get("type") == "tool_use" and len(self.tool_uses) < 100:
            self.tool_uses.append({"id": str(block.get("id"))[:100], "name": str(block.get("name"))[:100]})

    def feed_json(self, body: bytes) -> None:
        try:
            msg = json.loads(body)
        except ValueError:
            return
        if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
            self.model = str(msg.get("model") or self.model)
            self._usage(msg.get("usage"))
            self.started = self.final = True
            if isinstance(msg.get("stop_reason"), str):
                self.stop_reason = msg["stop_reason"]
            content = msg.get("content")
            for block in content if isinstance(content, list) else []:
                self._block(block)

    def output_estimate(self, max_tokens: int) -> int:
        """Output tokens: as reported once final; before that (a stream cut off or abandoned), at least one
        token per byte streamed, at most max_tokens."""
        if self.final:
            return self.output_tokens
        return min(max_tokens, max(self.output_tokens, self.streamed_bytes))

    def cost(self, prices: dict[str, Price], max_tokens: int, fallback_model: str) -> float:
        return cost_usd(
            self.model or fallback_model,
            self.input_tokens,
            self.output_estimate(max_tokens),
            self.cache_read,
            self.cache_write,
            prices,
            cache_write_1h=self.cache_write_1h,
            web_searches=self.web_searches,
        )

    def as_dict(self, max_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_estimate(max_tokens),
            "cache_read_input_tokens": self.cache_read,
            "cache_creation_input_tokens": self.cache_write,
        }


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _obj(v: Any) -> dict[str, Any]:
    """v if it is a JSON object, else an empty one: a malformed field is read as absent, never fatal."""
    return v if isinstance(v, dict) else {}


@dataclass
class _Call:
    """One metered call in flight."""

    id: int
    model: str  # as the request names it
    max_tokens: int
    input_bound: int
    reserved_usd: float
    tools_offered: int
    started: float = field(default_factory=time.monotonic)
    meter: UsageMeter = field(default_factory=UsageMeter)
    phase: str = "sent"  # sent (no answer yet), answered (headers in), failed (no answer at all)
    status: int = 0
    stream: bool = False
    cut: str | None = None  # budget (the gateway cut the stream), client (the client went away), upstream
    booked_usd: float = 0.0  # what _settle booked
    shared: bool = False  # reserved in the shared budget too (run/budget.py)


# --- the gateway ----------------------------------------------------------------------------------------------

ADMIT_WAIT = 300.0
"""Seconds a call that does not fit beside the calls in flight waits for them to settle before it is refused."""


class Gateway:
    def __init__(
        self,
        run_id: str,
        upstream: str,
        api_key: str | None,
        budget_usd: float,
        prices: dict[str, Price],
        emit: Emit,
        extra_ca_pem: str = "",
        *,
        server_tools: Iterable[str] = (),
        egress_allow: Iterable[str] = (),
        egress_deny: Iterable[str] = (),
        broker_socket: str | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.run_id = run_id
        self.extra_ca_pem = extra_ca_pem
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key
        self.budget_usd = budget_usd
        self.prices = prices
        self.emit = emit
        self.model_side = ModelSidePolicy(server_tools, egress_allow, egress_deny)
        self.spent_usd = 0.0
        self.calls = 0
        self.reserved: dict[int, float] = {}  # call id -> its reservation, while in flight
        self.live: dict[int, float] = {}  # call id -> its cost so far, while in flight
        self._ids = itertools.count(1)
        self._settled = asyncio.Event()  # set (and replaced) whenever a call settles
        self.admit_wait = ADMIT_WAIT
        self.broker_socket = broker_socket  # a budget shared with other runs (run/budget.py), when set
        self._broker_tasks: set[asyncio.Task[Any]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.watchdog = watchdog  # once it trips, nothing is forwarded (None: never)

    async def start(self, app: web.Application) -> None:
        connector = None
        if self.extra_ca_pem:
            # The system's authorities plus the policy's (a company's TLS-inspecting proxy, say).
            ctx = ssl.create_default_context()
            ctx.load_verify_locations(cadata=self.extra_ca_pem)
            connector = aiohttp.TCPConnector(ssl=ctx)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900),
        )

    async def stop(self, app: web.Application) -> None:
        if self.session:
            await self.session.close()

    def _budget_spent(self) -> Refusal:
        return Refusal(
            "budget",
            f"sandbox: the run's model budget of ${self.budget_usd:.2f} is spent "
            f"(${self.spent_usd:.4f}); no further model calls are allowed",
        )

    def _tripped(self) -> str | None:
        return self.watchdog.tripped if self.watchdog is not None else None

    def _watchdog_refusal(self, why: str) -> Refusal:
        return Refusal(why, f"sandbox: {REASONS[why]}; no further model calls are allowed")

    @property
    def outstanding_usd(self) -> float:
        return sum(self.reserved.values())

    async def quiet(self, wait: float) -> int:
        """Wait up to `wait` seconds until no model call is in flight; returns how many still are. A call's
        line is emitted as it settles, so once this returns 0 every call begun before has its line out."""
        deadline = asyncio.get_running_loop().time() + wait
        while self.reserved:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            settled = self._settled
            try:
                await asyncio.wait_for(settled.wait(), left)
            except TimeoutError:
                break
        return len(self.reserved)

    def _refuse(self, request: web.Request, refusal: Refusal) -> web.Response:
        self.emit(
            to_line(
                ModelCallRefused(
                    reason=refusal.reason,
                    spent_usd=round(self.spent_usd, 6),
                    budget_usd=self.budget_usd,
                    method=request.method,
                    path=request.raw_path[:300],
                    **{k: v for k, v in refusal.details.items() if v is not None},
                )
            )
        )
        return web.json_response(
            {"type": "error", "error": {"type": refusal.error_type, "message": refusal.message}},
            status=refusal.status,
            headers={"x-sandbox-refused": refusal.reason},
        )

    # --- deciding ---

    @staticmethod
    def route(method: str, raw_target: str) -> str:
        """The kind of an allowed request, or Refusal. The raw target is matched as sent: one that is not
        already in normal form is refused, never normalised."""
        path, _, query = raw_target.partition("?")
        if not _NORMAL_PATH.fullmatch(path):
            raise Refusal(
                "path",
                "sandbox gateway: the request path is not in normal form (dot segments, "
                "percent-encoding, empty segments and backslashes are refused)",
                400,
                "invalid_request_error",
            )
        kind = ROUTES.get((method, path)) or ("model" if method == "GET" and _MODEL_PATH.fullmatch(path) else None)
        if kind is None:
            raise Refusal(
                "endpoint",
                f"sandbox gateway: {method} {path} is not an endpoint the sandbox forwards "
                "(only the Messages API, token counting and the model list)",
                404,
                "not_found_error",
            )
        allowed = QUERY_PARAMS[kind]
        seen: set[str] = set()
        for param in query.split("&") if query else []:
            name, eq, value = param.partition("=")
            if not eq or name in seen or name not in allowed or not re.fullmatch(allowed[name], value):
                raise Refusal(
                    "query",
                    f"sandbox gateway: query parameter {param[:100]!r} is not allowed on {path}",
                    400,
                    "invalid_request_error",
                )
            seen.add(name)
        return kind

    async def _admit(self, raw: bytes, body: dict[str, Any]) -> _Call:
        """Reserve the call's worst case, or Refusal. A call always needs spend below the cap; when other calls
        are in flight it must also fit, at its worst case, in what their reservations leave, and it waits (up
        to ADMIT_WAIT) for them to settle rather than fail: Claude Code runs subagents in parallel, and near
        the cap they take turns instead of erroring. (The one call admitted alone may cost more than is left:
        that call's cost is the most the cap can be overshot by, and its stream is cut off as soon as actual
        spend crosses the cap.)"""
        named = body.get("model")
        model = named if isinstance(named, str) else ""
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            max_tokens = DEFAULT_MAX_TOKENS
        bound = estimate_input_tokens(raw, body)
        searches = 0
        for tool in body.get("tools") or []:
            if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search_"):
                uses = tool.get("max_uses")
                searches += uses if isinstance(uses, int) and uses > 0 else SERVER_TOOL_ROUNDS
        reserve = worst_case_usd(
            model or "unknown", bound, max_tokens, self.prices, one_hour_cache=b'"1h"' in raw, web_searches=searches
        )
        deadline = time.monotonic() + self.admit_wait
        while self.reserved and self.spent_usd + self.outstanding_usd + reserve > self.budget_usd:
            left = deadline - time.monotonic()
            if left <= 0:
                outstanding = self.outstanding_usd
                raise Refusal(
                    "reservation",
                    f"sandbox: this call may cost up to ${reserve:.4f}, which does not fit "
                    f"in the run's model budget of ${self.budget_usd:.2f} beside the calls in flight "
                    f"(spent ${self.spent_usd:.4f}, ${outstanding:.4f} reserved); retry when they are done",
                    reserve_usd=round(reserve, 6),
                    outstanding_usd=round(outstanding, 6),
                )
            settled = self._settled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), left)
        if self.spent_usd >= self.budget_usd:
            raise self._budget_spent()
        if why := self._tripped():  # it tripped while this call waited for room
            raise self._watchdog_refusal(why)
        shared = False
        if self.broker_socket:
            call_id = next(self._ids)
            reply = await self._broker(
                {"op": "reserve", "id": call_id, "usd": reserve, "wait": max(0.0, deadline - time.monotonic())}
            )
            if not reply.get("ok"):
                why = reply.get("reason") or "unreachable"
                raise Refusal(
                    "budget" if why == "budget" else "reservation",
                    f"sandbox: the shared budget (${reply.get('cap_usd', 0):.2f}, "
                    f"${reply.get('spent_usd', 0):.4f} spent) "
                    + ("is spent" if why == "budget" else f"has no room for this call ({why})"),
                    reserve_usd=round(reserve, 6),
                )
            shared = True
        tools = body.get("tools")
        call = _Call(
            call_id if shared else next(self._ids),
            model,
            max_tokens,
            bound,
            reserve,
            len(tools) if isinstance(tools, list) else 0,
            shared=shared,
        )
        self.reserved[call.id] = reserve
        self.live[call.id] = 0.0
        return call

    # --- forwarding ---

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if why := self._tripped():
                raise self._watchdog_refusal(why)
            kind = self.route(request.method, request.raw_path)
            if self.spent_usd >= self.budget_usd:
                raise self._budget_spent()
            raw = await request.read()
            if why := self._tripped():  # it tripped while the body came in: nothing goes upstream after
                raise self._watchdog_refusal(why)
            body: dict[str, Any] | None = None
            if kind in ("messages", "count_tokens"):
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                if not isinstance(body, dict):
                    raise Refusal(
                        "request",
                        "sandbox gateway: the request body is not a JSON object",
                        400,
                        "invalid_request_error",
                    )
                if self.model_side.apply(body):
                    raw = json.dumps(body, separators=(",", ":")).encode()
            elif raw:
                raise Refusal(
                    "request", "sandbox gateway: this endpoint takes no request body", 400, "invalid_request_error"
                )
            call = await self._admit(raw, body) if kind == "messages" and body is not None else None
        except Refusal as refusal:
            return self._refuse(request, refusal)
        if call is None:
            return await self._forward(request, raw, None)
        try:
            return await self._forward(request, raw, call)
        finally:
            self._settle(request, call)  # whatever happened: done, cut off, client gone, cancelled

    def _headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST_HEADERS}
        headers["accept-encoding"] = "identity"  # we read usage out of the stream, so no compression
        if self.api_key:
            headers["x-api-key"] = self.api_key
        return headers

    async def _forward(self, request: web.Request, raw: bytes, call: _Call | None) -> web.StreamResponse:
        assert self.session is not None
        url = self.upstream + request.raw_path  # in normal form and on the list: see route()
        try:
            upstream = await self.session.request(
                request.method,
                url,
                data=raw if request.method == "POST" else None,
                headers=self._headers(request),
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            if call is not None:
                call.phase = "failed"
            self.emit(to_line(ModelCallFailed(path=request.path, error=str(exc)[:300])))
            return web.json_response(
                {
                    "type": "error",
                    "error": {"type": "api_error", "message": f"sandbox gateway: upstream unreachable: {exc}"},
                },
                status=502,
            )
        async with upstream:
            if 300 <= upstream.status < 400:
                # Never followed, never passed on: the Location could point anywhere, and the key must not go.
                if call is not None:
                    call.phase = "failed"
                self.emit(
                    to_line(
                        ModelCallFailed(
                            path=request.path,
                            error=f"the upstream answered {upstream.status} (a redirect), which is not followed",
                        )
                    )
                )
                return web.json_response(
                    {
                        "type": "error",
                        "error": {
                            "type": "api_error",
                            "message": f"sandbox gateway: the model API answered with a redirect "
                            f"({upstream.status}); redirects are never followed",
                        },
                    },
                    status=502,
                )
            if call is not None:
                call.phase, call.status = "answered", upstream.status
            if why := self._tripped():
                # The answer came after the supervisor was gone (or the deadline passed): not handed over.
                if call is not None:
                    call.cut = why
                upstream.close()
                return self._refuse(request, self._watchdog_refusal(why))
            resp = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if call is not None:
                call.stream = is_sse
            client = True
            try:
                await resp.prepare(request)
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                client = False
            whole = bytearray()
            try:
                # iter_any hands over whatever has arrived: nothing waits for a full buffer.
                async for chunk in upstream.content.iter_any():
                    if (why := self._tripped()) is not None:  # before this chunk is handed over
                        if call is not None:
                            call.cut = why
                        client = client and is_sse  # a cut JSON answer is no answer: the connection just ends
                        break
                    if call is not None:
                        if is_sse:
                            call.meter.feed_sse(chunk)
                            self._running(call)
                        elif len(whole) < 8 * 1024 * 1024:
                            whole.extend(chunk)
                    if client:
                        try:
                            await resp.write(chunk)
                        except (ConnectionError, aiohttp.ClientConnectionResetError):
                            client = False
                    if call is not None and not client and is_sse:
                        call.cut = "client"  # nobody reads on: stop the generation, meter what was streamed
                        break
                    if call is not None and is_sse and not call.meter.final and self._over(call):
                        call.cut = "budget"
                        break

            except aiohttp.ClientError:
                if call is not None:
                    call.cut = "upstream"
            except BaseException:  # cancelled: the generation must not go on unread
                upstream.close()
                raise
            if (call is not None and call.cut is not None) or self._tripped():
                upstream.close()  # closing the connection ends the generation upstream
            if call is not None and not is_sse:
                call.meter.feed_json(bytes(whole))
            if client:
                with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                    message = None
                    if call is not None and call.cut == "budget":
                        message = (
                            f"sandbox: the run's model budget of ${self.budget_usd:.2f} is spent; the "
                            "response was cut off"
                        )
                    elif call is not None and call.cut in REASONS:
                        message = f"sandbox: {REASONS[call.cut]}; the response was cut off"
                    if message:
                        err = {"type": "error", "error": {"type": "permission_error", "message": message}}
                        await resp.write(b"event: error\ndata: " + json.dumps(err).encode() + b"\n\n")
                    await resp.write_eof()
        return resp

    def _running(self, call: _Call) -> None:
        self.live[call.id] = call.meter.cost(self.prices, call.max_tokens, call.model or "unknown")

    def _over(self, call: _Call) -> bool:
        """Actual spend (settled, plus what the calls in flight have cost so far) has crossed the cap."""
        return self.spent_usd + sum(self.live.values()) > self.budget_usd

    def _settle(self, request: web.Request, call: _Call) -> None:
        """Release the call's reservation and book what it cost. Synchronous: it runs even in a handler that
        is being cancelled."""
        self.reserved.pop(call.id, None)
        self.live.pop(call.id, None)
        # Wake the calls waiting for room; later waiters wait on a fresh event.
        self._settled.set()
        self._settled = asyncio.Event()
        if call.shared:
            # The shared ledger hears what this call cost once _settle below has booked it (0 if it failed).
            task = asyncio.get_running_loop().create_task(self._broker_settle(call))
            self._broker_tasks.add(task)
            task.add_done_callback(self._broker_tasks.discard)
        m = call.meter
        if call.phase == "failed":
            return  # the upstream never answered: nothing was spent (model_call_failed says so)
        estimated = not m.final
        if call.phase == "sent":
            # Cancelled before the upstream answered: it may have run the call; book the worst case.
            cost, call.cut = call.reserved_usd, call.cut or "cancelled"
        elif not m.started and call.status == 200:
            # Answered but no usage came (cut before the first event): the input as estimated, the output
            # as streamed.
            m.input_tokens = call.input_bound
            cost = m.cost(self.prices, call.max_tokens, call.model or "unknown")
        else:
            cost = m.cost(self.prices, call.max_tokens, call.model or "unknown")
            estimated = estimated and m.started
        self.spent_usd += cost
        call.booked_usd = cost
        self.calls += 1
        self.emit(
            to_line(
                ModelCall(
                    call=self.calls,
                    path=request.path,
                    status=call.status,
                    stream=call.stream,
                    model=m.model or call.model or "unknown",
                    usage=m.as_dict(call.max_tokens),
                    cost_usd=round(cost, 6),
                    spent_usd=round(self.spent_usd, 6),
                    budget_usd=self.budget_usd,
                    duration_ms=int((time.monotonic() - call.started) * 1000),
                    reserved_usd=round(call.reserved_usd, 6),
                    stop_reason=m.stop_reason,
                    tool_uses=m.tool_uses,
                    tools_offered=call.tools_offered,
                    complete=not (call.cut or estimated),
                    cut=call.cut,
                )
            )
        )

    async def _broker(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request to the shared budget's ledger on the host; a broker that cannot be reached admits
        nothing (fail closed)."""
        assert self.broker_socket is not None
        try:
            reader, writer = await asyncio.open_unix_connection(self.broker_socket)
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), float(request.get("wait") or 0) + 30)
            finally:
                writer.close()
            reply = json.loads(line)
            return reply if isinstance(reply, dict) else {"ok": False, "reason": "bad reply"}
        except (OSError, ValueError, TimeoutError) as exc:
            self.emit(to_line(ModelCallFailed(path="budget-broker", error=f"shared budget: {exc}"[:300])))
            return {"ok": False, "reason": "the shared budget cannot be reached"}

    async def _broker_settle(self, call: _Call) -> None:
        await asyncio.sleep(0)  # after _settle has booked the call's cost
        await self._broker({"op": "settle", "id": call.id, "usd": call.booked_usd})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_get("/_sandbox/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "ok": True,
                "spent_usd": self.spent_usd,
                "calls": self.calls,
                "reserved_usd": self.outstanding_usd,
                "watchdog": self._tripped(),
            }
        )
