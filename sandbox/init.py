#!/usr/bin/python3
"""PID 1 of the agent's container: the run's deadline, held where the agent cannot reach it.

    init.py SECONDS COMMAND [ARG...]

Runs COMMAND (the entry point again, then Claude Code) in its own process group, reaps every process the
container orphans, and passes SIGTERM, SIGINT and SIGHUP on to the group (so `docker stop` still reaches Claude
Code). When SECONDS have passed it ends the container by itself, supervisor or not: SIGTERM to every
process, SIGKILL ten seconds later, exit 124. Once it exits, the kernel kills whatever is left.

Why PID 1 and not coreutils `timeout` under Docker's init: the agent runs as the same user and could stop a
`timeout` process with SIGSTOP, and a stopped timer never fires. The kernel does not deliver SIGSTOP or SIGKILL
from inside the container to its PID 1, and this process makes itself non-dumpable, so the agent cannot ptrace
it either. A SIGTERM the agent sends it only ends the agent.
"""

import ctypes
import os
import signal
import sys
import time

PR_SET_DUMPABLE = 4
GRACE = 10.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main() -> int:
    try:
        seconds = float(sys.argv[1])
        command = sys.argv[2:]
        if not (seconds > 0 and command):
            raise ValueError
    except (IndexError, ValueError):
        sys.stderr.write("init: usage: init.py SECONDS COMMAND [ARG...] (SECONDS > 0)\n")
        return 64
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.stderr.write(f"init: cannot make itself non-dumpable: {os.strerror(ctypes.get_errno())}\n")
        return 70
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
        try:
            os.killpg(child, signum)
        except ProcessLookupError:
            pass

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
    os.kill(-1, signal.SIGTERM)  # every process but this one
    stop = time.monotonic() + GRACE
    while time.monotonic() < stop:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.2)
        except ChildProcessError:
            break
    os.kill(-1, signal.SIGKILL)
    return 124


if __name__ == "__main__":
    sys.exit(main())
