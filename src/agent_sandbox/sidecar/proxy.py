"""The egress proxy: the agent's only way to the network.

HTTP/1.1 parsing is h11's (request heads, bodies in either framing, CONNECT's switch to a raw tunnel): a
small, strict, well-kept parser with no I/O of its own, which leaves the tunnel, the timeouts and the byte
counting to plain asyncio here. Each connection is decided by the requested host name against the policy
(deny rules first), the name is resolved here, never by the agent, and the proxy connects to the very
address it checked, so a name that resolves to a private address, or re-resolves to one later (DNS
rebinding), is refused unless the policy's allow_addresses or allow_private lift it (see
egress.check_address). One JSON decision line is emitted per connection when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import h11

from ..egress import (
    NEVER_IN_REPORT_MODE,
    REASON_SEP,
    AddressEntry,
    Rule,
    address_kind,
    address_reason,
    check_address,
    decide,
    host_reason,
    parse_address_entry,
    parse_rule,
)

Emit = Callable[[dict[str, Any]], None]
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""host, port -> the addresses the name resolves to; raises OSError when it does not resolve."""
CONNECT_TIMEOUT = 10.0
HEAD_TIMEOUT = 30.0
DROP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive", b"te", b"trailer",
                b"upgrade"}


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def system_resolve(host: str, port: int) -> list[str]:
    """The sidecar's own resolver (its /etc/hosts, then Docker's DNS)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(i[4][0]) for i in infos]


def _detail(rec: dict[str, Any], text: str) -> None:
    """Add to the decision line's decision_detail (it may already say which exception let an address in)."""
    rec["decision_detail"] = f"{rec['decision_detail']}{REASON_SEP}{text}" if rec.get("decision_detail") else text


def _split_authority(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise Refused(400, f"CONNECT needs host:port, got {target!r}")
    return host.strip("[]").lower(), int(port)


class EgressProxy:
    def __init__(self, run_id: str, allow: list[str], deny: list[str], mode: str, allow_private: bool,
                 own_addresses: list[str], gateway: tuple[str, int], emit: Emit, *,
                 allow_addresses: Iterable[str] = (), resolve: Resolve | None = None) -> None:
        self.run_id = run_id
        self.allow: list[Rule] = [parse_rule(r) for r in allow]
        self.deny: list[Rule] = [parse_rule(r) for r in deny]
        self.report = mode == "report"
        self.allow_private = allow_private
        self.allow_addresses: list[AddressEntry] = [parse_address_entry(a) for a in allow_addresses]
        self.own = own_addresses
        self.gateway_name, self.gateway_port = gateway
        self.emit = emit
        self.resolve: Resolve = resolve or system_resolve

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        rec: dict[str, Any] = {"event": "egress", "client": peer[0] if peer else None, "method": None,
                               "host": None, "port": None, "resolved": None, "decision": "deny", "rule": None,
                               "reason": None, "bytes_up": 0, "bytes_down": 0}
        started = time.monotonic()
        conn = h11.Connection(h11.SERVER)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            request = await asyncio.wait_for(self._next(conn, reader), HEAD_TIMEOUT)
            if not isinstance(request, h11.Request):
                return
            rec["method"] = request.method.decode("ascii", "replace")
            host, port, is_connect = self._target(request)
            rec.update(host=host, port=port)
            ip = await self._decide(host, port, rec)
            rec["resolved"] = ip
            try:
                up_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(ip, port), CONNECT_TIMEOUT)
            except (TimeoutError, OSError) as exc:
                _detail(rec, "upstream unreachable")
                raise Refused(502, f"cannot connect to {host}:{port} ({ip}): {exc or 'timeout'}") from None
            if is_connect:
                writer.write(conn.send(h11.Response(status_code=200, headers=[], reason=b"Connection established")))
                leftover, _ = conn.trailing_data
                if leftover:
                    upstream_writer.write(leftover)
                    rec["bytes_up"] += len(leftover)
            else:
                await self._forward_request(conn, reader, request, host, port, upstream_writer, rec)
            await asyncio.gather(self._pipe(reader, upstream_writer, rec, "bytes_up", is_connect),
                                 self._pipe(up_reader, writer, rec, "bytes_down", True))
        except Refused as exc:
            rec["reason"] = rec["reason"] or exc.reason
            if exc.status != 403 and rec["decision"] not in ("deny", "would_deny"):
                # An allowed connection that failed upstream. A would_deny stays one: enforce mode would have
                # refused it, which is what report mode is there to record.
                rec["decision"] = "error"
            self._refuse(conn, writer, exc)
        except (TimeoutError, h11.RemoteProtocolError) as exc:
            rec["reason"] = f"bad request: {exc or 'timeout reading the request'}"
            self._refuse(conn, writer, Refused(400, rec["reason"]))
        except (ConnectionError, OSError) as exc:
            rec["reason"] = rec["reason"] or f"connection ended: {exc}"
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()
            rec["duration_ms"] = int((time.monotonic() - started) * 1000)
            if rec["method"] is not None:
                self.emit(rec)

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            return event

    def _target(self, request: h11.Request) -> tuple[str, int, bool]:
        target = request.target.decode("ascii", "replace")
        if request.method == b"CONNECT":
            host, port = _split_authority(target)
            return host, port, True
        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            raise Refused(400, "this is a forward proxy: send absolute http:// URLs, or CONNECT for anything else")
        return url.hostname.lower(), url.port or 80, False

    async def _decide(self, host: str, port: int, rec: dict[str, Any]) -> str:
        """The address to connect to, or Refused. Fills in the decision, rule, reason and decision_detail.

        Enforce mode refuses on the first failing step (the host rule, else every refused address at once).
        Report mode goes through every step and records every reason enforce mode would refuse for, joined
        by '; ', on a would_deny line; the connection goes ahead.
        """
        if host == self.gateway_name and port == self.gateway_port:
            # The model gateway is always reachable and lives in this very container.
            rec.update(decision="allow", rule="gateway")
            return "127.0.0.1"
        allowed, rule = decide(host, port, self.allow, self.deny)
        rec["rule"] = rule
        reasons: list[str] = []
        if not allowed:
            reason = host_reason(host, port, rule)
            if not self.report:
                rec.update(decision="deny", reason=reason)
                raise Refused(403, reason)
            reasons.append(reason)
            rec.update(decision="would_deny", reason=reason)
        try:
            found = await asyncio.wait_for(self.resolve(host, port), CONNECT_TIMEOUT)
            if not found:
                raise OSError("no addresses")
        except (TimeoutError, OSError):
            _detail(rec, "unresolvable")
            if not reasons:
                rec.update(decision="deny", reason=f"cannot resolve {host}")
            raise Refused(502, f"cannot resolve {host}") from None
        addresses = sorted(dict.fromkeys(found), key=lambda a: ":" in a)  # IPv4 first, else as resolved
        refused: list[str] = []
        for addr in addresses:
            check = check_address(addr, self.own, self.allow_private, self.allow_addresses)
            if check.blocked:
                refused.append(addr)
                reasons.append(address_reason(host, addr, check.kind or "refused address"))
            elif check.detail:
                _detail(rec, check.detail)
        if refused:
            reason = REASON_SEP.join(reasons)
            if not self.report or any(address_kind(a, self.own) in NEVER_IN_REPORT_MODE for a in refused):
                rec.update(decision="deny", reason=reason, resolved=refused[0])
                raise Refused(403, reason)
            rec.update(decision="would_deny", reason=reason)
        if rec["decision"] != "would_deny":
            rec["decision"] = "allow"
        return addresses[0]

    async def _forward_request(self, conn: h11.Connection, reader: asyncio.StreamReader, request: h11.Request,
                               host: str, port: int, up: asyncio.StreamWriter, rec: dict[str, Any]) -> None:
        url = urlsplit(request.target.decode("ascii", "replace"))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [(k, v) for k, v in request.headers if k.lower() not in DROP_HEADERS]
        if not any(k.lower() == b"host" for k, _ in headers):
            headers.append((b"host", host.encode() if port == 80 else f"{host}:{port}".encode()))
        # One request per connection keeps the relay simple: the upstream closes when its response is done.
        headers.append((b"connection", b"close"))
        client = h11.Connection(h11.CLIENT)
        data = client.send(h11.Request(method=request.method, target=path.encode(), headers=headers))
        while True:
            up.write(data)
            rec["bytes_up"] += len(data)
            event = await self._next(conn, reader)
            if isinstance(event, h11.Data):
                data = client.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                up.write(client.send(h11.EndOfMessage()))
                break
            else:
                break
        await up.drain()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, rec: dict[str, Any], key: str,
                    active: bool) -> None:
        if not active:
            return
        try:
            while data := await src.read(65536):
                dst.write(data)
                rec[key] += len(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if dst.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    dst.write_eof()

    def _refuse(self, conn: h11.Connection, writer: asyncio.StreamWriter, exc: Refused) -> None:
        body = f"sandbox egress proxy: {exc.reason}\n".encode()
        reason_header = exc.reason.encode("ascii", "replace")[:300]
        try:
            writer.write(conn.send(h11.Response(status_code=exc.status, headers=[
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"), (b"x-sandbox-egress", b"denied" if exc.status == 403 else b"error"),
                (b"x-sandbox-egress-reason", reason_header)])))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
        except (h11.LocalProtocolError, OSError, RuntimeError):
            pass
