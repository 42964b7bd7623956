"""The proxy's smuggling checks without Docker: the Host header of plain-HTTP requests, and the TLS
ClientHello's server name in CONNECT tunnels (domain fronting), with real ClientHellos made by Python's ssl
module, hand-broken ones, and a proxy on loopback in front of a recording upstream."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import struct
from collections.abc import Sequence
from typing import Any

import h11
import pytest

from agent_sandbox.sidecar.proxy import (
    TLS_ALERT_ACCESS_DENIED,
    ClientHello,
    EgressProxy,
    NotClientHello,
    host_header_reason,
    parse_client_hello,
    server_name_reason,
)


def client_hello(name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl, OpenSSL) for that server name."""
    ctx = ssl.create_default_context()
    if name is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_of(hello: bytes) -> bytes:
    """The handshake message inside a one-record first flight."""
    assert hello[0] == 0x16 and struct.unpack(">H", hello[3:5])[0] == len(hello) - 5
    return hello[5:]


def records(message: bytes, sizes: list[int]) -> bytes:
    """A handshake message framed in several TLS records of the given sizes (the rest in the last one)."""
    out, pos = b"", 0
    for n in [*sizes, len(message)]:
        chunk = message[pos : pos + n]
        if chunk:
            out += b"\x16\x03\x01" + struct.pack(">H", len(chunk)) + chunk
        pos += len(chunk)
    return out


def build_hello(extensions: list[tuple[int, bytes]], tail: bytes = b"") -> bytes:
    """A hand-built ClientHello record with these extensions."""
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    exts = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in extensions)
    body += struct.pack(">H", len(exts)) + exts + tail
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(msg, [])


def sni(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + struct.pack(">H", len(n)) + n for n in names)
    return 0, struct.pack(">H", len(entries)) + entries


# --- the ClientHello parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pypi.org", "pypi.org"),
        ("Files.PythonHosted.org.", "files.pythonhosted.org"),
        ("registry.npmjs.org", "registry.npmjs.org"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        (None, None),
        ("203.0.113.5", None),  # OpenSSL sends no SNI for an IP address, nor without a name
    ],
)
def test_real_client_hellos_parse(name: str | None, expected: str | None) -> None:
    hello = client_hello(name)
    parsed = parse_client_hello(hello)
    assert parsed == ClientHello(expected, False, len(hello))


def test_every_prefix_asks_for_more_and_trailing_bytes_are_not_read() -> None:
    hello = client_hello("pypi.org")
    for i in range(len(hello)):
        assert parse_client_hello(hello[:i]) is None
    # Application data after the ClientHello's records (a client sending early) is not part of it.
    assert parse_client_hello(hello + b"\x17\x03\x03\x00\x01x") == ClientHello("pypi.org", False, len(hello))


def test_a_client_hello_split_over_records_is_reassembled() -> None:
    msg = handshake_of(client_hello("pypi.org"))
    for sizes in ([1], [3], [4], [100, 1], [1] * 40):
        data = records(msg, sizes)
        assert parse_client_hello(data) == ClientHello("pypi.org", False, len(data))
        assert parse_client_hello(data[:-1]) is None


def test_hand_built_hellos() -> None:
    for data, name in ((build_hello([sni(b"pypi.org")]), "pypi.org"), (build_hello([]), None)):
        assert parse_client_hello(data) == ClientHello(name, False, len(data))
    ech = parse_client_hello(build_hello([(0xFE0D, b"\x00" * 8), sni(b"public.example")]))
    assert ech is not None and ech.ech is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),
        (b"\x17\x03\x03\x00\x05hello", "not a TLS handshake record"),
        (b"\x16\x02\x00\x00\x05hello", "malformed TLS record header"),
        (b"\x16\x03\x01\x00\x00", "malformed TLS record header"),
        (b"\x16\x03\x01\x40\x01" + b"\x01" * 16385, "malformed TLS record header"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "is not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "too large"),
        (build_hello([sni(b"pypi.org"), sni(b"pypi.org")]), "duplicate extension 0"),
        (build_hello([sni(b"pypi.org", b"evil.example")]), "2 host names"),
        (build_hello([sni(b"pypi.org", name_type=1)]), "other than host_name"),
        (build_hello([(0, b"\x00\x00")]), "bad vector length"),
        (build_hello([sni(b"pypi.org\x00.evil.example")]), "is not a host name"),
        (build_hello([sni(b"pyp\xc3\xaf.org")]), "not ASCII"),
        (build_hello([sni(b"pypi.org")], tail=b"\x00"), "bytes after the extensions"),
        (build_hello([(0, sni(b"pypi.org")[1] + b"\x00")]), "bytes after the server name list"),
        (build_hello([(0, b"\x00\x0c\x00\x00\x08pypi.org")]), "truncated"),
    ],
)
def test_malformed_hellos_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(NotClientHello, match=message):
        parse_client_hello(data)


def test_bytes_after_the_client_hello_inside_its_record_are_refused() -> None:
    msg = handshake_of(client_hello("pypi.org")) + b"\x01\x00\x00\x00"
    with pytest.raises(NotClientHello, match="bytes after the ClientHello"):
        parse_client_hello(records(msg, []))
    with pytest.raises(NotClientHello, match="interrupted"):
        parse_client_hello(records(handshake_of(client_hello("pypi.org")), [10])[:15] + b"\x17\x03\x03\x00\x01x")


def test_the_parser_never_fails_otherwise_on_mangled_input() -> None:
    rng = random.Random(11)
    hello = client_hello("pypi.org")
    for _ in range(3000):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data
        try:
            parsed = parse_client_hello(bytes(data))
        except NotClientHello:
            continue
        assert parsed is None or isinstance(parsed, ClientHello)


# --- the server name against the CONNECT host -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "name", "ech", "refused"),
    [
        ("pypi.org", "pypi.org", False, None),
        ("PyPI.org.", "pypi.org", False, None),
        (
            "pypi.org",
            "evil.example",
            False,
            "TLS server name 'evil.example' does not match the CONNECT host 'pypi.org' (domain fronting)",
        ),
        ("pypi.org", "sub.pypi.org", False, "does not match"),
        ("pypi.org", None, False, "names no server (SNI), but CONNECT named pypi.org"),
        ("203.0.113.5", None, False, None),
        ("2001:db8::1", None, False, None),
        ("203.0.113.5", "pypi.org", False, "does not match"),
        ("pypi.org", "pypi.org", True, "encrypted (ECH)"),
    ],
)
def test_server_name_must_match_the_connect_host(host: str, name: str | None, ech: bool, refused: str | None) -> None:
    reason = server_name_reason(host, ClientHello(name, ech, 100))
    assert (reason is None) if refused is None else (refused in (reason or "")), reason


# --- the Host header of plain-HTTP requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "headers", "refused"),
    [
        ("pypi.org", 80, [b"pypi.org"], None),
        ("pypi.org", 80, [b"PyPI.org.:80"], None),
        ("pypi.org", 80, [b"pypi.org:"], None),
        ("pypi.org", 8080, [b"pypi.org:8080"], None),
        ("2001:db8::1", 80, [b"[2001:db8::1]"], None),
        ("pypi.org", 80, [], None),
        ("pypi.org", 80, [b"evil.example"], "Host header 'evil.example' does not match the requested host pypi.org:80"),
        ("pypi.org", 8080, [b"pypi.org"], "does not match the requested host pypi.org:8080"),
        ("pypi.org", 80, [b"pypi.org:8080"], "does not match"),
        ("pypi.org", 80, [b"pypi.org:80:80"], "malformed Host header"),
        ("pypi.org", 80, [b"pypi.org:http"], "malformed Host header"),
        ("pypi.org", 80, [b"[2001:db8::1"], "malformed Host header"),
        ("pypi.org", 80, [b"user@pypi.org"], "does not match"),
    ],
)
def test_host_header_must_match_the_request(host: str, port: int, headers: list[bytes], refused: str | None) -> None:
    request = h11.Request(
        method="GET",
        target=f"http://{host}/",
        headers=[(b"host", h) for h in headers],
        http_version="1.0" if not headers else "1.1",
    )
    reason = host_header_reason(request, host, port)
    assert (reason is None) if refused is None else (refused in (reason or "")), reason


# --- the proxy on loopback, in front of a recording upstream -----------------------------------------------------


class Upstream:
    """A TCP server that records what it receives, answers HTTP requests, or speaks first."""

    def __init__(self, banner: bytes = b"") -> None:
        self.received = bytearray()
        self.connections = 0
        self.banner = banner

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.banner:
            writer.write(self.banner)
        while data := await reader.read(65536):
            self.received += data
            if self.received.startswith(b"GET ") and b"\r\n\r\n" in self.received:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                break
            if self.received.startswith(b"\x16") or self.banner:
                writer.write(b"upstream saw " + str(len(self.received)).encode())
        writer.close()


async def through_proxy(
    request: bytes,
    then: Sequence[bytes] = (),
    *,
    upstream: Upstream | None = None,
    allow: tuple[str, ...] = ("good.example", "good.example:8443", "203.0.113.5"),
    mode: str = "enforce",
) -> tuple[bytes, Upstream, list[dict[str, Any]]]:
    """Send `request` (then each of `then`) to a proxy whose names all resolve to a local upstream; returns
    what the client read, the upstream, and the decision lines."""
    upstream = upstream or Upstream()
    up_server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    up_port = up_server.sockets[0].getsockname()[1]
    lines: list[dict[str, Any]] = []

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    proxy = EgressProxy(
        "r1",
        list(allow),
        [],
        mode,
        False,
        [],
        ("sidecar", 8080),
        lines.append,
        allow_addresses=["127.0.0.1"],
        resolve=resolve,
    )

    async def to_upstream(ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", up_port)  # whatever address was checked

    proxy.connect = to_upstream
    handled = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await proxy.handle(reader, writer)
        finally:
            handled.set()  # the decision line, if any, is emitted by then

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(request)
    for chunk in then:
        await asyncio.sleep(0.002)  # long enough for the proxy to read each piece on its own
        writer.write(chunk)
    got = b""
    try:
        async with asyncio.timeout(5):
            while data := await reader.read(65536):
                got += data
                if got.startswith(b"HTTP/1.1 200 Connection established") and b"upstream saw" in got:
                    break
    except TimeoutError:
        pass
    writer.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(handled.wait(), 5)
    server.close()
    up_server.close()
    return got, upstream, lines


def CONNECT(authority: str) -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n".encode()


def run(*args: Any, **kwargs: Any) -> tuple[bytes, Upstream, list[dict[str, Any]]]:
    return asyncio.run(through_proxy(*args, **kwargs))


def test_plain_http_with_a_matching_host_header_is_forwarded() -> None:
    got, up, (line,) = run(b"GET http://good.example/x HTTP/1.1\r\nhost: good.example\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200") and up.received.startswith(b"GET /x HTTP/1.1")
    assert line["decision"] == "allow"


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_plain_http_with_another_host_header_is_refused(mode: str) -> None:
    got, up, (line,) = run(b"GET http://good.example/x HTTP/1.1\r\nhost: evil.example\r\n\r\n", mode=mode)
    assert got.startswith(b"HTTP/1.1 403")
    assert b"Host header 'evil.example' does not match the requested host good.example:80" in got
    assert up.connections == 0 and line["decision"] == "deny" and line["host"] == "good.example"
    assert line["reason"] == "Host header 'evil.example' does not match the requested host good.example:80"


def test_plain_http_with_two_host_headers_is_refused() -> None:
    got, up, _ = run(b"GET http://good.example/ HTTP/1.1\r\nhost: good.example\r\nhost: evil.example\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400") and b"multiple Host" in got and up.connections == 0


def test_connect_with_the_right_server_name_goes_through_byte_for_byte() -> None:
    hello = client_hello("good.example")
    got, up, (line,) = run(CONNECT("good.example:443"), [hello])
    assert got.startswith(b"HTTP/1.1 200") and bytes(up.received) == hello
    assert line["decision"] == "allow" and line["bytes_up"] == len(hello)


def test_connect_with_a_hello_sent_in_pieces_or_with_the_request() -> None:
    hello = client_hello("GOOD.example.")
    connect = CONNECT("good.example:443")
    _, up, _ = run(connect, [hello[i : i + 7] for i in range(0, len(hello), 7)])
    assert bytes(up.received) == hello
    _, up, _ = run(connect + hello)
    assert bytes(up.received) == hello


@pytest.mark.parametrize("mode", ["enforce", "report"])
def test_connect_with_another_server_name_is_refused(mode: str) -> None:
    got, up, (line,) = run(CONNECT("good.example:443"), [client_hello("evil.example")], mode=mode)
    assert got == b"HTTP/1.1 200 Connection established\r\n\r\n" + TLS_ALERT_ACCESS_DENIED
    assert up.received == b"", "nothing of the ClientHello may reach the upstream"
    assert line["decision"] == "deny" and line["bytes_up"] == 0
    assert line["reason"] == (
        "TLS server name 'evil.example' does not match the CONNECT host 'good.example' (domain fronting)"
    )


def test_connect_to_port_443_that_is_not_tls_is_refused() -> None:
    got, up, (line,) = run(CONNECT("good.example:443"), [b"GET / HTTP/1.1\r\nhost: evil\r\n\r\n"])
    assert b"HTTP/1.1 403 Forbidden" in got and b"must carry TLS" in got
    assert up.received == b"" and line["decision"] == "deny"
    assert line["reason"] == "a CONNECT tunnel to port 443 must carry TLS, and the client sent something else"


def test_connect_with_a_malformed_hello_is_refused() -> None:
    hello = bytearray(client_hello("good.example"))
    hello[5] = 2  # a ServerHello, not a ClientHello
    got, up, (line,) = run(CONNECT("good.example:443"), [bytes(hello)])
    assert got.endswith(TLS_ALERT_ACCESS_DENIED) and up.received == b""
    assert line["reason"].startswith("not a well-formed TLS ClientHello")


def test_connect_to_an_ip_address_needs_no_server_name() -> None:
    hello = client_hello(None)
    _, up, (line,) = run(CONNECT("203.0.113.5:443"), [hello])
    assert bytes(up.received) == hello and line["decision"] == "allow"
    _, up, (line,) = run(CONNECT("203.0.113.5:443"), [client_hello("evil.example")])
    assert up.received == b"" and "does not match" in line["reason"]


def test_a_port_named_by_a_rule_may_carry_anything_and_the_server_may_speak_first() -> None:
    got, up, (line,) = run(
        CONNECT("good.example:8443"), [b"SSH-2.0-client\r\n"], upstream=Upstream(banner=b"SSH-2.0-server\r\n")
    )
    assert b"SSH-2.0-server" in got and bytes(up.received) == b"SSH-2.0-client\r\n"
    assert line["decision"] == "allow"
    # ...but TLS there is still checked.
    got, up, (line,) = run(CONNECT("good.example:8443"), [client_hello("evil.example")])
    assert up.received == b"" and "does not match" in line["reason"]
