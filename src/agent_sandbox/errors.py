"""Errors the CLI turns into a message and a distinct exit code, and the exit codes of a finished run."""

from __future__ import annotations

import errno
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is slow to import, and the CLI imports this before taking over signals
    from pydantic import ValidationError


class ExitCode(IntEnum):
    """Process exit codes of `sandbox`; documented in docs/cli.md."""

    OK = 0
    INTERNAL = 1  # a bug: an exception nobody expected
    USAGE = 2  # bad input: options, paths, policy, script (click uses 2 for usage errors too)
    ENVIRONMENT = 3  # Docker not reachable, images not built, tools missing
    AUDIT_BROKEN = 4  # `sandbox audit verify` found the hash chain broken
    ERROR = 10  # the run ended with reason `error`
    TIMEOUT = 11
    IDLE = 12
    BUDGET = 13
    TURNS = 14
    POLICY = 15
    HANDOFF = 16  # the run succeeded but the push or pull request it asked for failed; the branch is kept
    CHECK = 17  # the check command failed on the agent's work
    SWEEP_INCOMPLETE = 18  # a sweep in which some repository failed (for a reason other than no changes needed)
    INTERRUPTED = 130  # SIGINT/SIGTERM to the supervisor, as shells report Ctrl-C


class SandboxError(Exception):
    """An error with a message meant for the user and the exit code to leave with."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def validation_message(exc: ValidationError, source: str) -> str:
    """Every error of a pydantic validation, one line each, as `source: key.path: what is wrong`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


class UsageError(SandboxError):
    """Bad input from the user; nothing has been created."""

    exit_code = ExitCode.USAGE


class EnvironmentNotReady(SandboxError):
    """The machine lacks something the run needs (Docker engine, images)."""

    exit_code = ExitCode.ENVIRONMENT


def disk_full(exc: BaseException) -> bool:
    """Whether an error (an OSError, SQLite's, git's) says that a filesystem is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left on device" in text or "database or disk is full" in text or "disk quota exceeded" in text
