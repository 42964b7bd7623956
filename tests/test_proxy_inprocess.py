"""The egress proxy in-process with an injected resolver: what DNS answers do to connections over time (DNS
rebinding, cached answers, several addresses, failures, slow answers), what reaches the upstream of a plain
HTTP request, and the errors on the way out. No Docker and no DNS: every server is started here on 127.0.0.1,
and the one real connection that must fail goes to 192.0.2.1 (TEST-NET-1).

The static decisions (which policy and which answer give which decision line) are the table in
test_egress_table.py; this file is about behaviour across lookups and connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent_sandbox.sidecar import proxy as proxy_module
from agent_sandbox.sidecar import resolver as resolver_module
from agent_sandbox.sidecar.proxy import EgressProxy, Resolve
from agent_sandbox.sidecar.resolver import CachingResolver, system_lookup

PUB4, PUB4B, PUB6 = "151.101.0.223", "151.101.64.223", "2a04:4e42::223"
ALLOW = ["*.example.com", "*.example.com:8443"]
"""Port 8443 is named by a rule, so a tunnel there may carry any bytes (no ClientHello needed)."""


class ScriptedDNS:
    """A resolver whose answers the test scripts: per name, a list of answers used one per lookup (the last
    one repeats); an answer is a list of addresses, an exception to raise, or an Event to wait for first."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        script = self.answers.get(host.lower().rstrip("."))  # as a real resolver reads the name
        if not script:
            raise OSError("Name or service not known")
        answer = script.pop(0) if len(script) > 1 else script[0]
        while isinstance(answer, asyncio.Event):
            await answer.wait()
            answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)


@dataclass
class Harness:
    proxy: EgressProxy
    port: int
    upstream_port: int
    lines: list[dict[str, Any]]
    connected: list[tuple[str, int]] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    outcomes: dict[int, asyncio.Future[dict[str, Any] | None]] = field(default_factory=dict)
    """Client port -> the decision line of that connection (None: none), once the proxy's handler is done."""

    def outcome(self, client_port: int) -> asyncio.Future[dict[str, Any] | None]:
        return self.outcomes.setdefault(client_port, asyncio.get_running_loop().create_future())

    async def request(self, data: bytes, then: bytes = b"") -> tuple[bytes, dict[str, Any] | None]:
        """Send `data` (and, once a tunnel is open, `then` and the end of the stream), read until the proxy closes;
        returns what the client read and the connection's decision line."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        done = self.outcome(writer.get_extra_info("sockname")[1])
        writer.write(data)
        async with asyncio.timeout(5):
            got = await reader.readuntil(b"\r\n\r\n")
            if got.startswith(b"HTTP/1.1 200 Connection established"):  # a tunnel: say something, then end
                writer.write(then)
                writer.write_eof()
            got += await reader.read()
            writer.close()
            return got, await done

    async def connect(self, target: str, payload: bytes = b"") -> tuple[int, bytes, dict[str, Any] | None]:
        got, line = await self.request(f"CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n".encode(), payload)
        return int(got.split()[1]), got.partition(b"\r\n\r\n")[2], line


@contextlib.asynccontextmanager
async def proxy_on_loopback(
    resolve: Resolve,
    *,
    allow: list[str] | None = None,
    mode: str = "enforce",
    allow_addresses: tuple[str, ...] = (),
    real_connect: bool = False,
    connect: Callable[[str, int], Awaitable[Any]] | None = None,
) -> AsyncIterator[Harness]:
    """The proxy on 127.0.0.1 with `resolve` injected, in front of an upstream that records what it receives
    and answers (an HTTP response to a request, an echo in a tunnel). Unless real_connect, every connection
    the proxy makes goes to that upstream, whatever address it checked (recorded in `connected`)."""
    lines: list[dict[str, Any]] = []
    per_task: dict[asyncio.Task[Any] | None, dict[str, Any]] = {}
    received = bytearray()

    def emit(line: dict[str, Any]) -> None:
        lines.append(line)
        per_task[asyncio.current_task()] = line

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while data := await reader.read(65536):
            received.extend(data)
            if first and data[:4] in (b"GET ", b"POST"):
                # One HTTP request per connection (the proxy sends `connection: close`): answer once it is in.
                while not _whole_request(bytes(received)):
                    if not (more := await reader.read(65536)):
                        break
                    received.extend(more)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
                break
            first = False
            writer.write(b"echo:" + data)
        writer.close()

    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = up.sockets[0].getsockname()[1]
    proxy = EgressProxy(
        "r1",
        ALLOW if allow is None else allow,
        [],
        mode,
        False,
        ["172.17.0.1"],
        ("sidecar", 8080),
        emit,
        allow_addresses=allow_addresses,
        resolve=resolve,
    )
    harness = Harness(proxy, 0, up_port, lines, received=received)

    async def to_upstream(ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        harness.connected.append((ip, port))
        if connect is not None:
            return await connect(ip, port)
        return await asyncio.open_connection("127.0.0.1", up_port)

    if not real_connect:
        proxy.connect = to_upstream

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await proxy.handle(reader, writer)
        finally:
            # The proxy emits the line in its handler's task, as the handler's last step.
            harness.outcome(writer.get_extra_info("peername")[1]).set_result(per_task.pop(asyncio.current_task(), None))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    harness.port = server.sockets[0].getsockname()[1]
    try:
        yield harness
    finally:
        server.close()
        up.close()


def _whole_request(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


# --- DNS rebinding -------------------------------------------------------------------------------------------


def test_each_connection_is_checked_against_its_own_lookup_and_goes_to_that_address() -> None:
    """A rebinding name server answers a public address first and a private one after: the first connection
    goes to the public address it was checked with, the next is refused, and each connection looks the name
    up exactly once (no second lookup between the check and the connect)."""
    dns = ScriptedDNS({"rebind.example.com": [[PUB4], ["10.0.0.9"], ["127.0.0.1"]]})

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            status, echoed, line = await h.connect("rebind.example.com:8443", b"ping")
            assert status == 200 and echoed == b"echo:ping"
            assert line is not None and line["decision"] == "allow" and line["resolved"] == PUB4
            assert h.connected == [(PUB4, 8443)] and dns.asked == ["rebind.example.com"]
            for address, kind in (("10.0.0.9", "a private"), ("127.0.0.1", "a loopback")):
                status, _, line = await h.connect("rebind.example.com:8443", b"ping")
                assert status == 403 and line is not None and line["decision"] == "deny"
                assert line["reason"] == f"rebind.example.com resolves to {address}, {kind} address"
                assert line["resolved"] == address and line["bytes_up"] == line["bytes_down"] == 0
            assert h.connected == [(PUB4, 8443)] and dns.asked == ["rebind.example.com"] * 3
            assert h.received == b"ping"

    asyncio.run(main())


def test_a_cached_answer_is_checked_again_and_a_rebound_one_after_expiry_is_refused() -> None:
    """The real CachingResolver in front of a scripted lookup, on a fake clock: a burst of connections makes one
    lookup; after the answer expires the name is looked up again, and its new (private) address is refused."""
    now = [1000.0]
    gate = asyncio.Event()
    lookup = ScriptedDNS({"cached.example.com": [gate, [PUB4], ["10.0.0.9"]]})
    resolve = CachingResolver(lookup, ttl=30, clock=lambda: now[0])

    async def main() -> None:
        async with proxy_on_loopback(resolve) as h:
            burst = [asyncio.create_task(h.connect("cached.example.com:8443", b"x")) for _ in range(8)]
            while not lookup.asked:
                await asyncio.sleep(0)
            gate.set()
            results = await asyncio.gather(*burst)
            assert [s for s, _, _ in results] == [200] * 8 and lookup.asked == ["cached.example.com"]
            now[0] += 29
            assert (await h.connect("cached.example.com:8443", b"x"))[0] == 200
            assert lookup.asked == ["cached.example.com"]
            now[0] += 2
            status, _, line = await h.connect("CACHED.example.com.:8443", b"x")
            assert status == 403 and line is not None
            assert line["reason"] == "cached.example.com. resolves to 10.0.0.9, a private address"
            assert len(lookup.asked) == 2 and len(h.connected) == 9

    asyncio.run(main())


# --- several addresses, failures, slow answers -------------------------------------------------------------------


def test_of_several_addresses_the_first_ipv4_one_is_used() -> None:
    dns = ScriptedDNS({"multi.example.com": [[PUB6, PUB4B, PUB4, PUB4B]]})

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            status, _, line = await h.connect("multi.example.com:8443", b"x")
            assert status == 200 and line is not None and line["resolved"] == PUB4B
            assert h.connected == [(PUB4B, 8443)]

    asyncio.run(main())


def test_an_unreachable_first_address_is_an_error_and_no_other_is_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real connect, to 192.0.2.1 (TEST-NET-1, never routed): the connection fails with 502 and an error
    line; the proxy does not go on to the next address (each would need its own check anyway)."""
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT", 0.3)
    dns = ScriptedDNS({"down.example.com": [["192.0.2.1", "192.0.2.2"]]})

    async def main() -> None:
        async with proxy_on_loopback(dns, allow_addresses=("192.0.2.0/24",), real_connect=True) as h:
            status, _, line = await h.connect("down.example.com:8443")
            assert status == 502 and line is not None and line["decision"] == "error"
            assert line["reason"].startswith("cannot connect to down.example.com:8443 (192.0.2.1): ")
            assert line["reason"] != "cannot connect to down.example.com:8443 (192.0.2.1): "
            assert line["decision_detail"] == (
                "192.0.2.1 (private address) let through by allow_addresses entry "
                "'192.0.2.0/24'; 192.0.2.2 (private address) let through by "
                "allow_addresses entry '192.0.2.0/24'; upstream unreachable"
            )

    asyncio.run(main())


def test_a_closed_port_is_an_error_not_a_refusal() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    dns = ScriptedDNS({"local.example.com": [["127.0.0.1"]]})

    async def main() -> None:
        async with proxy_on_loopback(
            dns, allow=[f"local.example.com:{closed}"], allow_addresses=("127.0.0.1",), real_connect=True
        ) as h:
            status, body, line = await h.connect(f"local.example.com:{closed}")
            assert status == 502 and b"cannot connect to" in body
            assert line is not None and line["decision"] == "error" and line["resolved"] == "127.0.0.1"

    asyncio.run(main())


@pytest.mark.parametrize(
    "failure",
    [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        ConnectionRefusedError("the name server refused"),
        TimeoutError(),
    ],
)
def test_a_failed_lookup_is_a_502_error(failure: BaseException) -> None:
    dns = ScriptedDNS({"flaky.example.com": [failure]})

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            status, body, line = await h.connect("flaky.example.com:443")
            assert status == 502 and body.endswith(b"sandbox egress proxy: cannot resolve flaky.example.com\n")
            assert line is not None and (line["decision"], line["reason"], line["decision_detail"]) == (
                "error",
                "cannot resolve flaky.example.com",
                "unresolvable",
            )
            assert h.connected == []

    asyncio.run(main())


def test_a_lookup_slower_than_the_connect_timeout_is_unresolvable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT", 0.05)
    dns = ScriptedDNS({"slow.example.com": [asyncio.Event(), [PUB4]]})  # never set: the answer never comes

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            status, _, line = await h.connect("slow.example.com:443")
            assert status == 502 and line is not None
            assert (line["decision"], line["decision_detail"]) == ("error", "unresolvable")

    asyncio.run(main())


def test_a_slow_lookup_holds_only_its_own_connection() -> None:
    gate = asyncio.Event()
    dns = ScriptedDNS({"slow.example.com": [gate, [PUB4]], "fast.example.com": [[PUB4B]]})

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            slow = asyncio.create_task(h.connect("slow.example.com:8443", b"s"))
            while "slow.example.com" not in dns.asked:
                await asyncio.sleep(0)
            status, _, line = await h.connect("fast.example.com:8443", b"f")
            assert status == 200 and not slow.done()
            gate.set()
            status, echoed, line = await slow
            assert status == 200 and echoed == b"echo:s" and line is not None and line["resolved"] == PUB4

    asyncio.run(main())


def test_a_name_python_cannot_encode_is_unresolvable_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """socket.getaddrinfo IDNA-encodes a name before any query; an empty or over-63-character label raises
    UnicodeError there, which once escaped the proxy's handler (no response, a line without a reason). The
    system lookup is used for real, with the loop's getaddrinfo replaced by that same encoding step so that no
    query can leave this machine."""

    async def getaddrinfo(host: str, port: int, **kwargs: Any) -> list[Any]:
        host.encode("idna")
        raise AssertionError(f"{host!r} encodes: this test never looks a name up")

    async def main() -> None:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        for name in ("a" * 64 + ".example.com", "a..example.com"):
            with pytest.raises(OSError, match="not a host name"):
                await system_lookup(name, 443)
        async with proxy_on_loopback(CachingResolver(resolver_module.system_lookup)) as h:
            # The proxy refuses such a name before it reaches the resolver at all (the lookup above is the
            # second line of defence).
            status, _, line = await h.connect("a" * 64 + ".example.com:443")
            assert status == 403 and line is not None
            assert line["decision"] == "deny" and line["reason"].startswith("not a valid host name")

    asyncio.run(main())


def test_the_system_lookup_of_an_address_is_that_address() -> None:
    # A numeric host is parsed, never looked up: no DNS traffic.
    assert set(asyncio.run(system_lookup("127.0.0.1", 443))) == {"127.0.0.1"}


# --- timeouts and refusals name themselves --------------------------------------------------------------------


def test_a_client_that_sends_nothing_gets_a_400_naming_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "HEAD_TIMEOUT", 0.05)

    async def main() -> None:
        async with proxy_on_loopback(ScriptedDNS({})) as h:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            async with asyncio.timeout(5):
                got = await reader.read()
                assert await h.outcome(writer.get_extra_info("sockname")[1]) is None  # no request, no line
            writer.close()
            assert got.startswith(b"HTTP/1.1 400 ")
            assert got.endswith(b"sandbox egress proxy: bad request: timeout reading the request\n")

    asyncio.run(main())


def test_an_upstream_that_never_answers_the_connect_is_a_timeout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "CONNECT_TIMEOUT", 0.05)

    async def never(ip: str, port: int) -> Any:
        await asyncio.Event().wait()

    async def main() -> None:
        async with proxy_on_loopback(ScriptedDNS({"hang.example.com": [[PUB4]]}), connect=never) as h:
            status, _, line = await h.connect("hang.example.com:8443")
            assert status == 502 and line is not None
            assert line["reason"] == f"cannot connect to hang.example.com:8443 ({PUB4}): timeout"
            assert (line["decision"], line["decision_detail"]) == ("error", "upstream unreachable")

    asyncio.run(main())


def test_refusals_carry_the_decision_in_headers() -> None:
    dns = ScriptedDNS({"private.example.com": [["10.0.0.9"]]})

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            got, _ = await h.request(b"GET http://private.example.com/ HTTP/1.1\r\nhost: private.example.com\r\n\r\n")
            head = got.partition(b"\r\n\r\n")[0].decode().lower()
            assert head.startswith("http/1.1 403 ") and "x-sandbox-egress: denied" in head
            assert "x-sandbox-egress-reason: private.example.com resolves to 10.0.0.9, a private address" in head
            got, _ = await h.request(b"GET http://nowhere.example.com/ HTTP/1.1\r\nhost: nowhere.example.com\r\n\r\n")
            head = got.partition(b"\r\n\r\n")[0].decode().lower()
            assert head.startswith("http/1.1 502 ") and "x-sandbox-egress: error" in head

    asyncio.run(main())


# --- what goes through ---------------------------------------------------------------------------------------------


def test_a_plain_http_request_reaches_the_upstream_without_the_proxy_headers() -> None:
    """Absolute-form becomes origin-form, the proxy's own headers and the hop-by-hop ones stay behind, the
    upstream is told to close, the body goes through, and both directions are counted."""
    dns = ScriptedDNS({"api.example.com": [[PUB4]]})
    body = b'{"k": "v"}'
    request = (
        b"POST http://api.example.com/upload?x=1 HTTP/1.1\r\nhost: api.example.com\r\n"
        b"proxy-authorization: Basic c2VjcmV0\r\nproxy-connection: keep-alive\r\nconnection: keep-alive\r\n"
        b"keep-alive: timeout=5\r\nx-custom: kept\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            got, line = await h.request(request)
            assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"hello")
            sent = bytes(h.received)
            head, _, forwarded_body = sent.partition(b"\r\n\r\n")
            lines = head.decode().lower().split("\r\n")
            assert lines[0] == "post /upload?x=1 http/1.1" and forwarded_body == body
            names = [x.split(":")[0] for x in lines[1:]]
            assert "proxy-authorization" not in names and "proxy-connection" not in names
            assert "keep-alive" not in names and "connection: close" in lines
            assert "host: api.example.com" in lines and "x-custom: kept" in lines
            assert line is not None and line["method"] == "POST" and line["decision"] == "allow"
            assert line["bytes_up"] == len(sent) and line["bytes_down"] == len(got)
            assert h.connected == [(PUB4, 80)]

    asyncio.run(main())


def test_an_http_1_0_request_without_a_host_header_gets_one() -> None:
    dns = ScriptedDNS({"old.example.com": [[PUB4]]})

    async def main() -> None:
        async with proxy_on_loopback(dns, allow=["old.example.com", "old.example.com:8080"]) as h:
            for target in ("old.example.com", "old.example.com:8080"):
                h.received.clear()
                got, _ = await h.request(f"GET http://{target}/ HTTP/1.0\r\n\r\n".encode())
                assert got.startswith(b"HTTP/1.1 200")
                assert f"\r\nhost: {target}\r\n" in bytes(h.received).decode().lower()

    asyncio.run(main())


def test_a_tunnel_counts_the_bytes_each_way() -> None:
    dns = ScriptedDNS({"tunnel.example.com": [[PUB4]]})

    async def main() -> None:
        async with proxy_on_loopback(dns) as h:
            status, echoed, line = await h.connect("tunnel.example.com:8443", b"x" * 1000)
            assert status == 200 and echoed.replace(b"echo:", b"") == b"x" * 1000
            assert line is not None and (line["bytes_up"], line["bytes_down"]) == (1000, len(echoed))
            assert line["duration_ms"] >= 0

    asyncio.run(main())
