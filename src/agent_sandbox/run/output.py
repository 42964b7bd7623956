"""The plumbing between a workload's output and the supervisor: lines out of a byte stream in bounded memory,
a backlog that makes a flood wait in its container, and results read back from files a container wrote."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent_sandbox.errors import SandboxError

# The agent's output (stdout and stderr together) is bounded: a longer line is cut (and recorded as cut),
# more output in all ends the run with limit output_flood. Below these bounds no line is lost.
MAX_LINE_BYTES = 1024**2
MAX_OUTPUT_BYTES = 64 * 1024**2
MAX_OUTPUT_LINES = 1_000_000
BACKLOG_BYTES = 8 * 1024**2  # agent output read but not yet recorded; beyond it the container's writes wait


def tree_size(root: Path) -> int:
    """Bytes allocated under root, not following links, as `du` counts them: it walks by directory handles,
    so a tree nested deeper than a recursive walk survives, or longer than PATH_MAX, hides nothing."""
    proc = subprocess.run(["du", "-s", "-B1", "-P", "--", str(root)], capture_output=True, text=True)
    try:
        return int(proc.stdout.split()[0])
    except (IndexError, ValueError):
        raise SandboxError(f"cannot measure {root}: {proc.stderr.strip()[-300:]}") from None


RESULT_LIMIT = 1024**2


def read_result(path: Path) -> dict[str, Any]:
    """A result file a container wrote into a directory it could write (the check's is shared with the code it
    ran): read on the host only as a plain file, never through a link, a FIFO or a device, and at most
    RESULT_LIMIT bytes. OSError or ValueError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > RESULT_LIMIT:
            raise ValueError(f"{path.name} is not a plain file of at most {RESULT_LIMIT} bytes")
        data = os.read(fd, RESULT_LIMIT + 1)
    finally:
        os.close(fd)
    result = json.loads(data)
    if not isinstance(result, dict):
        raise ValueError(f"{path.name} does not hold a JSON object")
    return result


class Line(str):
    """A line of a container's output: `size` is its length in bytes as written, `cut` how many of those were
    dropped (beyond MAX_LINE_BYTES), `at` when the supervisor read it (monotonic)."""

    size: int = 0
    cut: int = 0
    at: float = 0.0


def _line(parts: list[bytes], size: int) -> Line:
    raw = b"".join(parts)
    line = Line(raw.decode("utf-8", errors="replace"))
    line.size, line.cut, line.at = size, size - len(raw), time.monotonic()
    return line


def lines(chunks: Iterator[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[Line]:
    """Lines out of a byte stream, in linear time: each chunk is scanned once, and at most `limit` bytes of a
    line are kept (the rest is counted, not buffered), so a line of any length costs bounded memory."""
    parts: list[bytes] = []
    kept = size = 0
    for chunk in chunks:
        start, n = 0, len(chunk)
        while start < n:
            end = chunk.find(b"\n", start)
            stop = n if end < 0 else end
            size += stop - start
            if kept < limit and stop > start:
                take = min(stop - start, limit - kept)
                parts.append(chunk[start : start + take])
                kept += take
            if end < 0:
                break
            yield _line(parts, size)
            parts, kept, size = [], 0, 0
            start = end + 1
    if size:
        yield _line(parts, size)


class Backlog:
    """Bytes of the agent's output read but not yet recorded. The pump waits while there are too many, so a
    flood waits in the container (its writes block, as the backend attaches to its output) instead of piling
    up in the supervisor's memory or being dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0
        self.open = True
        self.allowance = 0  # once closed: bytes still passed on; beyond them lines are read and dropped
        self._cond = threading.Condition()

    def add(self, n: int) -> bool:
        """Wait for room; False when the line is to be dropped (the run is ending and past its allowance)."""
        with self._cond:
            while self.open and self.pending > self.limit:
                self._cond.wait(1.0)
            if not self.open:
                self.allowance -= n
                return self.allowance >= 0
            self.pending += n
            return True

    def done(self, n: int) -> None:
        with self._cond:
            self.pending -= n
            self._cond.notify_all()

    def close(self, allowance: int) -> None:
        """Stop holding the writer back (the agent is being stopped, and a blocked writer would hold up its
        stop): up to `allowance` more bytes are passed on, the rest read and dropped."""
        with self._cond:
            self.allowance = allowance if self.open else min(self.allowance, allowance)
            self.open = False
            self._cond.notify_all()
