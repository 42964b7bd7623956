"""A spend cap shared by several runs (a sweep's budget), held as hard as one run's.

Each run's gateway already reserves a call's worst case before forwarding it and settles to its metered cost
(sidecar/gateway.py). Several gateways under one cap need one ledger: the supervisor keeps it
(`SharedBudget`), and each run's gateway asks it over a unix socket before every call and tells it the cost
after. The socket lives in a directory mounted into that run's sidecar alone: the agent, which has no route
to the host and no such mount, cannot reach it.

Admission follows the gateway's own rule, across all runs: a call needs shared spend below the cap, and when
any call of any run is in flight it must fit beside them at its worst case; it waits for room rather than
fail. So the shared cap is overshot by one call at most, whatever the concurrency.

The protocol is one JSON line each way per request:
  {"op": "reserve", "id": 7, "usd": 0.31, "wait": 300}  ->  {"ok": true} | {"ok": false, "reason": "budget"|...}
  {"op": "settle", "id": 7, "usd": 0.0042}             ->  {"ok": true}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socketserver
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 4096


class SharedBudget:
    """The ledger of a spend cap shared by several runs in one process."""

    def __init__(self, cap_usd: float, label: str, spent_usd: float = 0.0) -> None:
        """spent_usd: what was spent under the same cap before this ledger (a sweep's earlier invocations the
        same day), so that the cap and the messages stay the whole one."""
        self.cap_usd = cap_usd
        self.label = label
        self.spent_usd = max(0.0, spent_usd)
        self._reserved: dict[tuple[str, int], float] = {}  # (run id, call id) -> worst case, while in flight
        self._cond = threading.Condition()

    # --- the ledger ---

    def reserve(self, run_id: str, call_id: int, usd: float, wait: float = 0.0) -> tuple[bool, str]:
        """Hold `usd` for a call, waiting up to `wait` seconds for room. (ok, reason when not)."""
        deadline = time.monotonic() + max(0.0, wait)
        with self._cond:
            while True:
                if self.spent_usd >= self.cap_usd:
                    return False, "budget"
                outstanding = sum(self._reserved.values())
                if not self._reserved or self.spent_usd + outstanding + usd <= self.cap_usd:
                    self._reserved[(run_id, call_id)] = usd
                    return True, ""
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, "reservation"
                self._cond.wait(left)

    def settle(self, run_id: str, call_id: int, usd: float) -> None:
        """Release a call's reservation and book what it cost."""
        with self._cond:
            self._reserved.pop((run_id, call_id), None)
            self.spent_usd += max(0.0, usd)
            self._cond.notify_all()

    def close_run(self, run_id: str) -> float:
        """A run has ended: what it still held (its sidecar died with calls in flight) is booked at the worst
        case, since those calls may have run. Returns what was booked so."""
        with self._cond:
            left = [k for k in self._reserved if k[0] == run_id]
            booked = sum(self._reserved.pop(k) for k in left)
            self.spent_usd += booked
            self._cond.notify_all()
            return booked

    def add(self, usd: float) -> float:
        """Book spend that did not come through a reservation (a run without a broker). Returns the total."""
        with self._cond:
            self.spent_usd += usd
            self._cond.notify_all()
            return self.spent_usd

    def remaining(self) -> float:
        with self._cond:
            return max(0.0, self.cap_usd - self.spent_usd)

    @property
    def exhausted(self) -> bool:
        return self.remaining() <= 0

    # --- one run's endpoint ---

    def serve(self, run_id: str, owner: tuple[int, int] | None = None, directory: Path | None = None) -> BrokerEndpoint:
        """Listen on a unix socket for one run's gateway, in a new private directory (under `directory`, or the
        system's temporary directory: a socket's path must stay under 108 bytes, which a state directory's
        run path may not)."""
        # Named for the run, so that the recovery of a run whose supervisor died finds it (leftovers()).
        home = Path(tempfile.mkdtemp(prefix=f"sbx-budget-{run_id}-", dir=directory))
        if owner:
            os.chown(home, *owner)
        return BrokerEndpoint(self, run_id, home / "broker.sock", owner)


class BrokerEndpoint:
    """A unix socket on which one run's gateway reserves and settles against the shared ledger."""

    def __init__(self, budget: SharedBudget, run_id: str, path: Path, owner: tuple[int, int] | None) -> None:
        self.budget = budget
        self.run_id = run_id
        self.path = path
        ledger, run = budget, run_id

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for raw in iter(lambda: self.rfile.readline(MAX_LINE), b""):
                    reply = _answer(ledger, run, raw)
                    self.wfile.write(json.dumps(reply).encode() + b"\n")
                    self.wfile.flush()

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        path.unlink(missing_ok=True)
        self.server = Server(str(path), Handler)
        # The sidecar runs as its own user; the directory holding the socket is mounted into it alone.
        os.chmod(path, 0o660 if owner else 0o600)
        if owner:
            os.chown(path, *owner)
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"budget-{run_id}", daemon=True)
        self.thread.start()
        log.info("budget_broker run_id=%s socket=%s cap_usd=%s", run_id, path, budget.cap_usd)

    def close(self) -> float:
        """Stop listening; book what the run still held. Returns that amount."""
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.path.parent.rmdir()
        return self.budget.close_run(self.run_id)


def remove_leftovers(run_id: str) -> list[str]:
    """Remove the socket directories a dead supervisor left for this run; returns them as `socket:<dir>`."""
    removed = []
    for home in Path(tempfile.gettempdir()).glob(f"sbx-budget-{run_id}-*"):
        shutil.rmtree(home, ignore_errors=True)
        removed.append(f"socket:{home}")
    return removed


def _answer(ledger: SharedBudget, run_id: str, raw: bytes) -> dict[str, Any]:
    try:
        req = json.loads(raw)
        op, call_id, usd = req["op"], int(req["id"]), float(req["usd"])
        if not (usd >= 0 and usd < 1e6):
            raise ValueError("usd out of range")
    except (ValueError, KeyError, TypeError) as exc:
        return {"ok": False, "reason": "bad_request", "detail": str(exc)[:200]}
    if op == "reserve":
        ok, reason = ledger.reserve(run_id, call_id, usd, min(float(req.get("wait") or 0), 600.0))
        return {"ok": ok, "reason": reason, "spent_usd": round(ledger.spent_usd, 6), "cap_usd": ledger.cap_usd}
    if op == "settle":
        ledger.settle(run_id, call_id, usd)
        return {"ok": True}
    return {"ok": False, "reason": "bad_request", "detail": f"unknown op {op!r}"}
