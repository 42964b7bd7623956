"""A Unix socket carried over one byte stream: `python -m agent_sandbox.sidecar.relay LISTEN_PATH`.

A Unix socket of the supervisor's (a sweep's budget broker, run/budget.py) cannot be mounted into a pod of a
Kubernetes cluster. So the Kubernetes backend runs this module in the sidecar's pod through the API server
(`exec`): it listens on LISTEN_PATH there, and carries every connection it accepts over its own stdin and
stdout, which the supervisor's end (backend/kubernetes/forward.py) turns back into connections to the real
socket on its machine. The pod chooses nothing: the supervisor's end connects to the one socket it was started
for, whatever the frames say.

The stream is a sequence of frames, each a header (kind: 1 byte, connection id: 4, payload length: 4, big
endian) and its payload:

  READY  relay -> supervisor, first and once: listening (payload: PROTOCOL)
  OPEN   relay -> supervisor: a connection was accepted; the supervisor connects one for it
  DATA   both ways: bytes of a connection (at most MAX_PAYLOAD)
  CLOSE  both ways: the sender's side of a connection has ended (the receiver shuts the writing half of its
         socket); a connection is gone once both sides have closed it, or at once when a socket fails
  NOOP   both ways: nothing (keeps an idle stream open through the proxies on its way)
  END    supervisor -> relay: stop

Anything else (an unknown kind, a payload longer than its kind allows, a frame out of place) ends the relay:
whoever relies on the socket then finds it gone, and fails closed (the gateway admits no model call without
its shared budget's answer). Standard library only: the sidecar image has this package, nothing more is needed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROTOCOL = b"sbx-relay/1"
HEADER = struct.Struct("!BII")
READY, OPEN, DATA, CLOSE, NOOP, END = 1, 2, 3, 4, 5, 6
NAMES = {READY: "READY", OPEN: "OPEN", DATA: "DATA", CLOSE: "CLOSE", NOOP: "NOOP", END: "END"}
MAX_PAYLOAD = 1 << 20
"""The longest DATA payload either end accepts (the ends themselves send at most CHUNK): a frame claiming more
is refused from its header, before any of its payload is buffered."""
PAYLOAD_LIMITS = {READY: len(PROTOCOL), OPEN: 0, DATA: MAX_PAYLOAD, CLOSE: 0, NOOP: 0, END: 0}
MAX_CONNECTIONS = 64
"""Connections open at once; one more is refused (closed at once). The gateway opens one per model call in
flight and one per settle."""
MAX_ID = 2**32 - 1
CHUNK = 64 * 1024
SEND_TIMEOUT = 10.0
"""Seconds a socket may refuse to take bytes before its connection is dropped (it holds up every other)."""
ACCEPT_POLL = 0.2
BACKLOG = 128

Frame = tuple[int, int, bytes]


class ProtocolError(Exception):
    """The stream broke the framing: the relay ends."""


def encode(kind: int, conn_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, conn_id, len(payload)) + payload


class FrameReader:
    """Frames out of a byte stream fed in pieces of any size. Holds at most one header and one payload."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            kind, conn_id, length = HEADER.unpack_from(self._buf)
            limit = PAYLOAD_LIMITS.get(kind)
            if limit is None:
                raise ProtocolError(f"unknown frame kind {kind}")
            if length > limit:
                raise ProtocolError(f"a {NAMES[kind]} frame of {length} bytes (at most {limit})")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append((kind, conn_id, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return frames


@contextlib.contextmanager
def _address(path: str) -> Iterator[str]:
    """An address for a socket at path: a path too long for one (108 bytes) is reached by its directory's
    descriptor (a run directory, a test's temporary one)."""
    if len(os.fsencode(path)) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def connect_unix(path: str, timeout: float | None = None) -> socket.socket:
    """A stream socket connected to the Unix socket at path (of any length)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        # Non-blocking under a timeout: a Unix socket whose backlog is full refuses at once (EAGAIN) rather than
        # waiting for room, as a blocking connect would; so look again until the deadline.
        sock.setblocking(timeout is None)
        with _address(path) as address:
            while True:
                try:
                    sock.connect(address)
                    break
                except BlockingIOError:
                    if deadline is None or time.monotonic() >= deadline:
                        raise TimeoutError(f"{path}: its backlog stayed full") from None
                    time.sleep(0.005)
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_unix(path: str, backlog: int) -> tuple[socket.socket, int]:
    """A listening Unix socket at path, mode 0600 (its owner alone may connect) before anyone can connect; a
    socket left there by an earlier relay is replaced, anything else is not ours to remove. Returns the socket
    and its inode (what the relay removes when it ends, should another have replaced it meanwhile)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as address:
            sock.bind(address)
        # Before listen(): until then a connection is refused, so there is no moment the mode is wider.
        os.chmod(path, 0o600)
        sock.listen(backlog)
        inode = os.lstat(path).st_ino
    except BaseException:
        sock.close()
        raise
    return sock, inode


@dataclass
class _Conn:
    """One connection carried. Its socket is closed by the last thread using it, once it is gone from the table:
    a descriptor closed under a thread still in recv() or send() on it could be reused meanwhile for another
    socket, which that thread would then read or write. Others only shut it down (which wakes a recv)."""

    conn_id: int
    sock: socket.socket
    sent_close: bool = False
    """This end has told the other that its socket's side ended."""
    got_close: bool = False
    """The other end has told this one that its side ended."""
    users: int = 1
    """Threads using the socket: its pump, and a send under way."""
    gone: bool = False
    """Out of the table: closed once `users` is down to none."""


class Mux:
    """Connections carried over one stream, by id: what both ends share. A subclass says how frames are
    written (`write`) and where connections come from."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self.ended = threading.Event()
        self.reason: str | None = None
        self.stats = {"opened": 0, "refused": 0, "stray": 0}
        """Connections carried; refused (too many open); frames for a connection this end does not have."""
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._sealed = False  # nothing more is written (the stream's descriptor may be closed after `seal`)

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def on_end(self, reason: str) -> None:
        """Called once, when the stream ends (every connection is shut down by then)."""

    def send(self, kind: int, conn_id: int, payload: bytes = b"") -> bool:
        """Write one frame; False once the stream has ended (a failing write ends it)."""
        if self.ended.is_set():
            return False
        try:
            with self._write_lock:
                if self._sealed:
                    return False
                self.write(encode(kind, conn_id, payload))
        except (OSError, ValueError) as exc:
            self.end(f"the stream failed: {exc!r}")
            return False
        return True

    def seal(self, timeout: float = 5.0) -> bool:
        """No write after this returns; True when none is under way either (the stream's descriptor may go).
        False when one is still blocked after timeout (a reader that no longer reads: its end closing fails it)."""
        if not self._write_lock.acquire(timeout=timeout):
            self._sealed = True
            return False
        self._sealed = True
        self._write_lock.release()
        return True

    def end(self, reason: str) -> None:
        """End the stream: every connection is shut down (its peer sees it end), nothing more is carried."""
        with self._lock:
            if self.ended.is_set():
                return
            self.reason = reason
            self.ended.set()
            for c in list(self._conns.values()):
                self._remove(c)
        self.on_end(reason)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def has(self, conn_id: int) -> bool:
        with self._lock:
            return conn_id in self._conns

    def register(self, conn_id: int, sock: socket.socket) -> _Conn | None:
        """Carry a connection under conn_id, its pump (`pump`) to follow; None when the stream has ended, the id
        is taken or too many are open (the caller closes the socket)."""
        with self._lock:
            if self.ended.is_set() or conn_id in self._conns or len(self._conns) >= self.max_connections:
                return None
            c = self._conns[conn_id] = _Conn(conn_id, sock)
            self.stats["opened"] += 1
        # Sends give up after SEND_TIMEOUT; receives only wake up to look whether the stream still runs.
        sock.settimeout(SEND_TIMEOUT)
        return c

    def pump(self, c: _Conn) -> None:
        """Carry what the socket receives onto the stream, in a thread of its own, until it ends."""
        threading.Thread(target=self._pump, args=(c,), name=f"relay-conn-{c.conn_id}", daemon=True).start()

    def _pump(self, c: _Conn) -> None:
        try:
            while True:
                try:
                    data = c.sock.recv(CHUNK)
                except TimeoutError:
                    if self.ended.is_set() or c.gone:
                        return
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._local_end(c)
                    return
                if not self.send(DATA, c.conn_id, data):
                    return
        finally:
            self._release(c)

    def _remove(self, c: _Conn) -> None:
        """Under the lock: out of the table, and shut down (a recv on it wakes); closed if nobody uses it."""
        if self._conns.get(c.conn_id) is c:
            del self._conns[c.conn_id]
        c.gone = True
        with contextlib.suppress(OSError):
            c.sock.shutdown(socket.SHUT_RDWR)
        if c.users == 0:
            c.sock.close()

    def _release(self, c: _Conn) -> None:
        with self._lock:
            c.users -= 1
            if c.gone and c.users == 0:
                c.sock.close()

    def _local_end(self, c: _Conn) -> None:
        """The socket's side of a connection ended: tell the other end; gone if the other's had ended too."""
        with self._lock:
            if c.gone or c.sent_close:
                return
            c.sent_close = True
            if c.got_close:
                self._remove(c)
        self.send(CLOSE, c.conn_id)

    def _drop(self, c: _Conn) -> None:
        """A connection whose socket failed: gone at once, and the other end told."""
        with self._lock:
            if c.gone:
                return
            tell = not c.sent_close
            c.sent_close = True
            self._remove(c)
        if tell:
            self.send(CLOSE, c.conn_id)

    def dispatch(self, kind: int, conn_id: int, payload: bytes) -> None:
        """A DATA or CLOSE frame from the other end. One for a connection this end does not have (closed
        meanwhile, refused, or never opened) is dropped: it can reach no other connection."""
        with self._lock:
            c = self._conns.get(conn_id)
            if c is None or c.got_close:
                self.stats["stray"] += 1
                return
            if kind == CLOSE:
                c.got_close = True
                if c.sent_close:
                    self._remove(c)
                else:
                    with contextlib.suppress(OSError):
                        c.sock.shutdown(socket.SHUT_WR)
                return
            c.users += 1
        try:
            c.sock.sendall(payload)
        except OSError:  # its peer is gone, or took nothing for SEND_TIMEOUT
            self._drop(c)
        finally:
            self._release(c)


class Relay(Mux):
    """The pod's end: listens at a path and carries each accepted connection over a pair of file descriptors
    (stdin and stdout under `exec`)."""

    def __init__(self, path: str, read_fd: int, write_fd: int, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(max_connections)
        self.path = path
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._listener: socket.socket | None = None
        self._refusal_logged = 0.0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def serve(self) -> str:
        """Listen, say READY, carry connections until the stream ends; returns why it ended. The socket goes
        with it. Raises OSError when it cannot listen."""
        # A backlog beyond the cap: a flood is accepted and refused (closed) quickly, not left to time out.
        listener, inode = listen_unix(self.path, BACKLOG)
        listener.settimeout(ACCEPT_POLL)
        self._listener = listener
        accepting = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        try:
            # READY before the first accept: the supervisor's end reads it before any OPEN.
            if self.send(READY, 0, PROTOCOL):
                log.info("relay_listening path=%s max_connections=%d", self.path, self.max_connections)
                threading.Thread(target=self._input, name="relay-input", daemon=True).start()
                accepting.start()
            self.ended.wait()
        finally:
            self.end("stopped")
            self.seal()
            if accepting.is_alive():
                accepting.join(5)  # within ACCEPT_POLL: the listener is not closed under its accept()
            if not accepting.is_alive():
                listener.close()
            with contextlib.suppress(OSError):
                if os.lstat(self.path).st_ino == inode:
                    os.unlink(self.path)
        log.info(
            "relay_ended path=%s reason=%s opened=%d refused=%d stray=%d",
            self.path,
            self.reason,
            self.stats["opened"],
            self.stats["refused"],
            self.stats["stray"],
        )
        return self.reason or ""

    def _accept(self) -> None:
        assert self._listener is not None
        ids = itertools.count(1)
        while not self.ended.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                self.end(f"accept failed: {exc!r}")
                return
            conn_id = next(ids)
            if conn_id > MAX_ID:
                sock.close()
                self.end("connection ids exhausted")
                return
            # Known before OPEN is sent: the supervisor's first DATA for it may come back at once.
            c = self.register(conn_id, sock)
            if c is None:
                sock.close()
                if self.ended.is_set():
                    return
                self.stats["refused"] += 1
                now = time.monotonic()
                if now - self._refusal_logged > 10:  # a flood is one line per 10 s, not one per connection
                    self._refusal_logged = now
                    log.warning(
                        "relay_refused open=%d max=%d refused=%d",
                        self.open_connections,
                        self.max_connections,
                        self.stats["refused"],
                    )
                continue
            self.send(OPEN, conn_id)
            self.pump(c)  # also when the stream has just ended: the pump is what closes the socket

    def _input(self) -> None:
        reader = FrameReader()
        while not self.ended.is_set():
            try:
                chunk = os.read(self.read_fd, CHUNK)
            except OSError as exc:
                self.end(f"input failed: {exc!r}")
                return
            if not chunk:
                self.end("input ended")
                return
            try:
                frames = reader.feed(chunk)
            except ProtocolError as exc:
                self.end(f"protocol: {exc}")
                return
            for kind, conn_id, payload in frames:
                if kind in (DATA, CLOSE):
                    self.dispatch(kind, conn_id, payload)
                elif kind == END:
                    self.end("ended by the supervisor")
                    return
                elif kind != NOOP:
                    self.end(f"protocol: {NAMES[kind]} from the supervisor")
                    return


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agent_sandbox.sidecar.relay LISTEN_PATH", file=sys.stderr)
        return 2
    # stdout carries the frames: every line of the relay's own goes to stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    try:
        reason = Relay(args[0], sys.stdin.fileno(), sys.stdout.fileno()).serve()
    except OSError as exc:
        log.error("relay_failed path=%s error=%r", args[0], exc)
        return 1
    return 0 if reason in ("ended by the supervisor", "input ended") else 1


if __name__ == "__main__":
    sys.exit(main())
