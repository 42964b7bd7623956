"""The warm daemon: `sandbox run` without the start-up of a Python process that imports everything.

    sandbox daemon start | stop | restart | status      (foreground: python -m agent_sandbox.cli.daemon)

It imports the CLI and every module a run uses once, listens on a Unix socket in the state directory (mode
0600, and only a peer of its own user is served), and for each `sandbox run` handed to it by cli/launch.py
forks a process that becomes that command: the client's arguments, working directory, environment, umask and
standard streams. That process is a supervisor like any other (its own pid in the run's labels, its own lock,
recovery and gc as usual); the daemon holds no run state, so stopping or killing it never touches a run.

The daemon stays single-threaded, so that a fork copies no lock held by another thread. A run whose client
goes away (killed, its terminal closed) is stopped as a SIGTERM would stop it: its work is still packed and
everything torn down. Clients that run other code than the daemon's (the package changed since it started, or
another interpreter) are refused, and run the CLI themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import io
import json
import logging
import os
import pkgutil
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from agent_sandbox import wire
from agent_sandbox.cli import launch
from agent_sandbox.run import later

log = logging.getLogger("agent_sandbox.daemon")

LOCK_NAME = "daemon.lock"
LOG_NAME = "daemon.log"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 5.0
KEEPER_STOP_WAIT = 120.0  # seconds the pool's keeper has to remove its slots
KEEPER_RESTART = 5.0  # seconds before a keeper that ended is started again; doubled for each quick end in a row
KEEPER_RESTART_MAX = 300.0
KEEPER_STEADY = 60.0  # seconds a keeper lives to count as having worked
POOL_DEFAULT = 1
PR_SET_PDEATHSIG = 1
ANSWERED = threading.Event()  # in a run's process: its client has its exit code; its end is no signal any more
# Not worth importing ahead: the model sidecar's own entry point, and this module's.
SKIP_PRELOAD = ("agent_sandbox.sidecar.__main__", "agent_sandbox.cli.__main__", "agent_sandbox.cli.daemon")


def preload() -> int:
    """Import every module of the package a run may use (the sidecar's included: the host imports its models);
    those that need an optional library (the Kubernetes client) are left to the run."""
    import agent_sandbox

    count = 0
    for info in pkgutil.walk_packages(agent_sandbox.__path__, "agent_sandbox."):
        if info.name in SKIP_PRELOAD:
            continue
        try:
            importlib.import_module(info.name)
            count += 1
        except Exception as exc:  # an optional dependency missing: that module loads in the run, if at all
            log.info("daemon_preload_skipped module=%s error=%r", info.name, exc)
    return count


def _valid_run(request: dict[str, Any]) -> str | None:
    """Why the request is not a run this daemon can take, or None."""
    argv, env, cwd, umask = request.get("argv"), request.get("env"), request.get("cwd"), request.get("umask")
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        return "argv is not a list of strings"
    if launch._command(argv) not in launch.HANDED:
        return f"the daemon runs only {', '.join(launch.HANDED)}"
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return "env is not a map of strings"
    if not (isinstance(cwd, str) and os.path.isabs(cwd)):
        return "cwd is not an absolute path"
    if not (isinstance(umask, int) and 0 <= umask <= 0o777):
        return "umask is not a mode"
    return None


class Daemon:
    """The accept loop. Runs in one thread: each run is a forked process of its own."""

    def __init__(self, state: Path, pool: int = 0) -> None:
        self.state = state
        self.pool = pool  # slots the pool's keeper keeps ready (fleet/pool.py); 0: no keeper
        self.keeper: int | None = None
        self.keeper_due = 0.0  # when to start the keeper (again)
        self.keeper_since = 0.0
        self.keeper_failures = 0  # keepers in a row that ended within KEEPER_STEADY
        self.path = state / launch.SOCKET_NAME
        self.token = launch.code_token()
        self.started = time.time()
        self.children: set[int] = set()
        self.served = 0
        self.stopping = False
        self.inherited: list[int] = []  # the daemon's own descriptors, which a run's process closes

    def serve(self) -> int:
        self.state.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.state / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("daemon_refused_start state=%s reason=another daemon holds its lock", self.state)
            return 1
        t0 = time.monotonic()
        modules = preload()
        listener = wire.listen(self.path)  # a socket file there is a killed daemon's: the lock says none runs
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        self.inherited = [lock, listener.fileno(), selector.fileno()]
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        log.info(
            "daemon_started pid=%d socket=%s modules=%d seconds=%.2f",
            os.getpid(),
            self.path,
            modules,
            time.monotonic() - t0,
        )
        try:
            while not self.stopping:
                self._reap()
                if self.pool and self.keeper is None and time.monotonic() >= self.keeper_due:
                    self._start_keeper()
                if not selector.select(timeout=0.5):
                    continue
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                with conn:
                    self._handle(conn)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            listener.close()
            self._stop_keeper()
            log.info("daemon_stopped pid=%d served=%d active=%d", os.getpid(), self.served, len(self.children))
        return 0

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _start_keeper(self) -> None:
        daemon = os.getpid()  # taken before the fork: in the child, a daemon already gone would read as init
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd in self.inherited:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                from agent_sandbox.fleet import pool

                # Killed, the daemon takes its keeper with it: a keeper nobody can reach would hold its slots
                # (and their locks, which keep `sandbox gc` off them) for good. SIGTERM: its slots are removed.
                _die_with_parent(signal.SIGTERM)
                code = pool.main(self.pool, parent=daemon)
            except BaseException:
                log.exception("pool_keeper_failed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.keeper, self.keeper_since = pid, time.monotonic()
        log.info("daemon_keeper_started pid=%d size=%d", pid, self.pool)

    def _stop_keeper(self) -> None:
        """SIGTERM to the keeper, which removes the slots nobody claimed, and wait for it."""
        if self.keeper is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.keeper, signal.SIGTERM)
        deadline = time.monotonic() + KEEPER_STOP_WAIT
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.keeper, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            log.warning("daemon_keeper_killed pid=%d after=%.0fs", self.keeper, KEEPER_STOP_WAIT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.keeper, signal.SIGKILL)
            os.waitpid(self.keeper, 0)
        self.keeper = None

    def _reap(self) -> None:
        if self.keeper is not None:
            done, status = os.waitpid(self.keeper, os.WNOHANG)
            if done:
                # One that kept failing (no engine yet, say) is tried less and less often; one that lived a while
                # is started again soon.
                lived = time.monotonic() - self.keeper_since
                self.keeper_failures = 0 if lived > KEEPER_STEADY else self.keeper_failures + 1
                wait = min(KEEPER_RESTART * 2 ** max(0, self.keeper_failures - 1), KEEPER_RESTART_MAX)
                log.warning("daemon_keeper_ended pid=%d status=%d restart_in=%.0fs", done, status, wait)
                self.keeper, self.keeper_due = None, time.monotonic() + wait
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.children.discard(pid)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        fds: list[int] = []
        try:
            if wire.peer_uid(conn) != os.getuid():
                log.warning("daemon_refused reason=peer of another user")
                return
            request, fds = wire.receive(conn, max_fds=3)
            if request is None:
                return
            if request.get("ping"):
                self._reap()
                wire.send(conn, self.status())
                return
            if request.get("stop"):
                self.stopping = True
                wire.send(conn, {"stopping": True})
                return
            if request.get("token") != self.token:
                wire.send(
                    conn,
                    {"accepted": False, "stale": True, "why": "it runs other code than this command (started earlier)"},
                )
                return
            why = _valid_run(request)
            if why is None and len(fds) != 3:
                why = "the request did not carry the three standard streams"
            if why is not None:
                log.warning("daemon_refused reason=%s", why)
                wire.send(conn, {"accepted": False, "why": why})
                return
            pid = os.fork()
            if pid == 0:
                for fd in self.inherited:  # its lock above all: a run must not keep a new daemon from starting
                    with contextlib.suppress(OSError):
                        os.close(fd)
                _become_run(conn, request, fds)  # never returns
            self.children.add(pid)
            self.served += 1
            log.info("daemon_run pid=%d cwd=%s", pid, request["cwd"])
        except Exception as exc:  # whatever a request does, the daemon goes on serving
            log.warning("daemon_request_failed error=%r", exc)
        finally:
            for fd in fds:
                os.close(fd)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "token": self.token,
            "since": self.started,
            "served": self.served,
            "active": len(self.children),
            "socket": str(self.path),
            "pool_size": self.pool,
            "keeper": self.keeper,
        }


def _die_with_parent(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("pdeathsig_unavailable error=%s", os.strerror(ctypes.get_errno()))


def _become_run(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked child: become the client's `sandbox run`, then send its exit code and exit."""
    code = 1
    try:
        os.setpgid(0, 0)  # the daemon's own signals (its stop) are not the run's
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=os.isatty(1))
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        from agent_sandbox.cli import main as cli
        from agent_sandbox.interrupts import interrupts

        cli.renew_consoles()
        later.enable()
        if cli._command(sys.argv) in cli.RUNNING_COMMANDS:
            interrupts.install()
        conn.settimeout(None)
        wire.send(conn, {"accepted": True, "pid": os.getpid()})
        threading.Thread(target=_client_watch, args=(conn,), name="client", daemon=True).start()
        code = cli.exit_code(os.path.basename(sys.argv[0]) or "sandbox")
    except BaseException as exc:  # reported to the client's stderr; the exit status still reaches it
        with contextlib.suppress(Exception):
            os.write(2, f"sandbox: the daemon's run process failed: {exc!r}\n".encode())
    ANSWERED.set()
    with contextlib.suppress(OSError):
        wire.send(conn, {"exit": code})
    # The client has its answer; what the run left for after it (run/later.py: its removal) runs now, with the
    # client's streams let go, so that a pipe it printed into ends too.
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        conn.close()
    with contextlib.suppress(BaseException):
        later.run_all()
    logging.shutdown()
    os._exit(code)


def _client_watch(conn: socket.socket) -> None:
    """The client's signals, passed on to this process; its end (killed, its terminal gone) stops the run as
    a SIGTERM would."""
    while True:
        try:
            message, _ = wire.receive(conn)
        except (OSError, ValueError):
            message = None
        if ANSWERED.is_set():
            return
        if message is None:
            log.info("daemon_client_gone pid=%d", os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)
            return
        name = message.get("signal")
        if name in ("SIGINT", "SIGTERM", "SIGHUP"):
            os.kill(os.getpid(), signal.Signals[name])


# The commands: start, stop, restart and status.


def ask(state: Path, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any] | None:
    """The daemon's answer to one message, or None when none is listening."""
    try:
        return wire.request(state / launch.SOCKET_NAME, message, timeout)[0]
    except (OSError, ValueError):
        return None


def start(state: Path, pool: int = POOL_DEFAULT) -> tuple[dict[str, Any], bool]:
    """Start a daemon for this state directory unless one runs: (its status, whether it was started now).
    RuntimeError when it did not come up."""
    running = ask(state, {"ping": True})
    if running is not None:
        return running, False
    state.mkdir(parents=True, exist_ok=True)
    logfile = open(state / LOG_NAME, "ab")  # noqa: SIM115 - the daemon's, handed over below
    with logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent_sandbox.cli.daemon", "--pool", str(pool)],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        status = ask(state, {"ping": True})
        if status is not None:
            return status, True
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
    tail = (state / LOG_NAME).read_text(errors="replace").splitlines()[-5:]
    raise RuntimeError("the daemon did not start: " + (" | ".join(tail) or "no output"))


def stop(state: Path) -> dict[str, Any] | None:
    """Stop the daemon of this state directory, once its pool's keeper has removed the slots nobody claimed; its
    last status, or None when none ran. Runs it started go on to their end."""
    status = ask(state, {"ping": True})
    if status is None:
        return None
    ask(state, {"stop": True})
    pid = int(status["pid"])
    deadline = time.monotonic() + KEEPER_STOP_WAIT + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return status
        if _zombie(pid):
            return status
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return status


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def describe(status: dict[str, Any]) -> str:
    current = status.get("token") == launch.code_token()
    return (
        f"pid {status['pid']}, up {time.time() - float(status['since']):.0f}s, {status['served']} runs served, "
        f"{status['active']} running; socket {status['socket']}"
        + ("" if current else "; runs OTHER code than this command (restart it)")
        + _pool_line()
    )


def _pool_line() -> str:
    from agent_sandbox.fleet.pool import status as pool_status

    pool = pool_status()
    if pool is None:
        return "; no pool"
    return f"; pool {pool['ready']}/{pool['size']} ready, {pool['claimed']} claimed"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    pool = int(argv[argv.index("--pool") + 1]) if "--pool" in argv else POOL_DEFAULT
    return Daemon(launch.state_dir(), pool).serve()


def status_json(status: dict[str, Any] | None) -> str:
    if status is None:
        return json.dumps({"running": False})
    from agent_sandbox.fleet.pool import status as pool_status

    return json.dumps(
        {"running": True, **status, "current": status.get("token") == launch.code_token(), "pool": pool_status()}
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
