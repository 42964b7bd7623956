"""The audit trail: one append-only JSONL file per run, written only by the supervisor on the host.

Every line carries the SHA-256 of the line before it, so the file is a hash chain: editing, dropping or
reordering a line breaks the chain at that point. Secrets are redacted before a line is written.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .events import EVENT_MODELS
from .redact import Redactor

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
        self._fh = path.open("a", encoding="utf-8")

    def write(self, source: Source, type_: str, payload: dict[str, Any]) -> None:
        model = EVENT_MODELS.get(type_)
        try:
            if model is None:
                raise ValueError(f"no model for event type {type_!r}")
            payload = model.model_validate(payload).model_dump(mode="json")
        except (ValidationError, ValueError) as exc:
            payload = {"original_type": type_, "errors": str(exc)[:2000], "payload": payload}
            type_ = "invalid_event"
        with self._lock:
            self._seq += 1
            event = AuditEvent(seq=self._seq, time=time.time(), run_id=self.run_id, source=source, type=type_,
                               payload=payload, prev_hash=self._prev)
            line = self.redact(json.dumps(event.model_dump(), separators=(",", ":"), default=str))
            self._fh.write(line + "\n")
            self._fh.flush()
            self._prev = hashlib.sha256(line.encode()).hexdigest()

    @property
    def head(self) -> str:
        """The hash of the last line written: the chain's head."""
        return self._prev

    def close(self) -> None:
        with self._lock:
            self._fh.close()


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
                return False, n - 1, (f"line {n - 1} was changed: it no longer matches the hash recorded in "
                                      f"line {n} (or a line was removed or inserted there)")
            if event.get("seq") != n:
                return False, n, f"line {n} has seq {event.get('seq')}, expected {n}"
            prev = hashlib.sha256(line).hexdigest()
    if expected_head is not None and prev != expected_head:
        return False, n, (f"line {n}, the last, does not match the chain head recorded when the run ended "
                          "(it was changed, or lines were removed or added at the end)")
    return True, n, f"{n} lines, chain intact" + (", head matches the run's record" if expected_head else "")
