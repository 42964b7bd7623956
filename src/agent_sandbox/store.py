"""The run store: a SQLite database in the state directory that indexes every run, keeps the spend ledger
behind the daily budget, the task service's queue and the webhook deliveries it has answered. WAL mode and a
busy timeout let several `sandbox` processes write at once; every write is one short transaction, so a crash
loses at most the write in flight.

This module is the only one that runs SQL: everything else asks RunStore (runs, spend) or TaskStore (the
service's tasks) by name."""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

from agent_sandbox.paths import state_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    base_commit TEXT NOT NULL,
    branch TEXT,
    task TEXT NOT NULL,              -- first line only
    policy TEXT NOT NULL,
    policy_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,            -- running | succeeded | failed | killed
    reason TEXT,
    message TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    duration_s REAL,
    cost_usd REAL NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    turns INTEGER NOT NULL DEFAULT 0,
    egress_denied INTEGER NOT NULL DEFAULT 0,
    files_changed INTEGER NOT NULL DEFAULT 0,
    pushed INTEGER NOT NULL DEFAULT 0,
    run_dir TEXT NOT NULL,
    supervisor_pid INTEGER,
    audit_head TEXT,                 -- SHA-256 of the audit trail's last line
    recover TEXT                     -- set while the run's work waits for `sandbox gc` to import it
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started_at);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,            -- queued | running | done | failed
    source TEXT NOT NULL,            -- api | webhook
    principal TEXT NOT NULL,         -- the token's name, or the webhook
    repo TEXT NOT NULL,              -- the configured repository name
    request TEXT NOT NULL,           -- the RunRequest as JSON
    run_id TEXT,
    summary TEXT,                    -- the RunSummary as JSON, once finished
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    subject TEXT                     -- what a webhook task is about, owner/name#number
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, created_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,             -- GitHub's X-GitHub-Delivery
    event TEXT NOT NULL,             -- X-GitHub-Event, and the payload's action after a dot
    received_at REAL NOT NULL,
    task_id TEXT,                    -- the task it made, or the active one it was answered with
    ignored TEXT                     -- or why it made none
);
CREATE TABLE IF NOT EXISTS spend (
    run_id TEXT NOT NULL,
    day TEXT NOT NULL,               -- UTC date
    usd REAL NOT NULL,
    PRIMARY KEY (run_id, day)
);
"""


# Columns added after the first release of the schema: (name, declaration).
MIGRATIONS = [
    ("audit_head", "TEXT"),
    # Why the run's work waits to be imported by `sandbox gc` (kept when the engine or disk failed).
    ("recover", "TEXT"),
]
TASK_MIGRATIONS = [
    # What a webhook task is about, `owner/name#number` (an issue or a pull request): one active task each,
    # and where its comments go.
    ("subject", "TEXT"),
]


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


class RunStore:
    """The runs and the spend ledger. Rows are plain dicts of the `runs` columns (fleet/views.py's RunRow
    validates them for display)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "runs.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout=30000")
        # Switching to WAL needs a moment alone with the file and does not wait for the busy timeout, so
        # several processes opening the store at once (a sweep's runs) retry; once in WAL it is never asked again.
        for attempt in range(100):
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(SCHEMA)
                self._migrate()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05 + random.random() * 0.1)

    def _migrate(self) -> None:
        """Add columns that newer versions define to a store an older version created."""
        for table, migrations in (("runs", MIGRATIONS), ("tasks", TASK_MIGRATIONS)):
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, decl in migrations:
                if name not in have:
                    try:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
                    except sqlite3.OperationalError as exc:
                        # Another process opening the same old store added it between our look and ours.
                        if "duplicate column" not in str(exc):
                            raise

    def close(self) -> None:
        self.db.close()

    def run_started(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.db.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", tuple(row.values()))

    def update(self, run_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*fields.values(), run_id))

    def get(self, run_id: str) -> dict[str, Any] | None:
        """One run's row, or None when the store does not know it."""
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return dict(row) if row else None

    def list_runs(
        self, repo: str | None = None, status: str | None = None, since: float | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The latest runs first, at most `limit`: only those on `repo` (the repository's resolved path, as
        stored), with `status`, or started at or after `since` (Unix time), when given."""
        where: list[str] = []
        args: list[Any] = []
        for clause, value in (("repo = ?", repo), ("status = ?", status), ("started_at >= ?", since)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.db.execute(sql + " ORDER BY started_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [dict(r) for r in rows]

    def latest_on_branch(self, repo: str, branch: str) -> dict[str, Any] | None:
        """The latest run whose work is on `branch` of `repo` (the resolved path, as stored), or None: the run a
        comment on that branch's pull request follows up."""
        row = self.db.execute(
            "SELECT * FROM runs WHERE repo = ? AND branch = ? ORDER BY started_at DESC LIMIT 1", (repo, branch)
        ).fetchone()
        return dict(row) if row else None

    def unfinished(self) -> list[dict[str, Any]]:
        """Runs still marked running, or whose work waits to be imported: `sandbox gc` looks at each."""
        rows = self.db.execute(
            "SELECT * FROM runs WHERE status = 'running' OR recover IS NOT NULL ORDER BY started_at"
        ).fetchall()
        return [dict(r) for r in rows]

    def mark_failed(self, run_id: str, message: str) -> bool:
        """Mark a run that never finished as failed/error; False if it had finished or is unknown."""
        cur = self.db.execute(
            "UPDATE runs SET status = 'failed', reason = 'error', message = ?, ended_at = ? "
            "WHERE id = ? AND status = 'running'",
            (message, time.time(), run_id),
        )
        return cur.rowcount > 0

    def mark_unrecoverable(self, run_id: str, message: str) -> bool:
        """End a run that recovery cannot finish (not for want of an engine or room): failed/error, no longer
        waiting to be imported. False if it had ended and waited for nothing."""
        cur = self.db.execute(
            "UPDATE runs SET status = 'failed', reason = 'error', message = ?, ended_at = ?, recover = NULL "
            "WHERE id = ? AND (status = 'running' OR recover IS NOT NULL)",
            (message, time.time(), run_id),
        )
        return cur.rowcount > 0

    def add_spend(self, run_id: str, usd: float, day: str | None = None) -> float:
        """Add to the run's spend for the day; returns the whole host's spend for that day."""
        d = day or today()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO spend (run_id, day, usd) VALUES (?, ?, ?) "
                "ON CONFLICT (run_id, day) DO UPDATE SET usd = usd + excluded.usd",
                (run_id, d, usd),
            )
            total = self.db.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE day = ?", (d,)).fetchone()[0]
        return float(total)

    def spent_on(self, day: str | None = None) -> float:
        """The whole host's spend on a UTC day (default today)."""
        row = self.db.execute("SELECT COALESCE(SUM(usd), 0) FROM spend WHERE day = ?", (day or today(),)).fetchone()
        return float(row[0])


TaskStatus = Literal["queued", "running", "done", "failed"]
"""Where a task of the service is: waiting, its run going, its run succeeded (done), or it ended otherwise."""


class TaskStore:
    """The task service's queue: the `tasks` table of a run store. Rows are plain dicts of its columns;
    `request` and `summary` hold JSON the service validates.

    The service's event loop and the threads its runs use share one connection. sqlite3 lets threads share
    a connection but not a transaction, so every call holds a lock: one statement (or one claim) at a time."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._lock = threading.Lock()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.store.db.execute(sql, args).fetchall()]

    def add(
        self,
        task_id: str,
        source: str,
        principal: str,
        repo: str,
        request: str,
        subject: str | None = None,
        delivery: tuple[str, str] | None = None,
    ) -> None:
        """Queue a task; `request` is the run request as JSON, `subject` what a webhook task is about. With
        `delivery` (its id and event), the webhook delivery that asked for it is recorded in the same
        transaction, so a crash never leaves a task whose delivery a redelivery would not recognise."""
        with self._lock, self.store.db:
            self.store.db.execute("BEGIN IMMEDIATE")
            now = time.time()
            self.store.db.execute(
                "INSERT INTO tasks (id, status, source, principal, repo, request, created_at, subject) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (task_id, source, principal, repo, request, now, subject),
            )
            if delivery is not None:
                self.store.db.execute(
                    "INSERT INTO deliveries (id, event, received_at, task_id) VALUES (?, ?, ?, ?)",
                    (*delivery, now, task_id),
                )

    def active(self, subject: str) -> dict[str, Any] | None:
        """The queued or running task about `subject`, or None: a subject has at most one at a time."""
        rows = self._exec(
            "SELECT * FROM tasks WHERE subject = ? AND status IN ('queued', 'running') ORDER BY created_at LIMIT 1",
            (subject,),
        )
        return rows[0] if rows else None

    def delivery(self, delivery_id: str) -> dict[str, Any] | None:
        """How a webhook delivery was answered (its `task_id` or why it was `ignored`), or None if never seen."""
        rows = self._exec("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return rows[0] if rows else None

    def record_delivery(self, delivery_id: str, event: str, task_id: str | None, ignored: str | None) -> bool:
        """Remember a delivery and how it was answered, so that a redelivery (GitHub's retries, or the "Redeliver"
        button), even after a restart, gets the same answer and does nothing. False if it was already known."""
        with self._lock:
            cur = self.store.db.execute(
                "INSERT OR IGNORE INTO deliveries (id, event, received_at, task_id, ignored) VALUES (?, ?, ?, ?, ?)",
                (delivery_id, event, time.time(), task_id, ignored),
            )
            return cur.rowcount > 0

    def forget_deliveries(self, before: float) -> int:
        """Forget the deliveries received before `before` (Unix time), which GitHub no longer redelivers; the
        tasks they made stay. How many were forgotten."""
        with self._lock:
            return self.store.db.execute("DELETE FROM deliveries WHERE received_at < ?", (before,)).rowcount

    def get(self, task_id: str) -> dict[str, Any] | None:
        """One task's row, or None."""
        rows = self._exec("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return rows[0] if rows else None

    def recent(self, limit: int = 200, repos: list[str] | None = None) -> list[dict[str, Any]]:
        """The latest tasks first, at most `limit`; with `repos`, only those on these repositories."""
        if repos is None:
            return self._exec("SELECT * FROM tasks ORDER BY created_at DESC LIMIT ?", (limit,))
        marks = ",".join("?" * len(repos))
        return self._exec(
            f"SELECT * FROM tasks WHERE repo IN ({marks}) ORDER BY created_at DESC LIMIT ?", (*repos, limit)
        )

    def running(self) -> list[dict[str, Any]]:
        """Tasks marked running: at the service's start, those a service that died left behind."""
        return self._exec("SELECT * FROM tasks WHERE status = 'running' ORDER BY created_at")

    def claim(self) -> tuple[str, str] | None:
        """Take the oldest queued task and mark it running, in one transaction so that two workers never take
        the same one: its id and its request (JSON), or None when nothing is queued."""
        with self._lock, self.store.db:
            self.store.db.execute("BEGIN IMMEDIATE")
            row = self.store.db.execute(
                "SELECT id, request FROM tasks WHERE status = 'queued' ORDER BY created_at LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            self.store.db.execute(
                "UPDATE tasks SET status = 'running', started_at = ? WHERE id = ?", (time.time(), row["id"])
            )
        return row["id"], row["request"]

    def started(self, task_id: str, run_id: str) -> None:
        """Record the run a running task started."""
        self._exec("UPDATE tasks SET run_id = ? WHERE id = ?", (run_id, task_id))

    def done(self, task_id: str, run_id: str, summary: str) -> None:
        """The task's run succeeded: its summary as JSON."""
        self.ended(task_id, "done", run_id, summary, None)

    def ended(
        self, task_id: str, status: TaskStatus, run_id: str | None, summary: str | None, error: str | None
    ) -> None:
        """The task ended: `done` for a run that succeeded, else `failed` with why (and the run's summary as JSON
        when the run got that far)."""
        self._exec(
            "UPDATE tasks SET status = ?, summary = COALESCE(?, summary), run_id = COALESCE(?, run_id), error = ?, "
            "ended_at = ? WHERE id = ?",
            (status, summary, run_id, error, time.time(), task_id),
        )

    def failed(self, task_id: str, error: str) -> None:
        """The task ended without a run summary, for this reason."""
        self.ended(task_id, "failed", None, None, error)
