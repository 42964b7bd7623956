"""Messages over a Unix socket: a 4-byte big-endian length, then a JSON object; descriptors may ride along
(SCM_RIGHTS). The warm daemon (cli/launch.py, cli/daemon.py) and its pool (fleet/pool.py, run/pool.py) speak it.
Standard library only: the `sandbox` entry point imports this before anything else."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

MAX_MESSAGE = 4 << 20
DAEMON_ENV = "SANDBOX_DAEMON"
"""`off`: no warm daemon for this process: `sandbox run` neither hands itself over nor takes a pooled slot."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    if len(body) > MAX_MESSAGE:
        raise ValueError("message too large")
    header = struct.pack(">I", len(body))
    if fds:
        socket.send_fds(sock, [header], fds)
        sock.sendall(body)
    else:
        sock.sendall(header + body)


def _exactly(sock: socket.socket, n: int, first: bytes = b"") -> bytes | None:
    data = bytearray(first)
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and the descriptors that came with it; (None, []) at the end of the stream."""
    fds: list[int] = []
    if max_fds:
        first, fds, _flags, _addr = socket.recv_fds(sock, 4, max_fds)
        if not first:
            return None, fds
    else:
        first = b""
    header = _exactly(sock, 4, first)
    if header is None:
        return None, fds
    (size,) = struct.unpack(">I", header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes")
    body = _exactly(sock, size)
    if body is None:
        return None, fds
    try:
        message = json.loads(body)
    except RecursionError:  # nested past the parser's depth: as malformed as any other bad message
        raise ValueError("a message nested too deeply") from None
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message, fds


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (SO_PEERCRED), as the kernel says."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def request(
    path: Path, message: dict[str, Any], timeout: float, max_fds: int = 0
) -> tuple[dict[str, Any] | None, list[int]]:
    """One message to the server at `path` and its answer, with the descriptors that came with it; OSError when
    none listens, ValueError on a malformed answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        send(sock, message)
        return receive(sock, max_fds=max_fds)


def listen(path: Path, backlog: int = 64) -> socket.socket:
    """A listening Unix socket at `path` that only its owner can connect to (mode 0600 from its creation); a
    socket file left there by a server that was killed is replaced."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(backlog)
    return listener
