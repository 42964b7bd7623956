#!/usr/bin/python3
"""PID 1 of the agent's container: the run's deadline, held where the agent cannot reach it.

    init.py SECONDS COMMAND [ARG...]
    init.py --held HOLD_SECONDS START_FILE COMMAND [ARG...]

Runs COMMAND (the entry point again, then Claude Code) in its own process group, reaps every process the
container orphans, and passes SIGTERM, SIGINT and SIGHUP on to the group (so `docker stop` still reaches Claude
Code). When SECONDS have passed it ends the container by itself, supervisor or not: SIGTERM to every
process, SIGKILL ten seconds later, exit 124. Once it exits, the kernel kills whatever is left.

Why PID 1 and not coreutils `timeout` under Docker's init: the agent runs as the same user and could stop a
`timeout` process with SIGSTOP, and a stopped timer never fires. The kernel does not deliver SIGSTOP or SIGKILL
from inside the container to its PID 1, and this process makes itself non-dumpable, so the agent cannot ptrace
it either. A SIGTERM the agent sends it only ends the agent.

With --held (a container the warm pool made before its run, fleet/pool.py) it runs nothing until START_FILE
appears (in /sandbox/in, which the agent can only read), at most HOLD_SECONDS: a JSON object with the run's
deadline (`deadline_s`), the arguments added to COMMAND (`args`), the environment added to its own (`env`),
the directory to start in (`cwd`) and the paths that must exist by then (`require`: the workspace and the
objects the run mounted after this container started). The deadline counts from then.
"""

import contextlib
import ctypes
import json
import os
import signal
import sys
import time

PR_SET_DUMPABLE = 4
GRACE = 10.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


HOLD_POLL = 0.01  # the start is on the run's critical path
NOT_STARTED = 75  # exit status of a held container whose run never came


def wait_for_start(hold_s: float, path: str) -> dict | None:
    """The run's start, once its file is there; None when the hold ran out or a signal ended it."""
    stopped = []
    for sig in FORWARDED:
        signal.signal(sig, lambda *_: stopped.append(1))
    end = time.monotonic() + hold_s
    while not stopped and time.monotonic() < end:
        try:
            with open(path, encoding="utf-8") as f:
                start = json.load(f)
        except FileNotFoundError:
            time.sleep(HOLD_POLL)
            continue
        if not isinstance(start, dict):
            raise ValueError("not a JSON object")
        return start
    return None


def apply_start(start: dict, command: list) -> tuple:
    """The deadline and the full command of a held container's run, its environment and directory set."""
    seconds = float(start["deadline_s"])
    args = start.get("args") or []
    env = start.get("env") or {}
    if not (seconds > 0 and all(isinstance(a, str) for a in args) and isinstance(env, dict)):
        raise ValueError("bad deadline, arguments or environment")
    for name in start.get("require") or []:
        if not os.path.exists(name):
            raise ValueError(f"{name} is not there: the run's mounts did not reach the container")
    for key, value in env.items():
        if not (isinstance(key, str) and isinstance(value, str) and key and "=" not in key):
            raise ValueError(f"bad environment variable {key!r}")
        os.environ[key] = value
    os.environ["SANDBOX_DEADLINE_SECONDS"] = str(int(seconds))
    # Its directory again, by name: a mount made there after this process started is what the run sees.
    os.chdir(start.get("cwd") or os.getcwd())
    return seconds, command + args


def main() -> int:
    held = sys.argv[1:2] == ["--held"]
    try:
        if held:
            hold_s, start_file, command = float(sys.argv[2]), sys.argv[3], sys.argv[4:]
            seconds = hold_s
        else:
            seconds, command = float(sys.argv[1]), sys.argv[2:]
        if not (seconds > 0 and command):
            raise ValueError
    except (IndexError, ValueError):
        sys.stderr.write(
            "init: usage: init.py SECONDS COMMAND [ARG...] | init.py --held HOLD_SECONDS START_FILE COMMAND [ARG...]"
            " (SECONDS > 0)\n"
        )
        return 64
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.stderr.write(f"init: cannot make itself non-dumpable: {os.strerror(ctypes.get_errno())}\n")
        return 70
    if held:
        try:
            start = wait_for_start(hold_s, start_file)
            if start is None:
                return NOT_STARTED
            seconds, command = apply_start(start, command)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            sys.stderr.write(f"init: the run's start ({start_file}) is unusable: {exc}\n")
            return 65
    # SIGCHLD stays pending until sigtimedwait below takes it: the command's end is noticed at once, not at
    # the next poll (the agent's exit is on the run's critical path).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            sys.stderr.write(f"init: {command[0]}: {exc}\n")
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    end = time.monotonic() + seconds
    while True:
        # Reap whatever ended: the command (its status is the container's), and orphans it left to us.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 0
            if pid == 0:
                break
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code  # killed by a signal: as shells report it
        left = end - time.monotonic()
        if left <= 0:
            break
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 1.0))
    sys.stderr.write(f"init: the run's deadline of {seconds:g}s has passed; ending the container\n")
    # Every process but this one; none left (the command ended just now) is no error, nor at the end below.
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)
    stop = time.monotonic() + GRACE
    while time.monotonic() < stop:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.2)
        except ChildProcessError:
            break
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)
    return 124


if __name__ == "__main__":
    sys.exit(main())
