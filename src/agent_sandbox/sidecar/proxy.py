"""The egress proxy: the agent's only way to the network.

HTTP/1.1 parsing is h11's (request heads, bodies in either framing, CONNECT's switch to a raw tunnel): a
small, strict, well-kept parser with no I/O of its own, which leaves the tunnel, the timeouts and the byte
counting to plain asyncio here. Each connection is decided by the requested host name against the policy
(deny rules first), the name is resolved here, never by the agent, and the proxy connects to the very
address it checked, so a name that resolves to a private address, or re-resolves to one later (DNS
rebinding), is refused unless the policy's allow_addresses or allow_private lift it (see
egress.check_address). One JSON decision line is emitted per connection when it closes.

Smuggling checks, in both modes (they are about the request's honesty, not the allowlist):
- a plain-HTTP request's Host header must name the host and port of its absolute URI (one Host header);
- what a client sends first into a CONNECT tunnel is read before any of it goes upstream. If it starts like a
  TLS record (0x16), it must be one well-formed ClientHello (parse_client_hello) whose server_name matches
  the CONNECT host (case-insensitive, trailing dot ignored; a CONNECT to an IP address may carry none), with
  no encrypted ClientHello (ECH), which would hide the real name; so SNI-based domain fronting is refused.
  Anything else is refused on ports 80 and 443, the ports a rule without a port covers; a tunnel to another
  port, which only a rule naming that port (or the gateway) allows, may carry any protocol, and the server
  may speak first there. A refusal inside a tunnel is a TLS access_denied alert (or, for a client that spoke
  something else, an HTTP 403), and a deny decision line with the reason.

Once the run's watchdog trips (watchdog.py: the supervisor's heartbeat stopped, or the run's deadline
passed), every new request is refused with 403 and every connection open is cut off (its decision line says
so in decision_detail).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import h11

from agent_sandbox.sidecar.egress import (
    NEVER_IN_REPORT_MODE,
    REASON_SEP,
    AddressEntry,
    Rule,
    address_kind,
    address_reason,
    check_address,
    decide,
    host_reason,
    host_syntax_reason,
    is_ip,
    parse_address_entry,
    parse_rule,
)
from agent_sandbox.sidecar.events import Egress, to_line
from agent_sandbox.sidecar.resolver import CachingResolver
from agent_sandbox.sidecar.watchdog import REASONS, Watchdog

Emit = Callable[[dict[str, Any]], None]
Resolve = Callable[[str, int], Awaitable[list[str]]]
"""host, port -> the addresses the name resolves to; raises OSError when it does not resolve."""
Connect = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""address, port -> a connection to it (asyncio.open_connection; tests point it at a local server)."""
RELAY_CHUNK = 256 * 1024
"""Bytes a tunnel relays per step, and the stream buffers' limit: a step costs the same Python work whatever
its size, so larger steps are what keeps a download's pace with a single core (64 KiB managed ~0.45x of a
direct download over plain HTTP)."""
CONNECT_TIMEOUT = 10.0
HEAD_TIMEOUT = 30.0
TLS_PORTS = (80, 443)
"""Ports on which a CONNECT tunnel must carry TLS: the ports a rule without a port covers."""
MAX_CLIENT_HELLO = 64 * 1024
"""A larger ClientHello is refused (real ones are a few KiB, post-quantum key shares included)."""
TLS_ALERT_ACCESS_DENIED = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])
"""A fatal TLS alert, access_denied: what a client that sent a refused ClientHello reads back."""
EXT_SERVER_NAME = 0
EXT_ECH = 0xFE0D
_HOST_NAME = re.compile(r"[a-z0-9._:-]+")  # letters, digits, dots, hyphens (and IPv6 colons)
DROP_HEADERS = {
    b"proxy-connection",
    b"proxy-authorization",
    b"connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"upgrade",
}


MAX_HOST_NAME = 253  # the longest a DNS name can be


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class NotClientHello(Exception):
    """The bytes are a TLS handshake record, or claim to be, but not one well-formed ClientHello."""


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None
    """The host_name of the server_name extension, lower-case without a trailing dot; None without one."""
    ech: bool
    """It carries an encrypted_client_hello extension (its server_name is then only the public name)."""
    size: int
    """Bytes of TLS records it took."""


class _Cursor:
    """Reads big-endian integers and length-prefixed vectors, never past the end of its data."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise NotClientHello("truncated ClientHello")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int, minimum: int = 0, maximum: int | None = None) -> bytes:
        n = self.uint(len_bytes)
        if n < minimum or (maximum is not None and n > maximum):
            raise NotClientHello(f"bad vector length {n}")
        return self.take(n)

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data` (TLS records as a client sends them first), or None when more
    bytes are needed. NotClientHello when it is not exactly one well-formed ClientHello: another record or
    handshake type, lengths that disagree, bytes after it in its records, a duplicate extension, a
    server_name extension that is not exactly one host_name, or a name that is not a host name."""
    handshake = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            return None
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != 0x16:
            raise NotClientHello("not a TLS handshake record" if pos == 0 else "ClientHello interrupted")
        if major != 3 or not 0 < length <= 2**14:
            raise NotClientHello("malformed TLS record header")
        if len(data) < pos + 5 + length:
            return None
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotClientHello(f"TLS handshake message {handshake[0]} is not a ClientHello")
            size = int.from_bytes(handshake[1:4], "big")
            if size > MAX_CLIENT_HELLO:
                raise NotClientHello(f"ClientHello of {size} bytes is too large")
            if len(handshake) > 4 + size:
                raise NotClientHello("bytes after the ClientHello in its records")
            if len(handshake) == 4 + size:
                return _client_hello_body(handshake[4:], pos)
        if pos > MAX_CLIENT_HELLO + 4096:
            raise NotClientHello("ClientHello too large")


def _client_hello_body(body: bytes, size: int) -> ClientHello:
    c = _Cursor(body)
    if c.uint(1) != 3:
        raise NotClientHello("ClientHello of an unknown protocol version")
    c.take(1 + 32)  # minor version, random
    c.vector(1, maximum=32)  # legacy_session_id
    if len(c.vector(2, minimum=2)) % 2:  # cipher_suites
        raise NotClientHello("odd cipher suite list")
    c.vector(1, minimum=1)  # legacy_compression_methods
    if c.done:
        return ClientHello(None, False, size)  # no extensions at all (old clients)
    extensions = _Cursor(c.vector(2))
    if not c.done:
        raise NotClientHello("bytes after the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    while not extensions.done:
        ext_type, ext = extensions.uint(2), extensions.vector(2)
        if ext_type in seen:
            raise NotClientHello(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == EXT_SERVER_NAME:
            server_name = _server_name(ext)
    return ClientHello(server_name, EXT_ECH in seen, size)


def _server_name(ext: bytes) -> str:
    outer = _Cursor(ext)
    names = _Cursor(outer.vector(2, minimum=1))
    if not outer.done:
        raise NotClientHello("bytes after the server name list")
    found: list[bytes] = []
    while not names.done:
        if names.uint(1) != 0:
            raise NotClientHello("server name of a type other than host_name")
        found.append(names.vector(2, minimum=1, maximum=255))
    if len(found) != 1:
        raise NotClientHello(f"{len(found)} host names in the server_name extension")
    try:
        name = found[0].decode("ascii").lower()
    except UnicodeDecodeError:
        raise NotClientHello("server name is not ASCII") from None
    if not _HOST_NAME.fullmatch(name):
        raise NotClientHello(f"server name {name!r} is not a host name")
    return name.rstrip(".")


def server_name_reason(connect_host: str, hello: ClientHello) -> str | None:
    """Why this ClientHello may not go through a tunnel to connect_host, or None."""
    want = connect_host.lower().rstrip(".")
    if hello.ech:
        return f"the TLS ClientHello for {want} is encrypted (ECH), which hides the server it is for"
    if hello.server_name is None:
        if is_ip(want):
            return None
        return f"the TLS ClientHello names no server (SNI), but CONNECT named {want}"
    if hello.server_name != want:
        return f"TLS server name {hello.server_name!r} does not match the CONNECT host {want!r} (domain fronting)"
    return None


def _split_host_header(value: str) -> tuple[str, int | None]:
    """host, port of a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`); ValueError when malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(value)
        host, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(value)
        port = rest[1:]
    else:
        host, _, port = value.partition(":")
        if ":" in port:
            raise ValueError(value)
    if not host or (port and not port.isdigit()):
        raise ValueError(value)
    return host.lower().rstrip("."), int(port) if port else None


def host_header_reason(request: h11.Request, host: str, port: int) -> str | None:
    """Why a plain-HTTP request's Host header(s) disagree with the host and port of its absolute URI."""
    values = [v.decode("ascii", "replace") for k, v in request.headers if k.lower() == b"host"]
    if len(values) > 1:
        return f"{len(values)} Host headers"
    if not values:
        return None  # HTTP/1.0 without one: the proxy adds the requested host
    try:
        h_host, h_port = _split_host_header(values[0].strip())
    except ValueError:
        return f"malformed Host header {values[0][:100]!r}"
    if h_host != host.lower().rstrip(".") or (h_port or 80) != port:
        return f"Host header {values[0][:100]!r} does not match the requested host {host}:{port}"
    return None


def _detail(rec: Egress, text: str) -> None:
    """Add to the decision line's decision_detail (it may already say which exception let an address in)."""
    rec.decision_detail = f"{rec.decision_detail}{REASON_SEP}{text}" if rec.decision_detail else text


def _split_authority(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise Refused(400, f"CONNECT needs host:port, got {target!r}")
    return host.strip("[]").lower(), int(port)


class EgressProxy:
    def __init__(
        self,
        run_id: str,
        allow: list[str],
        deny: list[str],
        mode: str,
        allow_private: bool,
        own_addresses: list[str],
        gateway: tuple[str, int],
        emit: Emit,
        *,
        allow_addresses: Iterable[str] = (),
        resolve: Resolve | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.run_id = run_id
        self.allow: list[Rule] = [parse_rule(r) for r in allow]
        self.deny: list[Rule] = [parse_rule(r) for r in deny]
        self.report = mode == "report"
        self.allow_private = allow_private
        self.allow_addresses: list[AddressEntry] = [parse_address_entry(a) for a in allow_addresses]
        self.own = own_addresses
        self.gateway_name, self.gateway_port = gateway
        self.emit = emit
        self.resolve: Resolve = resolve or CachingResolver()
        self.connect: Connect = functools.partial(asyncio.open_connection, limit=RELAY_CHUNK)
        self.watchdog = watchdog  # once it trips, no connection is made and those open are cut (None: never)
        self._open: dict[asyncio.Task[Any], Egress] = {}  # handler -> its decision line, while open
        if watchdog is not None:
            watchdog.on_trip(self._cut_all)

    def _cut_all(self, why: str) -> None:
        """The watchdog tripped: end every connection's handler (each still emits its decision line)."""
        for task, rec in list(self._open.items()):
            _detail(rec, f"cut off: {why} ({REASONS[why]})")
            task.cancel()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        # The connection's decision line, filled in as the connection goes and emitted once when it closes.
        rec = Egress(
            client=peer[0] if peer else None,
            method=None,
            host=None,
            port=None,
            resolved=None,
            decision="deny",
            rule=None,
            reason=None,
            bytes_up=0,
            bytes_down=0,
        )
        started = time.monotonic()
        conn = h11.Connection(h11.SERVER)
        upstream_writer: asyncio.StreamWriter | None = None
        cut = False
        task = asyncio.current_task()
        if task is not None:
            self._open[task] = rec
        try:
            request = await asyncio.wait_for(self._next(conn, reader), HEAD_TIMEOUT)
            if not isinstance(request, h11.Request):
                return
            rec.method = request.method.decode("ascii", "replace")
            host, port, is_connect = self._target(request)
            if len(host) > MAX_HOST_NAME:
                # No DNS name is longer; a longer one is only a way to make every decision line huge.
                too_long = f"a host name longer than {MAX_HOST_NAME} characters"
                rec.set(host=host[:MAX_HOST_NAME] + "…", port=port, decision="deny", reason=too_long)
                raise Refused(403, too_long)
            rec.set(host=host, port=port)
            if bad := host_syntax_reason(host):
                rec.set(decision="deny", reason=bad)
                raise Refused(403, bad)
            if self.watchdog is not None and (why := self.watchdog.tripped):
                tripped = f"{why}: {REASONS[why]}"
                rec.set(decision="deny", reason=tripped)
                raise Refused(403, tripped)
            if not is_connect and (smuggled := host_header_reason(request, host, port)):
                rec.set(decision="deny", reason=smuggled)
                raise Refused(403, smuggled)
            ip = await self._decide(host, port, rec)
            rec.resolved = ip
            try:
                up_reader, up_writer = await asyncio.wait_for(self.connect(ip, port), CONNECT_TIMEOUT)
            except (TimeoutError, OSError) as exc:
                _detail(rec, "upstream unreachable")
                # str(): an exception is always true, and a bare TimeoutError reads as ''.
                raise Refused(502, f"cannot connect to {host}:{port} ({ip}): {str(exc) or 'timeout'}") from None
            upstream_writer = up_writer  # for the clean-up in `finally`
            if is_connect:
                writer.write(conn.send(h11.Response(status_code=200, headers=[], reason=b"Connection established")))
                leftover, _ = conn.trailing_data
                # The server may speak first (off ports 80 and 443); the client's first bytes are checked
                # before any of them goes upstream.
                down = asyncio.ensure_future(self._pipe(up_reader, writer, rec, "bytes_down", True))
                try:
                    first = await self._tunnel_start(reader, bytes(leftover), writer, host, port, rec)
                except BaseException:
                    down.cancel()
                    raise
                if first:
                    up_writer.write(first)
                    rec.bytes_up += len(first)
                await asyncio.gather(self._pipe(reader, up_writer, rec, "bytes_up", True), down)
            else:
                await self._forward_request(conn, reader, request, host, port, up_writer, rec)
                await asyncio.gather(self._pipe(up_reader, writer, rec, "bytes_down", True))
        except Refused as exc:
            rec.reason = rec.reason or exc.reason
            if exc.status != 403 and rec.decision not in ("deny", "would_deny"):
                # An allowed connection that failed upstream. A would_deny stays one: enforce mode would have
                # refused it, which is what report mode is there to record.
                rec.decision = "error"
            self._refuse(conn, writer, exc)
        except (TimeoutError, h11.RemoteProtocolError) as exc:
            rec.reason = f"bad request: {str(exc) or 'timeout reading the request'}"
            self._refuse(conn, writer, Refused(400, rec.reason))
        except (ConnectionError, OSError) as exc:
            rec.reason = rec.reason or f"connection ended: {exc}"
        except asyncio.CancelledError:
            cut = True  # by the watchdog (_cut_all), or the loop's shutdown: this handler's task ends here
        finally:
            if task is not None:
                self._open.pop(task, None)
            for w in (writer, upstream_writer):
                if w is None:
                    continue
                if cut:
                    w.transport.abort()  # at once, whatever is still buffered for a peer that does not read
                else:
                    w.close()
            rec.duration_ms = int((time.monotonic() - started) * 1000)
            if rec.method is not None:
                self.emit(to_line(rec))

    async def _tunnel_start(
        self,
        reader: asyncio.StreamReader,
        first: bytes,
        writer: asyncio.StreamWriter,
        host: str,
        port: int,
        rec: Egress,
    ) -> bytes:
        """Read and check what the client sends first into a tunnel (see the module's docstring); returns the
        bytes to send upstream, or writes the refusal to the client and raises Refused."""
        data = first
        try:
            if not data:
                # Off ports 80 and 443 the server may speak first: no deadline for the client there.
                read = reader.read(65536)
                data = await (asyncio.wait_for(read, HEAD_TIMEOUT) if port in TLS_PORTS else read)
            if not data:
                return b""  # the client closed without a word
            if data[0] != 0x16:
                if port not in TLS_PORTS:
                    return data
                reason = f"a CONNECT tunnel to port {port} must carry TLS, and the client sent something else"
                body = f"sandbox egress proxy: {reason}\n".encode()
                writer.write(
                    b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"x-sandbox-egress: denied\r\nconnection: close\r\ncontent-length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                raise self._tunnel_refused(rec, reason)
            async with asyncio.timeout(HEAD_TIMEOUT):
                while (hello := parse_client_hello(data)) is None:
                    more = await reader.read(65536)
                    if not more:
                        raise NotClientHello("the client closed in the middle of its ClientHello")
                    data += more
        except TimeoutError:
            raise self._tunnel_refused(rec, "no TLS ClientHello within the time allowed") from None
        except NotClientHello as exc:
            writer.write(TLS_ALERT_ACCESS_DENIED)
            raise self._tunnel_refused(rec, f"not a well-formed TLS ClientHello: {exc}") from None
        if mismatch := server_name_reason(host, hello):
            writer.write(TLS_ALERT_ACCESS_DENIED)
            raise self._tunnel_refused(rec, mismatch)
        return data

    @staticmethod
    def _tunnel_refused(rec: Egress, reason: str) -> Refused:
        rec.set(decision="deny", reason=reason)
        return Refused(403, reason)

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
        try:
            port = url.port or 80
        except ValueError:
            raise Refused(400, f"bad port in {target[:200]!r}") from None
        return url.hostname.lower(), port, False

    async def _decide(self, host: str, port: int, rec: Egress) -> str:
        """The address to connect to, or Refused. Fills in the decision, rule, reason and decision_detail.

        Enforce mode refuses on the first failing step (the host rule, else every refused address at once).
        Report mode goes through every step and records every reason enforce mode would refuse for, joined
        by '; ', on a would_deny line; the connection goes ahead.
        """
        if host == self.gateway_name and port == self.gateway_port:
            # The model gateway is always reachable and lives in this very container.
            rec.set(decision="allow", rule="gateway")
            return "127.0.0.1"
        allowed, rule = decide(host, port, self.allow, self.deny)
        rec.rule = rule
        reasons: list[str] = []
        if not allowed:
            reason = host_reason(host, port, rule)
            if not self.report:
                rec.set(decision="deny", reason=reason)
                raise Refused(403, reason)
            reasons.append(reason)
            rec.set(decision="would_deny", reason=reason)
        try:
            found = await asyncio.wait_for(self.resolve(host, port), CONNECT_TIMEOUT)
            if not found:
                raise OSError("no addresses")
        except (TimeoutError, OSError):
            _detail(rec, "unresolvable")
            if not reasons:
                # The policy allowed the name; the network failed it: an error on the way out, not a refusal.
                rec.set(decision="error", reason=f"cannot resolve {host}")
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
                rec.set(decision="deny", reason=reason, resolved=refused[0])
                raise Refused(403, reason)
            rec.set(decision="would_deny", reason=reason)
        if rec.decision != "would_deny":
            rec.decision = "allow"
        return addresses[0]

    async def _forward_request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        request: h11.Request,
        host: str,
        port: int,
        up: asyncio.StreamWriter,
        rec: Egress,
    ) -> None:
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
            rec.bytes_up += len(data)
            event = await self._next(conn, reader)
            if isinstance(event, h11.Data):
                data = client.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                up.write(client.send(h11.EndOfMessage()))
                break
            else:
                break
        await up.drain()

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        rec: Egress,
        key: Literal["bytes_up", "bytes_down"],
        active: bool,
    ) -> None:
        if not active:
            return
        try:
            while data := await src.read(RELAY_CHUNK):
                dst.write(data)
                setattr(rec, key, getattr(rec, key) + len(data))
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
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=exc.status,
                        headers=[
                            (b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                            (b"x-sandbox-egress", b"denied" if exc.status == 403 else b"error"),
                            (b"x-sandbox-egress-reason", reason_header),
                        ],
                    )
                )
            )
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
        except (h11.LocalProtocolError, OSError, RuntimeError):
            pass
