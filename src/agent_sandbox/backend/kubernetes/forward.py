"""The supervisor's end of a socket relay (sidecar/relay.py): a Unix socket of this machine's (a sweep's budget
broker) made reachable inside a pod, through the API server.

The backend runs the relay in the pod with `exec` (Cluster.exec_stream) and hands its stream to a Forwarder:
each connection the relay accepts in the pod (OPEN) becomes a connection to the one socket the Forwarder was
made for, and bytes go both ways in frames. What the pod sends is read as untrusted: it cannot name another
socket, a frame is bounded before it is buffered, connections are capped, a frame for a connection that is not
open reaches none, and anything out of protocol ends the relay, which fails closed (the pod's socket goes, or
refuses, so the gateway there admits no model call without its shared budget's answer).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Protocol

from agent_sandbox.sidecar import relay as rl

log = logging.getLogger(__name__)

RELAY_MODULE = "agent_sandbox.sidecar.relay"
SIDECAR_PYTHON = "/opt/sidecar/bin/python"
"""The sidecar image's interpreter (images/sidecar/Dockerfile), which has this package on its path."""
READY_TIMEOUT = 30.0
KEEPALIVE = 30.0
"""Seconds between NOOP frames: an idle exec stream may otherwise be closed by a proxy on its way."""
CONNECT_TIMEOUT = 5.0
READ_WAIT = 0.5


class ExecStream(Protocol):
    """A command running in a container through the API server, its stdin and stdout kept open."""

    def read(self, timeout: float) -> bytes | None:
        """What the command wrote on stdout since the last read, waiting up to timeout seconds for some (b"" if
        none came); None once the stream has ended. Called from one thread."""

    def write(self, data: bytes) -> None:
        """Send bytes to the command's stdin; any thread may call it. Raises OSError once the stream is closed."""

    def close(self) -> None:
        """End the stream (what was written before is sent first); safe to repeat, from any thread."""

    def error(self) -> str:
        """The end of what the command wrote on stderr."""


def relay_command(listen_path: str) -> list[str]:
    """The relay, as `exec` runs it in a container of the sidecar's image."""
    return [SIDECAR_PYTHON, "-m", RELAY_MODULE, listen_path]


class RelayFailed(RuntimeError):
    """The relay did not start."""


class Forwarder(rl.Mux):
    """Connections the relay accepts in the pod, carried to `target` on this machine."""

    def __init__(self, stream: ExecStream, target: str, label: str, max_connections: int = rl.MAX_CONNECTIONS) -> None:
        super().__init__(max_connections)
        self.stream = stream
        self.target = target
        self.label = label
        self.ready = threading.Event()
        self._closing = False
        self._began = time.monotonic()
        self._ended_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"relay-{label}", daemon=True)

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the relay listens in the pod (its READY has come), or RelayFailed (the relay ended)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05) and not self.ended.is_set():
            if time.monotonic() >= deadline:
                self.end(f"no READY within {timeout:.0f}s")
        if not self.ready.is_set():
            raise RelayFailed(f"the socket relay {self.label} did not start: {self.reason}")

    @property
    def closing(self) -> bool:
        """Whether it was closed on purpose (its pod is done with it), not broken."""
        return self._closing

    @property
    def lasted(self) -> float:
        """Seconds from its start to its end (or until now)."""
        return (self._ended_at or time.monotonic()) - self._began

    def close(self) -> None:
        """Stop relaying (the run's pod is done with the socket): the relay ends, and its socket in the pod."""
        self._closing = True
        self.end("closed with its pod")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def on_end(self, reason: str) -> None:
        self._ended_at = time.monotonic()
        # END first: through an API server that cannot close an exec's stdin, it is what stops the relay. A stream
        # that is gone already takes the relay with it.
        with contextlib.suppress(Exception):
            self.stream.write(rl.encode(rl.END, 0))
        with contextlib.suppress(Exception):
            self.stream.close()
        # One line per relay, when it ends: a failure leaves the pod without the socket (fail closed).
        log.log(
            logging.INFO if self._closing else logging.WARNING,
            "socket_relay_ended relay=%s target=%s reason=%s opened=%d refused=%d stray=%d",
            self.label,
            self.target,
            reason,
            self.stats["opened"],
            self.stats["refused"],
            self.stats["stray"],
        )

    def _run(self) -> None:
        reader = rl.FrameReader()
        last_noop = time.monotonic()
        try:
            while not self.ended.is_set():
                chunk = self.stream.read(READ_WAIT)
                if chunk is None:
                    err = self.stream.error().strip()[-300:]
                    self.end("the relay's stream ended" + (f": {err}" if err else ""))
                    return
                if time.monotonic() - last_noop >= KEEPALIVE:
                    last_noop = time.monotonic()
                    self.send(rl.NOOP, 0)
                for kind, conn_id, payload in reader.feed(chunk):
                    self._handle(kind, conn_id, payload)
                    if self.ended.is_set():
                        return
        except rl.ProtocolError as exc:
            self.end(f"protocol: {exc}")
        except Exception as exc:  # the stream failed: the relay is over, the run goes on without it
            self.end(f"the stream failed: {exc!r}")

    def _handle(self, kind: int, conn_id: int, payload: bytes) -> None:
        if not self.ready.is_set():
            if kind != rl.READY or payload != rl.PROTOCOL:
                raise rl.ProtocolError(f"{rl.NAMES[kind]} {payload[:32]!r} where READY {rl.PROTOCOL!r} was due")
            self.ready.set()
            return
        if kind == rl.OPEN:
            self._open(conn_id)
        elif kind in (rl.DATA, rl.CLOSE):
            self.dispatch(kind, conn_id, payload)
        elif kind != rl.NOOP:
            raise rl.ProtocolError(f"{rl.NAMES[kind]} from the relay")

    def _open(self, conn_id: int) -> None:
        """A connection the relay accepted: one to the target for it, or CLOSE at once."""
        if conn_id == 0 or self.has(conn_id):
            raise rl.ProtocolError(f"OPEN of connection {conn_id}, which is {'reserved' if not conn_id else 'open'}")
        if self.open_connections >= self.max_connections:
            self.stats["refused"] += 1
            self.send(rl.CLOSE, conn_id)
            return
        try:
            sock = rl.connect_unix(self.target, CONNECT_TIMEOUT)
        except OSError as exc:
            log.info("socket_relay_refused relay=%s conn=%d error=%r", self.label, conn_id, exc)
            self.send(rl.CLOSE, conn_id)
            return
        c = self.register(conn_id, sock)
        if c is None:
            sock.close()
            self.send(rl.CLOSE, conn_id)
            return
        self.pump(c)
