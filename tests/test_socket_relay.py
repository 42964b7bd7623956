"""The socket relay (sidecar/relay.py, the pod's end; backend/kubernetes/forward.py, the supervisor's end) that
carries a sweep's budget broker into the sidecar's pod on Kubernetes, in-process against real Unix sockets: the
two ends joined by pipes as `exec` joins them through the API server, the real broker (run/budget.py) behind.

Then the attacks: a hostile relay (what a subverted sidecar pod could send the supervisor: frames claiming huge
lengths, unknown or reused connection ids, a flood of connections, garbage, a path of its choosing) and hostile
clients in the pod (a flood, a peer that closes early, one that never reads). Each must end in the relay
stopping or the connection dropping, never in the supervisor buffering without bound, reaching another socket,
or crossing connections; and a relay that stops fails closed (its socket is gone)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.backend.kubernetes import forward
from agent_sandbox.backend.kubernetes.forward import Forwarder, RelayFailed
from agent_sandbox.run.budget import SharedBudget
from agent_sandbox.sidecar import relay as rl
from agent_sandbox.sidecar.relay import Relay, connect_unix, encode

RUN = "run-1"


class PipeStream:
    """forward.ExecStream over a pair of pipes: what `exec` gives the supervisor on a cluster."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd: int | None = write_fd
        self.lock = threading.Lock()

    def read(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.read_fd], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.read_fd, 65536) or None
        except OSError:
            return None

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.write_fd is None:
                raise OSError("closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self.write_fd, view) :]

    def close(self) -> None:
        with self.lock:
            if self.write_fd is not None:
                os.close(self.write_fd)
                self.write_fd = None

    def error(self) -> str:
        return ""


class Pair:
    """A relay listening at `path` and its forwarder to `target`, running in threads of this process."""

    def __init__(self, path: str, target: str, max_connections: int = rl.MAX_CONNECTIONS) -> None:
        to_relay = os.pipe()
        from_relay = os.pipe()
        # to_relay[1] is the stream's, which closes it; the rest are closed once nothing uses them.
        self.fds = [from_relay[0], to_relay[0], from_relay[1]]
        self.path = path
        self.relay = Relay(path, to_relay[0], from_relay[1], max_connections)
        self.relay_result: list[str] = []
        self.thread = threading.Thread(target=lambda: self.relay_result.append(self.relay.serve()), daemon=True)
        self.thread.start()
        self.stream = PipeStream(from_relay[0], to_relay[1])
        self.forwarder = Forwarder(self.stream, target, "test", max_connections)
        self.forwarder.start(5)

    def close(self) -> None:
        if not self.fds:
            return  # closed already
        self.forwarder.close()
        # The forwarder's end of the relay's output goes (as the exec's stream does): a write of the relay's
        # still blocked on it fails, and the relay ends.
        os.close(self.fds[0])
        self.thread.join(5)
        assert not self.thread.is_alive(), "the relay did not end with its forwarder"
        for fd in self.fds[1:]:
            os.close(fd)
        self.fds = []


@pytest.fixture
def budget() -> Iterator[tuple[SharedBudget, Any]]:
    ledger = SharedBudget(100.0, "sweep")
    endpoint = ledger.serve(RUN)
    yield ledger, endpoint
    endpoint.close()


@pytest.fixture
def pair(tmp_path: Path, budget: tuple[SharedBudget, Any]) -> Iterator[Pair]:
    # A long path, as a run directory's can be: the relay listens by its directory's descriptor.
    deep = tmp_path / ("d" * 60) / "pod"
    deep.mkdir(parents=True)
    p = Pair(str(deep / "broker.sock"), str(budget[1].path))
    yield p
    p.close()


def _ask(f: Any, request: dict[str, Any]) -> dict[str, Any]:
    f.write(json.dumps(request).encode() + b"\n")
    f.flush()
    line = f.readline()
    answer: dict[str, Any] = json.loads(line)
    return answer


def _ended(sock: socket.socket) -> bool:
    """The connection was ended by the other side (closed, or reset if it never got past the backlog)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- the relay carrying the broker ------------------------------------------------------------------------------


def test_the_relay_listens_for_its_owner_alone_and_goes_with_its_forwarder(pair: Pair) -> None:
    st = os.lstat(pair.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    client = connect_unix(pair.path, 5)
    pair.close()
    assert _ended(client)  # its connection ends with the relay
    assert not os.path.exists(pair.path)  # and its socket: the gateway finds nothing (fail closed)
    with pytest.raises(OSError):
        connect_unix(pair.path, 1)
    assert pair.relay_result == ["ended by the supervisor"]


def test_many_concurrent_connections_reserve_and_settle_in_the_ledger(
    pair: Pair, budget: tuple[SharedBudget, Any]
) -> None:
    ledger, _ = budget
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            with connect_unix(pair.path, 10) as sock:
                f = sock.makefile("rwb")
                assert _ask(f, {"op": "reserve", "id": i, "usd": 1.0, "wait": 5})["ok"]
                assert _ask(f, {"op": "settle", "id": i, "usd": 0.5})["ok"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(1, 41)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert ledger.spent_usd == pytest.approx(20.0)
    assert ledger._reserved == {}
    _until(lambda: pair.forwarder.open_connections == 0 and pair.relay.open_connections == 0)
    assert pair.forwarder.stats["opened"] == 40 and pair.relay.stats["opened"] == 40


def test_a_reserve_that_waits_does_not_hold_up_the_other_connections(tmp_path: Path) -> None:
    ledger = SharedBudget(1.0, "sweep")
    endpoint = ledger.serve(RUN)
    p = Pair(str(tmp_path / "b.sock"), str(endpoint.path))
    try:
        first = connect_unix(p.path, 10).makefile("rwb")
        assert _ask(first, {"op": "reserve", "id": 1, "usd": 0.8, "wait": 0})["ok"]
        got: list[dict[str, Any]] = []
        waiting = connect_unix(p.path, 10).makefile("rwb")
        t = threading.Thread(
            target=lambda: got.append(_ask(waiting, {"op": "reserve", "id": 2, "usd": 0.5, "wait": 5}))
        )
        t.start()
        time.sleep(0.3)
        assert got == []  # no room beside the call in flight: it waits, in the broker
        # Meanwhile another connection goes through the same relay, and its settle makes the room.
        other = connect_unix(p.path, 10).makefile("rwb")
        assert _ask(other, {"op": "settle", "id": 1, "usd": 0.3})["ok"]
        t.join(5)
        assert got and got[0]["ok"] and ledger.spent_usd == pytest.approx(0.3)
    finally:
        p.close()
        endpoint.close()


def test_peers_closing_early_free_their_connection_on_both_ends(tmp_path: Path, pair: Pair) -> None:
    # The pod's client goes half way through a line.
    with connect_unix(pair.path, 5) as sock:
        sock.sendall(b'{"op": "reser')
    # One that only shuts its writing half still gets its answer (half-close is carried).
    with connect_unix(pair.path, 5) as sock:
        sock.sendall(b'{"op": "settle", "id": 9, "usd": 0}\n')
        sock.shutdown(socket.SHUT_WR)
        assert json.loads(sock.makefile("rb").readline())["ok"]
    _until(lambda: pair.forwarder.open_connections == 0 and pair.relay.open_connections == 0)

    # A target that hangs up at once: the pod's client sees its connection end, nothing more.
    target = tmp_path / "rude.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(target))
    server.listen()

    def rude() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                conn.close()

    threading.Thread(target=rude, daemon=True).start()
    p = Pair(str(tmp_path / "r.sock"), str(target))
    try:
        with connect_unix(p.path, 5) as sock:
            assert sock.recv(10) == b""
        _until(lambda: p.forwarder.open_connections == 0 and p.relay.open_connections == 0)
    finally:
        p.close()
        server.close()


def test_an_unreachable_broker_answers_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, budget: tuple[SharedBudget, Any]
) -> None:
    """The broker gone (its run's budget closed): each connection in the pod ends at once, unanswered, which the
    gateway takes as a refusal (fail closed); the relay itself goes on."""
    caplog.set_level(logging.INFO)
    p = Pair(str(tmp_path / "b.sock"), str(tmp_path / "no-such.sock"))
    try:
        for _ in range(3):
            with connect_unix(p.path, 5) as sock:
                sock.sendall(b'{"op": "reserve", "id": 1, "usd": 1, "wait": 0}\n')
                assert sock.recv(10) == b""
        assert not p.forwarder.ended.is_set()
        assert len([r for r in caplog.records if r.getMessage().startswith("socket_relay_refused")]) == 3
    finally:
        p.close()


def test_a_target_that_takes_nothing_is_dropped_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rl, "SEND_TIMEOUT", 0.3)
    target = tmp_path / "deaf.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(target))
    server.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    p = Pair(str(tmp_path / "d.sock"), str(target))
    try:
        sock = connect_unix(p.path, 10)
        # Far more than the socket buffers hold, to a peer that reads nothing.
        with contextlib.suppress(OSError):
            for _ in range(400):
                sock.sendall(b"x" * 65536)
        _until(lambda: p.forwarder.open_connections == 0, 10)
        assert not p.forwarder.ended.is_set()  # the one connection went, the relay stays
        with connect_unix(p.path, 5):
            pass
    finally:
        p.close()
        server.close()


def test_a_full_backlog_is_waited_for_not_taken_for_a_refusal(tmp_path: Path) -> None:
    """A Unix socket whose backlog is full refuses a non-blocking connect at once (EAGAIN): connect_unix waits
    for room until its timeout, as the gateway's own (asyncio) connect does, instead of failing a model call."""
    path = tmp_path / "slow.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(0)
    queued = []
    with contextlib.suppress(OSError):
        for _ in range(64):  # fill the backlog
            queued.append(connect_unix(str(path), 0))
    with pytest.raises(TimeoutError, match="backlog"):
        connect_unix(str(path), 0.2)
    threading.Timer(0.3, lambda: [server.accept() for _ in range(len(queued) + 1)]).start()
    connect_unix(str(path), 5).close()  # room came
    for q in queued:
        q.close()
    server.close()


# --- hostile clients in the pod ---------------------------------------------------------------------------------


def test_a_flood_of_connections_in_the_pod_is_capped(tmp_path: Path, budget: tuple[SharedBudget, Any]) -> None:
    p = Pair(str(tmp_path / "f.sock"), str(budget[1].path), max_connections=8)
    try:
        held = [connect_unix(p.path, 5) for _ in range(8)]
        _until(lambda: p.relay.open_connections == 8 and p.forwarder.open_connections == 8)
        extra = [connect_unix(p.path, 5) for _ in range(50)]
        for sock in extra:  # each closed by the relay at once: none reaches the supervisor
            assert sock.recv(10) == b""
        assert p.relay.stats["refused"] == 50 and p.forwarder.stats["opened"] == 8
        for sock in held + extra:
            sock.close()
        _until(lambda: p.relay.open_connections == 0 and p.forwarder.open_connections == 0)
        with connect_unix(p.path, 5) as sock:  # room again
            f = sock.makefile("rwb")
            assert _ask(f, {"op": "settle", "id": 1, "usd": 0})["ok"]
    finally:
        p.close()


# --- a hostile relay: what the supervisor's end takes from the pod -------------------------------------------------


class ScriptedStream:
    """The relay's side of the stream played by the test: what it says is queued, what it is told is kept."""

    def __init__(self) -> None:
        self.incoming: list[bytes] = []
        self.sent = bytearray()
        self.closed = False
        self.lock = threading.Lock()

    def say(self, data: bytes) -> None:
        with self.lock:
            self.incoming.append(data)

    def read(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if self.closed:
                    return None
                if self.incoming:
                    return self.incoming.pop(0)
            if time.monotonic() >= deadline:
                return b""
            time.sleep(0.005)

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.closed:
                raise OSError("closed")
            self.sent += data

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def error(self) -> str:
        return ""

    def frames(self) -> list[rl.Frame]:
        with self.lock:
            return rl.FrameReader().feed(bytes(self.sent))


class CountingTarget:
    """A Unix server that counts its connections and keeps what each sends."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen(512)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.conns.append(self.server.accept()[0])

    def close(self) -> None:
        self.server.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[CountingTarget]:
    t = CountingTarget(tmp_path / "target.sock")
    yield t
    t.close()


def _hostile(target: CountingTarget, *frames: bytes, max_connections: int = 8) -> tuple[Forwarder, ScriptedStream]:
    stream = ScriptedStream()
    stream.say(encode(rl.READY, 0, rl.PROTOCOL))
    fwd = Forwarder(stream, target.path, "hostile", max_connections)
    fwd.start(5)
    for f in frames:
        stream.say(f)
    return fwd, stream


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        # A length claimed far beyond the bound: refused from the header, before any payload is buffered.
        ([rl.HEADER.pack(rl.DATA, 1, 2**32 - 1)], "DATA frame of 4294967295 bytes"),
        ([rl.HEADER.pack(rl.DATA, 1, rl.MAX_PAYLOAD + 1)], f"DATA frame of {rl.MAX_PAYLOAD + 1} bytes"),
        ([rl.HEADER.pack(rl.CLOSE, 1, 5)], "CLOSE frame of 5 bytes"),
        # An OPEN that tries to name a socket of its choosing: OPEN carries nothing.
        ([encode(rl.OPEN, 1, b"/var/run/docker.sock")], "OPEN frame of 20 bytes"),
        ([b"\xff" * 9], "unknown frame kind 255"),
        ([encode(rl.OPEN, 0)], "OPEN of connection 0"),
        ([encode(rl.OPEN, 1), encode(rl.OPEN, 1)], "OPEN of connection 1, which is open"),
        ([encode(rl.READY, 0, rl.PROTOCOL)], "READY from the relay"),
        ([encode(rl.END, 0)], "END from the relay"),
    ],
)
def test_a_frame_out_of_protocol_ends_the_relay(
    target: CountingTarget, frames: list[bytes], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fwd, stream = _hostile(target, *frames)

    def ended_line() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("socket_relay_ended")]

    # Its end is set, then said (relay.py, end: the log line comes from the end's callback, a moment later).
    _until(lambda: fwd.ended.is_set() and bool(ended_line()))
    assert fwd.reason is not None and fwd.reason.startswith("protocol") and why in fwd.reason, fwd.reason
    assert fwd.open_connections == 0 and stream.closed
    assert (rl.END, 0, b"") in stream.frames()  # the relay is told to stop
    # One line, a warning: the relay failed (not closed with its pod).
    lines = ended_line()
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "protocol" in lines[0].getMessage()


def test_garbage_before_ready_fails_the_start() -> None:
    stream = ScriptedStream()
    stream.say(b"Traceback (most recent call last):\n")
    with pytest.raises(RelayFailed, match="did not start"):
        Forwarder(stream, "/nonexistent", "garbage").start(5)
    stream = ScriptedStream()
    stream.say(encode(rl.READY, 0, b"sbx-relay/0"))  # another version of the protocol
    with pytest.raises(RelayFailed, match="READY"):
        Forwarder(stream, "/nonexistent", "old").start(5)
    stream = ScriptedStream()
    stream.closed = True  # the exec ended at once (no python in the image, say)
    with pytest.raises(RelayFailed, match="stream ended"):
        Forwarder(stream, "/nonexistent", "gone").start(5)


def test_silence_fails_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RelayFailed, match="no READY within"):
        Forwarder(ScriptedStream(), "/nonexistent", "silent").start(0.3)


def test_a_flood_of_opens_reaches_the_target_no_more_than_the_cap(target: CountingTarget) -> None:
    fwd, stream = _hostile(target, *(encode(rl.OPEN, i) for i in range(1, 1001)), max_connections=8)
    _until(lambda: len([f for f in stream.frames() if f[0] == rl.CLOSE]) == 992)
    assert not fwd.ended.is_set()
    assert len(target.conns) == 8 and fwd.open_connections == 8 and fwd.stats["refused"] == 992
    fwd.close()
    _until(lambda: all(c.recv(1) == b"" for c in target.conns))


def test_frames_for_connections_not_open_reach_none(target: CountingTarget) -> None:
    fwd, stream = _hostile(
        target,
        encode(rl.OPEN, 1),
        encode(rl.DATA, 2, b"not yours"),  # never opened
        encode(rl.CLOSE, 3),
        encode(rl.DATA, 1, b"mine"),
    )
    _until(lambda: len(target.conns) == 1)
    conn = target.conns[0]
    conn.settimeout(5)
    assert conn.recv(100) == b"mine"
    # Closed by the relay, then data for it again: dropped, not sent on.
    stream.say(encode(rl.CLOSE, 1))
    assert conn.recv(100) == b""  # its writing half was shut
    stream.say(encode(rl.DATA, 1, b"after close"))
    _until(lambda: fwd.stats["stray"] >= 3)
    conn.sendall(b"answer")
    _until(lambda: (rl.DATA, 1, b"answer") in stream.frames())
    conn.close()
    _until(lambda: fwd.open_connections == 0)
    assert not fwd.ended.is_set()
    fwd.close()


def test_frames_split_anywhere_are_read_whole(target: CountingTarget) -> None:
    data = encode(rl.OPEN, 7) + encode(rl.DATA, 7, b"hello") + encode(rl.NOOP, 0)
    fwd, _stream = _hostile(target, *(data[i : i + 1] for i in range(len(data))))
    _until(lambda: len(target.conns) == 1)
    target.conns[0].settimeout(5)
    assert target.conns[0].recv(100) == b"hello"
    fwd.close()


def test_the_reader_holds_no_more_than_one_frame() -> None:
    reader = rl.FrameReader()
    # A header claiming the most it may: the payload is awaited, not invented; a byte more is refused.
    assert reader.feed(rl.HEADER.pack(rl.DATA, 1, rl.MAX_PAYLOAD) + b"x" * 1000) == []
    with pytest.raises(rl.ProtocolError):
        rl.FrameReader().feed(rl.HEADER.pack(rl.DATA, 1, rl.MAX_PAYLOAD + 1))
    frames = rl.FrameReader().feed(encode(rl.DATA, 1, b"a") + encode(rl.CLOSE, 1) + encode(rl.NOOP, 0)[:5])
    assert frames == [(rl.DATA, 1, b"a"), (rl.CLOSE, 1, b"")]


# --- a hostile supervisor side: what the relay takes from its stdin ------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        rl.HEADER.pack(rl.DATA, 1, 2**31),  # a huge length
        b"\x00" * 9,  # an unknown kind
        encode(rl.OPEN, 5),  # only the relay opens
        encode(rl.READY, 0, rl.PROTOCOL),
    ],
)
def test_garbage_on_its_input_stops_the_relay_and_removes_its_socket(tmp_path: Path, garbage: bytes) -> None:
    path = str(tmp_path / "g.sock")
    to_relay = os.pipe()
    from_relay = os.pipe()
    relay = Relay(path, to_relay[0], from_relay[1])
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(relay.serve()), daemon=True)
    t.start()
    try:
        # The socket's file exists from its bind, a moment before it listens: until then a connection is refused.
        _until(lambda: os.path.exists(path))
        connected: list[socket.socket] = []

        def connects() -> bool:
            with contextlib.suppress(ConnectionRefusedError):
                connected.append(connect_unix(path, 5))
            return bool(connected)

        _until(connects)
        client = connected[0]
        os.write(to_relay[1], garbage)
        t.join(15)  # a loaded machine (the whole suite at once) may take a while to run the relay's thread
        assert result and result[0].startswith("protocol"), result
        assert _ended(client) and not os.path.exists(path)
    finally:
        for fd in (*to_relay, *from_relay):
            os.close(fd)


def test_the_relay_replaces_a_stale_socket_but_nothing_else(tmp_path: Path) -> None:
    stale = tmp_path / "s.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(stale))
    old.close()
    to_relay, from_relay = os.pipe(), os.pipe()
    relay = Relay(str(stale), to_relay[0], from_relay[1])
    t = threading.Thread(target=relay.serve, daemon=True)
    t.start()
    try:
        _until(lambda: relay._listener is not None)
        assert stat.S_ISSOCK(os.lstat(stale).st_mode) and stat.S_IMODE(os.lstat(stale).st_mode) == 0o600
        with connect_unix(str(stale), 5):
            pass
        relay.end("test")
        t.join(5)
        assert not stale.exists()
    finally:
        for fd in (*to_relay, *from_relay):
            os.close(fd)
    regular = tmp_path / "file"
    regular.write_text("not a socket")
    with pytest.raises(OSError):
        Relay(str(regular), 0, 1).serve()
    assert regular.read_text() == "not a socket"


def test_the_relay_module_runs_as_a_program(tmp_path: Path) -> None:
    """`python -m agent_sandbox.sidecar.relay PATH`, as `exec` runs it in the pod: READY on stdout first,
    connections carried, END stops it (exit 0), and its socket goes."""
    import subprocess
    import sys

    path = tmp_path / "p.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_sandbox.sidecar.relay", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        reader = rl.FrameReader()
        frames: list[rl.Frame] = []

        def more() -> None:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                assert chunk, proc.stderr.read() if proc.stderr else ""
                frames.extend(reader.feed(chunk))
                return

        more()
        assert frames[0] == (rl.READY, 0, rl.PROTOCOL)
        client = connect_unix(str(path), 5)
        client.sendall(b"ping")
        while len(frames) < 3:
            more()
        assert frames[1:3] == [(rl.OPEN, 1, b""), (rl.DATA, 1, b"ping")]
        proc.stdin.write(encode(rl.DATA, 1, b"pong") + encode(rl.CLOSE, 1))
        proc.stdin.flush()
        client.settimeout(5)
        assert client.recv(10) == b"pong" and client.recv(10) == b""
        proc.stdin.write(encode(rl.END, 0))
        proc.stdin.flush()
        assert proc.wait(5) == 0
        assert not path.exists()
        assert b"relay_ended" in (proc.stderr.read() if proc.stderr else b"")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_forwarder_keeps_an_idle_stream_alive(monkeypatch: pytest.MonkeyPatch, target: CountingTarget) -> None:
    monkeypatch.setattr(forward, "KEEPALIVE", 0.1)
    monkeypatch.setattr(forward, "READ_WAIT", 0.05)
    fwd, stream = _hostile(target)
    _until(lambda: (rl.NOOP, 0, b"") in stream.frames())
    fwd.close()


# --- the client's stream: the websocket of `exec`, used from one thread --------------------------------------------


class FakeWebSocket:
    """The parts of the official client's WSClient the stream uses; flags any two calls at once."""

    def __init__(self) -> None:
        self.stdin: list[bytes] = []
        self.stdout: list[bytes] = []
        self.stderr = b""
        self.open = True
        self.busy = threading.Lock()
        self.overlaps = 0

    def _enter(self) -> None:
        if not self.busy.acquire(blocking=False):
            self.overlaps += 1
        else:
            self.busy.release()

    def write_stdin(self, data: bytes) -> None:
        self._enter()
        self.stdin.append(data)

    def update(self, timeout: float = 0) -> None:
        with self.busy:
            time.sleep(min(timeout, 0.005))

    def peek_stdout(self) -> bool:
        return bool(self.stdout)

    def read_stdout(self) -> bytes:
        out = b"".join(self.stdout)
        self.stdout.clear()
        return out

    def peek_stderr(self) -> bool:
        return bool(self.stderr)

    def read_stderr(self) -> bytes:
        out, self.stderr = self.stderr, b""
        return out

    def is_open(self) -> bool:
        return self.open

    def close(self) -> None:
        self._enter()
        self.open = False


def test_the_exec_stream_sends_from_its_reading_thread_and_keeps_little_of_stderr() -> None:
    from agent_sandbox.backend.kubernetes.client import _ExecStream

    ws = FakeWebSocket()
    stream = _ExecStream(ws)
    ws.stderr = b"e" * 100_000  # a relay (or anything in its place) flooding stderr
    writers = [threading.Thread(target=stream.write, args=(encode(rl.NOOP, i),)) for i in range(50)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    assert ws.stdin == []  # queued: the websocket is the reading thread's alone
    assert stream.read(0.05) == b""
    assert len(ws.stdin) == 50 and ws.overlaps == 0
    assert len(stream.error()) == _ExecStream.STDERR_KEPT
    ws.stdout.append(b"frames")
    assert stream.read(1) == b"frames"
    stream.write(encode(rl.END, 0))
    stream.close()  # what was written goes first
    assert ws.stdin[-1] == encode(rl.END, 0) and not ws.open
    assert stream.read(1) is None
    with pytest.raises(OSError):
        stream.write(b"late")
    ws2 = FakeWebSocket()
    ws2.open = False
    assert _ExecStream(ws2).read(1) is None  # the exec ended
