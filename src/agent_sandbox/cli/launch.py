"""The `sandbox` command's entry point: hands `sandbox run` to a warm daemon when one is running, else runs the CLI.

A one-shot `sandbox run` spends about a third of a second importing its libraries before the run begins. A
daemon (`sandbox daemon start`, cli/daemon.py) has them imported already: this module, which imports only the
standard library, passes the command to it (its arguments, working directory, environment, umask and its
standard streams themselves, as file descriptors) and the daemon forks a process that runs exactly the CLI's
`sandbox run` there. Signals this process gets are passed on to that run; should this process die, the run is
stopped as a SIGTERM would stop it. Whenever the daemon is absent, stale (other code or another interpreter),
or refuses, the CLI runs here as it always did: the daemon only ever saves time.

Protocol (a Unix socket in the state directory, readable by its owner alone): every message is a 4-byte
big-endian length and a JSON object. The request carries the three descriptors (SCM_RIGHTS); the daemon answers
`{"accepted": true}` or `{"accepted": false, "why": ...}`; the client may send `{"signal": "SIGINT"}`; the run
ends with `{"exit": code}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from agent_sandbox import __version__
from agent_sandbox.wire import DAEMON_ENV, receive, send

SOCKET_NAME = "daemon.sock"
# The commands a daemon runs: those whose start-up is on a user's critical path.
HANDED = ("run",)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ACCEPT_TIMEOUT = 10.0


def state_dir() -> Path:
    # paths.state_dir, without importing the package's modules that import more.
    from agent_sandbox.paths import state_dir as where

    return where()


def socket_path() -> Path:
    return state_dir() / SOCKET_NAME


def code_token() -> str:
    """Which code a process runs: the interpreter, the version, and every source file of the package (name,
    size, modification time). A daemon with another token would run other code than this command's."""
    digest = hashlib.sha256(f"{sys.executable}\0{__version__}\0".encode())
    root = Path(__file__).resolve().parents[1]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                st = os.stat(os.path.join(dirpath, name))
                digest.update(f"{os.path.relpath(dirpath, root)}/{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def _std_fds() -> list[int]:
    """Descriptors 0, 1 and 2, each opened on /dev/null first where this process has none open (so that no later
    descriptor takes one of those numbers)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free number is this one unless a lower one was closed too
                os.dup2(null, fd)
                os.close(null)
    return [0, 1, 2]


def hand_off(argv: list[str]) -> int | None:
    """The exit code of the command run by the daemon, or None when no daemon took it (then run it here)."""
    if os.environ.get(DAEMON_ENV) == "off" or _command(argv) not in HANDED:
        return None
    try:
        path = socket_path()
        if not path.exists():
            return None
        # Descriptors 0 to 2 open first: a socket made while one is closed would take its number and be handed
        # over as the run's stream, keeping the connection open after this process is gone.
        fds = _std_fds()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(ACCEPT_TIMEOUT)
        sock.connect(str(path))
    except OSError:
        return None  # none listening (a stale socket), or a path too long for a socket: run here
    umask = os.umask(0)
    os.umask(umask)
    request = {
        "token": code_token(),
        "argv": argv,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "umask": umask,
    }
    try:
        send(sock, request, fds)
        answer, _ = receive(sock)
    except (OSError, ValueError):
        sock.close()
        return None
    if not answer or not answer.get("accepted"):
        why = (answer or {}).get("why") or "no answer"
        if answer and answer.get("stale"):
            sys.stderr.write(f"sandbox: the daemon is not used ({why}); restart it: sandbox daemon restart\n")
        sock.close()
        return None
    return _follow(sock)


def _follow(sock: socket.socket) -> int:
    """Passes signals to the daemon's run until it ends; its exit code."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            send(sock, {"signal": signal.Signals(signum).name})

    for sig in FORWARDED:
        signal.signal(sig, forward)
    sock.settimeout(None)
    while True:
        try:
            message, _ = receive(sock)
        except InterruptedError:
            continue
        except (OSError, ValueError):
            message = None
        if message is None:
            sys.stderr.write("sandbox: the daemon's process for this run ended without an exit status\n")
            return 1
        if "exit" in message and isinstance(message["exit"], int):
            return int(message["exit"])


def main() -> NoReturn:
    code = hand_off(sys.argv)
    if code is not None:
        os._exit(code)
    from agent_sandbox.cli.main import entry

    entry()
