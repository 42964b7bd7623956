"""The warm daemon without Docker: the wire format (wire.py), the entry point's hand-off (cli/launch.py) against
a fake daemon, and a real `sandbox daemon start --pool 0` (cli/daemon.py), which starts no pool and so needs no
engine: what it refuses, what it survives, and a run handed to it that ends before it needs Docker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox import wire
from agent_sandbox.cli import daemon, launch

from .conftest import alive

# The console script: `python -m agent_sandbox.cli` is the CLI itself, which hands nothing to a daemon.
SANDBOX_BIN = Path(sys.executable).with_name("sandbox")
NOBODY = 65534


def _interpreter_of(script: Path) -> Path:
    first = script.read_text().splitlines()[0]
    return Path(first.removeprefix("#!").strip())


@pytest.fixture
def short_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory with a short path (a Unix socket's path has room for about 100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="sbxu-", dir="/tmp"))
    state = root / "state"
    state.mkdir()
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(state))
    monkeypatch.delenv(wire.DAEMON_ENV, raising=False)
    yield state
    shutil.rmtree(root, ignore_errors=True)


def _env(state: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != wire.DAEMON_ENV}
    return {**env, "SANDBOX_STATE_DIR": str(state), **extra}


def _cli(state: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SANDBOX_BIN), *args],
        capture_output=True,
        text=True,
        env=_env(state, **env),
        cwd=cwd or state,
        timeout=120,
    )


def _ask(state: Path, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(state / launch.SOCKET_NAME))
        wire.send(sock, message, fds)
        answer, _ = wire.receive(sock)
        return answer


def _daemon_runs(state: Path) -> int:
    log = state / daemon.LOG_NAME
    return log.read_text().count("daemon_run ") if log.exists() else 0


@pytest.fixture
def pool0_daemon(short_state: Path) -> Iterator[dict[str, Any]]:
    """A real daemon (no pool) for this state directory; stopped, and its process gone, at the end."""
    res = _cli(short_state, "daemon", "start", "--pool", "0", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    status = json.loads(res.stdout)
    assert status["running"] and status["keeper"] is None and status["pool_size"] == 0
    try:
        yield status
    finally:
        _cli(short_state, "daemon", "stop")
        deadline = time.monotonic() + 15
        while alive(status["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(status["pid"]):
            os.kill(status["pid"], signal.SIGKILL)
            pytest.fail(f"the daemon {status['pid']} outlived `sandbox daemon stop`")


@pytest.fixture
def null_fds() -> Iterator[list[int]]:
    fds = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
    yield fds
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- wire.py ----------------------------------------------------------------------------------------------


def test_wire_round_trip_with_descriptors() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    got: list[int] = []
    try:
        wire.send(a, {"text": "héllo", "n": [1, 2, {"x": None}]}, [w, r])
        wire.send(a, {"second": True})  # back to back, no descriptors: the framing keeps them apart
        wire.send(a, {})
        message, got = wire.receive(b, max_fds=3)
        assert message == {"text": "héllo", "n": [1, 2, {"x": None}]}
        assert len(got) == 2 and not {w, r} & set(got)
        # The descriptors received are the pipe's two ends.
        os.write(got[0], b"through the copy")
        assert os.read(r, 100) == b"through the copy"
        os.write(w, b"back")
        assert os.read(got[1], 100) == b"back"
        assert wire.receive(b) == ({"second": True}, [])
        assert wire.receive(b, max_fds=3) == ({}, [])
        a.close()
        assert wire.receive(b) == (None, [])  # the end of the stream
        assert wire.receive(b, max_fds=3) == (None, [])
    finally:
        for fd in (r, w, *got):
            with contextlib.suppress(OSError):
                os.close(fd)
        a.close()
        b.close()


def test_wire_refuses_oversize_messages_both_ways() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="too large"):
            wire.send(a, {"x": "y" * wire.MAX_MESSAGE})
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing of the refused message was sent
        b.setblocking(True)
        # A header announcing more than the limit is refused before anything is read or allocated.
        a.sendall(struct.pack(">I", wire.MAX_MESSAGE + 1) + b"{}")
        with pytest.raises(ValueError, match=str(wire.MAX_MESSAGE + 1)):
            wire.receive(b)
    finally:
        a.close()
        b.close()


def test_wire_takes_a_message_exactly_at_the_limit() -> None:
    a, b = socket.socketpair()
    filler = "z" * (wire.MAX_MESSAGE - len(json.dumps({"x": ""})))
    assert len(json.dumps({"x": filler}).encode()) == wire.MAX_MESSAGE
    sender = threading.Thread(target=wire.send, args=(a, {"x": filler}))
    sender.start()
    try:
        message, _ = wire.receive(b)
        assert message == {"x": filler}
    finally:
        sender.join(30)
        a.close()
        b.close()


@pytest.mark.parametrize(
    "raw,outcome",
    [
        (struct.pack(">I", 10) + b'{"a"', None),  # cut short: the end of the stream
        (b"\x00\x00", None),  # a header cut short
        (struct.pack(">I", 5) + b"[1,2]", ValueError),  # not an object
        (struct.pack(">I", 7) + b"{nope}!", ValueError),  # not JSON
        (struct.pack(">I", 2) + b"\xff\xfe", ValueError),  # not text
    ],
)
def test_wire_bad_input(raw: bytes, outcome: type[Exception] | None) -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        if outcome is None:
            assert wire.receive(b) == (None, [])
        else:
            with pytest.raises(outcome):
                wire.receive(b)
    finally:
        a.close()
        b.close()


def test_wire_refuses_deeply_nested_json_as_bad_input() -> None:
    a, b = socket.socketpair()
    body = b"[" * 100_000 + b"]" * 100_000
    sender = threading.Thread(target=a.sendall, args=(struct.pack(">I", len(body)) + body,))
    sender.start()
    try:
        with pytest.raises(ValueError):
            wire.receive(b)
    finally:
        sender.join(30)
        a.close()
        b.close()


# --- launch.py: when nothing is handed over -----------------------------------------------------------------


@pytest.fixture
def listening(short_state: Path) -> Iterator[socket.socket]:
    """Something listening where the daemon's socket is, which never answers: whoever connects is queued."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(short_state / launch.SOCKET_NAME))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def _nobody_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def test_hand_off_without_a_socket(short_state: Path) -> None:
    assert not (short_state / launch.SOCKET_NAME).exists()
    assert launch.hand_off(["sandbox", "run", "--task", "t"]) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["sandbox", "ls"],
        ["sandbox", "daemon", "status"],
        ["sandbox", "gc", "run"],  # `run` as an argument of another command
        ["sandbox"],
        ["sandbox", "--version"],
        ["sandbox", "show", "--json", "run"],
    ],
)
def test_hand_off_only_for_run(argv: list[str], listening: socket.socket) -> None:
    assert launch.hand_off(argv) is None
    assert _nobody_connected(listening)


def test_hand_off_off_by_environment(listening: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(wire.DAEMON_ENV, "off")
    assert launch.hand_off(["sandbox", "run", "--task", "t"]) is None
    assert _nobody_connected(listening)
    # Anything else than `off` leaves it on: the client connects (and, unanswered, gives up after its timeout).
    monkeypatch.setenv(wire.DAEMON_ENV, "on")
    monkeypatch.setattr(launch, "ACCEPT_TIMEOUT", 0.3)
    assert launch.hand_off(["sandbox", "-v", "run", "--task", "t"]) is None
    assert not _nobody_connected(listening)


def test_hand_off_with_a_dead_socket_or_a_plain_file(short_state: Path) -> None:
    path = short_state / launch.SOCKET_NAME
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a daemon that was killed
    assert path.exists()
    t0 = time.monotonic()
    assert launch.hand_off(["sandbox", "run"]) is None
    assert time.monotonic() - t0 < 2
    path.unlink()
    path.write_text("not a socket")
    assert launch.hand_off(["sandbox", "run"]) is None


# --- launch.py against a fake daemon ------------------------------------------------------------------------


class FakeDaemon:
    """Listens on the daemon's socket in a thread; `script(conn, request, fds)` plays the daemon's part."""

    def __init__(self, state: Path, script: Callable[[socket.socket, dict[str, Any], list[int]], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(state / launch.SOCKET_NAME))
        self.sock.listen(1)
        self.sock.settimeout(30)
        self.script = script
        self.request: dict[str, Any] | None = None
        self.fd_stats: list[os.stat_result] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(30)
                self.request, fds = wire.receive(conn, max_fds=3)
                self.fd_stats = [os.fstat(fd) for fd in fds]
                try:
                    assert self.request is not None
                    self.script(conn, self.request, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self) -> None:
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def keep_signals() -> Iterator[None]:
    """hand_off's follow-up installs handlers for the signals it forwards: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in launch.FORWARDED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_hand_off_sends_the_command_and_returns_its_exit(short_state: Path, keep_signals: None, tmp_path) -> None:
    def script(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        wire.send(conn, {"accepted": True, "pid": 1})
        wire.send(conn, {"progress": "ignored"})  # anything but an exit code is no end
        wire.send(conn, {"exit": "7"})  # nor is an exit that is no number
        wire.send(conn, {"exit": 7})

    fake = FakeDaemon(short_state, script)
    old_umask = os.umask(0o027)
    os.umask(old_umask)
    argv = ["sandbox", "run", "--task", "a task with spaces", "--json"]
    code = launch.hand_off(argv)
    fake.join()
    assert code == 7
    req = fake.request
    assert req is not None
    assert req["argv"] == argv
    assert req["cwd"] == os.getcwd()
    assert req["env"] == dict(os.environ)
    assert req["umask"] == old_umask
    assert req["token"] == launch.code_token()
    # The three descriptors are this process's own standard streams, not copies of their content.
    assert len(fake.fd_stats) == 3
    for fd, st in enumerate(fake.fd_stats):
        mine = os.fstat(fd)
        assert (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@pytest.mark.parametrize(
    "answer,message",
    [
        ({"accepted": False, "stale": True, "why": "other code"}, "restart it: sandbox daemon restart"),
        ({"accepted": False, "why": "busy"}, None),
        (None, None),  # the daemon hung up without an answer
    ],
)
def test_hand_off_refused_runs_here(short_state: Path, capsys, answer, message, keep_signals: None) -> None:
    def script(conn: socket.socket, _request: dict[str, Any], _fds: list[int]) -> None:
        if answer is not None:
            wire.send(conn, answer)

    fake = FakeDaemon(short_state, script)
    assert launch.hand_off(["sandbox", "run"]) is None
    fake.join()
    err = capsys.readouterr().err
    if message:
        assert message in err and "other code" in err
    else:
        assert err == ""


def test_code_token_follows_the_package_and_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    token = launch.code_token()
    assert token == launch.code_token() and len(token) == 64
    monkeypatch.setattr(sys, "executable", sys.executable + "-other")
    assert launch.code_token() != token


CLIENT = "import sys; sys.argv[0] = 'sandbox'; from agent_sandbox.cli.launch import main; main()"


def _client(state: Path, *args: str, shell_redirect: str = "") -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", CLIENT, *args]
    if shell_redirect:
        cmd = ["sh", "-c", f'exec "$0" "$@" {shell_redirect}', *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(state))


def test_client_forwards_its_signals_and_exits_with_the_runs_code(short_state: Path) -> None:
    seen: list[str] = []
    accepted = threading.Event()

    def script(conn: socket.socket, _request: dict[str, Any], _fds: list[int]) -> None:
        wire.send(conn, {"accepted": True, "pid": 1})
        accepted.set()
        for _ in range(3):
            message, _ = wire.receive(conn)
            assert message is not None
            seen.append(message["signal"])
        wire.send(conn, {"exit": 130})

    fake = FakeDaemon(short_state, script)
    proc = _client(short_state, "run", "--task", "t")
    try:
        assert accepted.wait(30)
        time.sleep(0.3)  # its handlers are installed right after the answer
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            proc.send_signal(sig)
            time.sleep(0.2)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    fake.join()
    assert seen == ["SIGINT", "SIGTERM", "SIGHUP"]
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_client_whose_run_vanishes_exits_1(short_state: Path) -> None:
    def script(conn: socket.socket, _request: dict[str, Any], _fds: list[int]) -> None:
        wire.send(conn, {"accepted": True, "pid": 1})  # then hangs up: the run's process died

    fake = FakeDaemon(short_state, script)
    proc = _client(short_state, "run")
    _out, err = proc.communicate(timeout=30)
    fake.join()
    assert proc.returncode == 1
    assert "ended without an exit status" in err


def test_client_with_closed_stdin_sends_dev_null(short_state: Path) -> None:
    def script(conn: socket.socket, _request: dict[str, Any], _fds: list[int]) -> None:
        wire.send(conn, {"accepted": False, "why": "only looking"})

    fake = FakeDaemon(short_state, script)
    # `run --help` refused by the fake daemon runs in the client itself: it prints its help and exits 0.
    proc = _client(short_state, "run", "--help", shell_redirect="<&-")
    _out, err = proc.communicate(timeout=60)
    fake.join()
    assert proc.returncode == 0, err
    stdin = fake.fd_stats[0]
    assert stat.S_ISCHR(stdin.st_mode) and stdin.st_rdev == os.stat(os.devnull).st_rdev, stat.filemode(stdin.st_mode)


# --- cli/daemon.py ------------------------------------------------------------------------------------------

GOOD = {"argv": ["sandbox", "run", "--task", "t"], "env": {"A": "b"}, "cwd": "/", "umask": 0o022}


@pytest.mark.parametrize(
    "change,why",
    [
        ({}, None),
        ({"argv": ["sandbox", "-v", "run"]}, None),
        ({"argv": "sandbox run"}, "argv is not a list of strings"),
        ({"argv": []}, "argv is not a list of strings"),
        ({"argv": ["sandbox", "run", 3]}, "argv is not a list of strings"),
        ({"argv": ["sandbox", "ls"]}, "the daemon runs only run"),
        ({"argv": ["sandbox", "daemon", "stop"]}, "the daemon runs only run"),
        ({"argv": ["sandbox"]}, "the daemon runs only run"),
        ({"env": ["A=b"]}, "env is not a map of strings"),
        ({"env": {"A": 1}}, "env is not a map of strings"),
        ({"env": None}, "env is not a map of strings"),
        ({"cwd": "relative/dir"}, "cwd is not an absolute path"),
        ({"cwd": 5}, "cwd is not an absolute path"),
        ({"umask": -1}, "umask is not a mode"),
        ({"umask": 0o1000}, "umask is not a mode"),
        ({"umask": "022"}, "umask is not a mode"),
        ({"umask": None}, "umask is not a mode"),
    ],
)
def test_valid_run(change: dict[str, Any], why: str | None) -> None:
    assert daemon._valid_run({**GOOD, **change}) == why


def test_daemon_refuses_what_it_cannot_run(short_state: Path, pool0_daemon: dict[str, Any], null_fds) -> None:
    path = short_state / launch.SOCKET_NAME
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600 and stat.S_ISSOCK(path.lstat().st_mode)
    token = pool0_daemon["token"]
    good = {**GOOD, "cwd": str(short_state), "env": {"SANDBOX_STATE_DIR": str(short_state)}}

    stale = _ask(short_state, {**good, "token": "0" * 64}, null_fds)
    assert stale is not None and stale["accepted"] is False and stale["stale"] is True
    no_token = _ask(short_state, good, null_fds)
    assert no_token is not None and no_token["stale"] is True

    def refused(request: dict[str, Any], fds: list[int] | None = null_fds) -> str:
        answer = _ask(short_state, {**request, "token": token}, fds)
        assert answer is not None and answer["accepted"] is False and not answer.get("stale"), answer
        return str(answer["why"])

    assert "three standard streams" in refused(good, None)
    assert "three standard streams" in refused(good, null_fds[:2])
    assert refused({**good, "argv": ["sandbox", "ls"]}) == "the daemon runs only run"
    assert refused({**good, "argv": "sandbox run"}) == "argv is not a list of strings"
    assert refused({**good, "env": {"A": 1}}) == "env is not a map of strings"
    assert refused({**good, "cwd": "rel"}) == "cwd is not an absolute path"
    assert refused({**good, "umask": 0o7777}) == "umask is not a mode"
    # Unknown requests are refused like a run with no token.
    assert _ask(short_state, {"hello": True}) == {
        "accepted": False,
        "stale": True,
        "why": "it runs other code than this command (started earlier)",
    }
    status = _ask(short_state, {"ping": True})
    assert status is not None
    assert (status["pid"], status["served"], status["active"]) == (pool0_daemon["pid"], 0, 0)
    assert _daemon_runs(short_state) == 0
    assert (short_state / daemon.LOG_NAME).read_text().count("daemon_refused ") == 7


def _garbage(state: Path, raw: bytes, wait: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(str(state / launch.SOCKET_NAME))
        with contextlib.suppress(OSError):
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        if not wait:
            return b""
        try:
            return sock.recv(1 << 16)
        except OSError:
            return b""


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"\x00\x01", id="half-a-header"),
        pytest.param(struct.pack(">I", 0xFFFFFFFF), id="4GiB-announced"),
        pytest.param(struct.pack(">I", 9) + b"not json!", id="not-json"),
        pytest.param(struct.pack(">I", 2) + b"[]", id="an-array"),
        pytest.param(struct.pack(">I", 4) + b"null", id="null"),
        pytest.param(struct.pack(">I", 100) + b'{"ping": true}', id="cut-short"),
        pytest.param(
            struct.pack(">I", 200_000) + b"[" * 100_000 + b"]" * 100_000,
            id="deeply-nested",
        ),
    ],
)
def test_daemon_survives_garbage_on_its_socket(short_state: Path, pool0_daemon: dict[str, Any], raw: bytes) -> None:
    assert _garbage(short_state, raw) == b""  # no answer to any of it
    status = _ask(short_state, {"ping": True})
    assert status is not None and status["pid"] == pool0_daemon["pid"], "the daemon did not survive"
    assert status["served"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_daemon_refuses_a_peer_of_another_user(short_state: Path, pool0_daemon: dict[str, Any]) -> None:
    # Only the mode keeps other users out; open it (and the way to it) to reach the daemon's own check.
    path = short_state / launch.SOCKET_NAME
    for d in (short_state.parent, short_state):
        os.chmod(d, 0o755)
    os.chmod(path, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: another user, a ping, and what came back
        code = 0
        try:
            os.close(r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                body = b'{"ping": true}'
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(struct.pack(">I", len(body)) + body)
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:  # closed with the ping unread: no answer either
                    data = b""
            os.write(w, b"answered:" + data if data else b"no answer")
        except BaseException as exc:
            os.write(w, f"error:{exc!r}".encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    outcome = os.read(r, 1 << 16).decode(errors="replace")
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0, outcome
    assert outcome == "no answer"
    assert "daemon_refused reason=peer of another user" in (short_state / daemon.LOG_NAME).read_text()
    assert _ask(short_state, {"ping": True}) is not None


def test_daemon_runs_a_handed_off_run_like_the_cli(short_state: Path, pool0_daemon: dict[str, Any]) -> None:
    """A run that ends before it needs Docker (its repository does not exist): the same exit code and message
    from the daemon's process as from the CLI run here, through the client's own streams."""
    missing = str(short_state / "no-such-repo")
    handed = _cli(short_state, "run", "--repo", missing, "--task", "t", "--json")
    here = _cli(short_state, "run", "--repo", missing, "--task", "t", "--json", SANDBOX_DAEMON="off")
    assert handed.returncode == here.returncode == 2, handed.stderr + here.stderr
    assert f"repository path does not exist: {missing}" in handed.stderr
    assert handed.stderr == here.stderr and handed.stdout == here.stdout
    assert _daemon_runs(short_state) == 1
    status = _ask(short_state, {"ping": True})
    assert status is not None and status["served"] == 1
    # The working directory is the client's: a relative repository path is resolved there.
    sub = short_state / "sub"
    sub.mkdir()
    (sub / "plain").write_text("a file")
    rel = _cli(short_state, "run", "--repo", "plain", "--task", "t", cwd=sub)
    assert rel.returncode == 2 and "Directory 'plain' is a file" in rel.stderr, rel.stderr
    # So is the environment (the daemon's own has no such setting).
    script = short_state / "script.yaml"
    script.write_text("turns:\n  - text: done\n")
    repo = sub / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    who = ["-c", "user.name=t", "-c", "user.email=t@e.invalid"]
    subprocess.run(["git", "-C", str(repo), *who, "commit", "-q", "--allow-empty", "-m", "init"], check=True)
    env = _cli(
        short_state,
        "run",
        "--repo",
        "repo",
        "--task",
        "t",
        "--model-script",
        str(script),
        cwd=sub,
        SANDBOX_DAILY_BUDGET_USD="lots",
    )
    assert env.returncode == 2 and "SANDBOX_DAILY_BUDGET_USD='lots' is not a number" in env.stderr, env.stderr
    assert _daemon_runs(short_state) == 3


def test_daemon_prints_help_to_the_clients_stdout(short_state: Path, pool0_daemon: dict[str, Any]) -> None:
    res = _cli(short_state, "run", "--help")
    assert res.returncode == 0, res.stderr
    assert "--model-script" in res.stdout and res.stderr == ""
    assert _daemon_runs(short_state) == 1


def test_daemon_help_names_the_sandbox_command(short_state: Path, pool0_daemon: dict[str, Any]) -> None:
    handed = _cli(short_state, "run", "--bogus-option")
    here = _cli(short_state, "run", "--bogus-option", SANDBOX_DAEMON="off")
    assert _daemon_runs(short_state) == 1
    assert handed.returncode == here.returncode == 2
    assert handed.stderr == here.stderr, handed.stderr


def test_stale_client_runs_the_command_itself(short_state: Path, pool0_daemon: dict[str, Any]) -> None:
    """A client on another interpreter path runs other code as far as the daemon knows: refused as stale, it
    says so and runs the CLI itself."""
    script_python = _interpreter_of(SANDBOX_BIN)
    others = [p for p in script_python.parent.glob("python*") if p.name != script_python.name and os.access(p, os.X_OK)]
    if not others:
        pytest.skip(f"no other name for {script_python} in its directory")
    missing = str(short_state / "no-such-repo")
    res = subprocess.run(
        [str(others[0]), "-c", CLIENT, "run", "--repo", missing, "--task", "t"],
        capture_output=True,
        text=True,
        env=_env(short_state),
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "the daemon is not used" in res.stderr and "sandbox daemon restart" in res.stderr
    assert "repository path does not exist" in res.stderr
    assert _daemon_runs(short_state) == 0
    status = _ask(short_state, {"ping": True})
    assert status is not None and status["served"] == 0


def test_one_daemon_per_state_directory(short_state: Path, pool0_daemon: dict[str, Any]) -> None:
    again = _cli(short_state, "daemon", "start", "--pool", "0", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["pid"] == pool0_daemon["pid"]
    assert "already running" in _cli(short_state, "daemon", "start", "--pool", "0").stdout
    # A second daemon process started by hand finds the lock taken and ends at once, leaving the socket be.
    second = subprocess.run(
        [str(_interpreter_of(SANDBOX_BIN)), "-m", "agent_sandbox.cli.daemon", "--pool", "0"],
        capture_output=True,
        text=True,
        env=_env(short_state),
        timeout=60,
    )
    assert second.returncode == 1
    assert "another daemon holds its lock" in second.stderr
    status = _ask(short_state, {"ping": True})
    assert status is not None and status["pid"] == pool0_daemon["pid"]
    listed = json.loads(_cli(short_state, "daemon", "status", "--json").stdout)
    assert listed["running"] is True and listed["current"] is True and listed["pool"] is None


def test_daemon_stop_removes_its_socket(short_state: Path, pool0_daemon: dict[str, Any]) -> None:
    res = _cli(short_state, "daemon", "stop", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["pid"] == pool0_daemon["pid"]
    assert not alive(pool0_daemon["pid"])
    assert not (short_state / launch.SOCKET_NAME).exists()
    assert json.loads(_cli(short_state, "daemon", "status", "--json").stdout) == {"running": False}
    assert "no daemon is running" in _cli(short_state, "daemon", "stop").stdout
    # With no daemon, `run` is the CLI's own again.
    res = _cli(short_state, "run", "--help")
    assert res.returncode == 0 and "Usage: sandbox run" in res.stdout
    assert _daemon_runs(short_state) == 0


class _Status:
    running = True


class _Handle:
    def status(self, role: str) -> _Status:
        return _Status()


class _Backend:
    name = "docker"

    def engine_id(self) -> str:
        return "engine-a"


class _Lock:
    def release(self) -> None:
        pass


def test_keeper_hands_out_only_a_slot_made_on_the_claimants_engine_image_hosts_and_agent() -> None:
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.config.policy import Policy
    from agent_sandbox.fleet.pool import Keeper, Ready
    from agent_sandbox.run.pool import Slot
    from agent_sandbox.run.workloads import Users, held_shape

    images = ImageSet(agent="agent:1", sidecar="sidecar:1")
    keeper = Keeper(_Backend(), images, 2)  # type: ignore[arg-type]
    assert keeper.engine == "engine-a"
    shape = held_shape(images, Users.here(), Policy())
    tighter = Policy.model_validate({"limits": {"memory": "256m"}})
    assert held_shape(images, Users.here(), tighter) != shape  # another policy's limits: another container

    def slot(
        run_id: str,
        engine: str,
        image: str = "sidecar:1",
        hosts: dict[str, str] | None = None,
        agent: dict[str, Any] | None = None,
    ) -> Ready:
        made = Slot(
            run_id=run_id,
            run_dir=f"/x/{run_id}",
            sidecar_image=image,
            hosts=hosts or {},
            engine=engine,
            networks=[],
            agent=agent,
        )
        return Ready(made, _Handle(), _Lock())  # type: ignore[arg-type]

    keeper.ready = [
        slot("on-b", "engine-b"),
        slot("old-image", "engine-a", image="sidecar:0"),
        slot("hosts", "engine-a", hosts={"a": "1.2.3.4"}),
        slot("agent", "engine-a", agent=held_shape(images, Users.here(), tighter)),
    ]
    want = {"sidecar_image": "sidecar:1", "hosts": {}, "engine": "engine-a", "agent": shape}
    # None fits: another engine's, another image's, other host names, an agent made to another policy.
    assert keeper.take(want) is None
    assert keeper.take({**want, "agent": None}) is None  # nor a slot's agent to a run that starts its own
    keeper.ready.pop()
    keeper.ready.append(slot("fits", "engine-a", agent=shape))
    taken = keeper.take(want)
    assert taken is not None and taken.slot.run_id == "fits"
    assert [r.slot.run_id for r in keeper.ready] == ["on-b", "old-image", "hosts"]
    assert keeper.take({**want, "engine": "engine-b", "agent": None}).slot.run_id == "on-b"  # type: ignore[union-attr]


class _SlotHandle:
    """A run handle whose sidecar 'starts' (its held marker written) and whose agent's start fails."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def prepare(self) -> list[dict[str, Any]]:
        return []

    def start(self, workload: Any, hold: bool = False) -> Any:
        from agent_sandbox.backend.plan import Started
        from agent_sandbox.sidecar.contract import HELD_MARKER

        if workload.role == "agent":
            raise RuntimeError("mounts on the run directory do not reach the container's /workspace")
        (self.run_dir / "model" / HELD_MARKER).touch()
        return Started(security={})

    def status(self, role: str) -> _Status:
        return _Status()

    def teardown(self) -> list[str]:
        return []


class _SlotBackend(_Backend):
    def open_run(self, plan: Any) -> _SlotHandle:
        from agent_sandbox.paths import runs_dir

        return _SlotHandle(runs_dir() / plan.run_id)


@pytest.mark.skipif(os.geteuid() != 0, reason="the held agent's mount points need root")
def test_keeper_goes_on_without_agent_containers_where_they_cannot_be_made(tmp_path: Path, monkeypatch) -> None:
    from agent_sandbox.backend.plan import ImageSet
    from agent_sandbox.fleet.pool import AGENT_ATTEMPTS, Keeper

    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path / "state"))
    keeper = Keeper(_SlotBackend(), ImageSet(agent="agent:1", sidecar="sidecar:1"), 1)  # type: ignore[arg-type]
    keeper.agents = True  # whatever this machine's overlay says: the failure below is the point
    for _ in range(AGENT_ATTEMPTS):
        with pytest.raises(RuntimeError, match="do not reach"):
            keeper.make()
    assert keeper.agents is False
    # Each failed slot went whole: its directory, and the mount points made for its agent.
    runs = tmp_path / "state" / "runs"
    assert list(runs.iterdir()) == []
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    ready = keeper.make()
    assert ready.slot.agent is None and ready.slot.agent_started is None
    assert not (Path(ready.slot.run_dir) / "host-objects").exists()
    keeper.remove(ready)
    assert list(runs.iterdir()) == []


def test_peer_groups_reads_the_topmost_mount_of_each_point() -> None:
    from agent_sandbox.backend.docker import _peer_groups

    info = "\n".join(
        [
            "97 80 254:0 /r/ws /workspace rw,relatime master:3 - ext4 /dev/vda rw",
            "60 97 0:50 / /workspace rw,relatime master:6 shared:9 - overlay o rw",
            "98 80 254:0 /r/o /sandbox/host\\040objects ro,relatime - ext4 /dev/vda rw",
            "garbage line",
        ]
    )
    assert _peer_groups(info, "master") == {"/workspace": {"6"}, "/sandbox/host\\040objects": set()}
    assert _peer_groups(info, "shared") == {"/workspace": {"9"}, "/sandbox/host\\040objects": set()}
