"""The audit trail: one append-only JSONL file per run, written only by the supervisor on the host.

Every line carries the SHA-256 of the line before it, so the file is a hash chain: editing, dropping or
reordering a line breaks the chain at that point. Secrets are redacted before a line is written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from agent_sandbox.audit.events import EVENT_MODELS, Event
from agent_sandbox.audit.redact import Redactor

Source = Literal["supervisor", "agent", "proxy", "gateway"]
GENESIS = "0" * 64


class AuditEvent(BaseModel):
    """One line of the audit trail."""

    model_config = ConfigDict(extra="forbid")

    seq: int
    """Position in the trail, from 1."""
    time: float
    """Unix time the supervisor recorded it."""
    run_id: str
    """The run."""
    source: Source
    """Who produced it: the supervisor itself, the agent's stream, the proxy or the gateway."""
    type: str
    """What happened."""
    payload: dict[str, Any]
    """The details, by type."""
    prev_hash: str
    """SHA-256 of the previous line's bytes (64 zeros for the first line)."""


class AuditLog:
    def __init__(self, path: Path, run_id: str, redactor: Redactor) -> None:
        self.path = path
        self.run_id = run_id
        self.redact = redactor
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.broken: str | None = None  # why writing stopped (after a failed write, nothing more is appended)

    @classmethod
    def resume(cls, path: Path, run_id: str, redactor: Redactor) -> tuple[AuditLog, int]:
        """Continue a trail a dead supervisor left: the chain goes on from its last whole line. A last line cut
        off mid-write is dropped (it was never part of the chain); returns the log and the bytes dropped. Reads
        the file in chunks: a trail of any size costs bounded memory."""
        count, whole, last_hash = 0, 0, GENESIS
        line_hash, line_len = hashlib.sha256(), 0
        if path.exists():
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    *ended, rest = chunk.split(b"\n")
                    for part in ended:  # each ends a line: hashed as it goes, never held whole
                        line_hash.update(part)
                        count, whole = count + 1, whole + line_len + len(part) + 1
                        last_hash, line_hash, line_len = line_hash.hexdigest(), hashlib.sha256(), 0
                    line_hash.update(rest)
                    line_len += len(rest)
        size = path.stat().st_size if path.exists() else 0
        dropped = size - whole
        if dropped:
            with path.open("r+b") as fh:
                fh.truncate(whole)
        log = cls(path, run_id, redactor)
        log._seq = count
        log._prev = last_hash
        return log, dropped

    def events(self) -> Iterator[dict[str, Any]]:
        """The trail so far, parsed line by line (lines that are not JSON are skipped)."""
        with self.path.open("rb") as fh:
            for raw in fh:
                try:
                    yield json.loads(raw)
                except ValueError:
                    continue

    def write(self, event: Event, source: Source = "supervisor") -> None:
        """Append a typed event (the supervisor's own: its shape is checked where it is made)."""
        self._append(source, event.TYPE, event.model_dump(mode="json"))

    def write_untrusted(self, source: Source, type_: str, payload: dict[str, Any]) -> None:
        """Append an event parsed from a line a workload printed (the agent's stream, the sidecar's lines):
        validated against its type's model here, and kept as `invalid_event` when it does not match."""
        model = EVENT_MODELS.get(type_)
        try:
            if model is None:
                raise ValueError(f"no model for event type {type_!r}")
            payload = model.model_validate(payload).model_dump(mode="json")
        except (ValidationError, ValueError) as exc:
            payload = {"original_type": type_, "errors": str(exc)[:2000], "payload": payload}
            type_ = "invalid_event"
        self._append(source, type_, payload)

    def _append(self, source: Source, type_: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            event = AuditEvent(
                seq=self._seq,
                time=time.time(),
                run_id=self.run_id,
                source=source,
                type=type_,
                payload=payload,
                prev_hash=self._prev,
            )
            line = self.redact(json.dumps(event.model_dump(), separators=(",", ":"), default=str))
            if self.broken:
                self._seq -= 1
                raise OSError(f"the audit trail stopped at line {self._seq}: {self.broken}")
            try:
                data = (line + "\n").encode()
                # One unbuffered write per line: a failure (a full disk) leaves at most a part of this line,
                # which resume() drops, and nothing half-written waits in a buffer to follow later lines.
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            except OSError as exc:
                self._seq -= 1
                self.broken = str(exc)
                raise
            self._prev = hashlib.sha256(line.encode()).hexdigest()

    @property
    def head(self) -> str:
        """The hash of the last line written: the chain's head."""
        return self._prev

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def verify(path: Path, expected_head: str | None = None) -> tuple[bool, int, str]:
    """Check the chain. Returns (ok, lines checked or the number of the line that was changed, message).

    Line n+1 records the hash of line n, so a mismatch there means line n's bytes changed (or a line was
    removed or inserted at that point). The hash of the last line, kept in the run's summary and the run
    store (expected_head), covers the tail: a changed or truncated last line is caught too.
    """
    prev = GENESIS
    n = 0
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            line = raw.rstrip(b"\n")
            try:
                event = json.loads(line)
            except ValueError:
                return False, n, f"line {n} is not JSON"
            if event.get("prev_hash") != prev:
                if n == 1:
                    return False, 1, "line 1 does not start the chain (its prev_hash is not the genesis value)"
                return (
                    False,
                    n - 1,
                    (
                        f"line {n - 1} was changed: it no longer matches the hash recorded in "
                        f"line {n} (or a line was removed or inserted there)"
                    ),
                )
            if event.get("seq") != n:
                return False, n, f"line {n} has seq {event.get('seq')}, expected {n}"
            prev = hashlib.sha256(line).hexdigest()
    if expected_head is not None and prev != expected_head:
        return (
            False,
            n,
            (
                f"line {n}, the last, does not match the chain head recorded when the run ended "
                "(it was changed, or lines were removed or added at the end)"
            ),
        )
    return True, n, f"{n} lines, chain intact" + (", head matches the run's record" if expected_head else "")
