import json
import re
from pathlib import Path

import pytest

from agent_sandbox.audit.log import AuditLog, verify
from agent_sandbox.audit.redact import MASK, Redactor
from agent_sandbox.config.policy import load_policy, parse_size, preset_names
from agent_sandbox.errors import UsageError


def test_default_preset_loads() -> None:
    assert "default" in preset_names()
    pol, source = load_policy("default")
    assert source == "preset:default" and pol.name == "default"
    assert pol.limits.memory_bytes == 4 * 1024**3 and pol.limits.max_turns == 50


def test_unknown_preset_and_bad_keys(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        load_policy("no-such-policy")
    assert "unknown policy 'no-such-policy'" in exc.value.message and "default" in (exc.value.hint or "")
    f = tmp_path / "p.yaml"
    f.write_text("limits:\n  wall_seconds: 10\n  wall_secs: 5\n")
    with pytest.raises(UsageError, match=r"limits\.wall_secs: unknown key"):
        load_policy(str(f))
    f.write_text("limits: {memory: lots}\n")
    with pytest.raises(UsageError, match=r"limits\.memory"):
        load_policy(str(f))


def test_parse_size() -> None:
    assert parse_size("512m") == 512 * 1024**2 and parse_size("1.5g") == int(1.5 * 1024**3)
    with pytest.raises(ValueError):
        parse_size("12x")


def test_audit_chain_verifies_and_detects_an_edit(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "r1", Redactor(["sk-ant-secret-value-1"]))
    for i in range(5):
        log.write_untrusted("supervisor", "step", {"i": i, "note": "key sk-ant-secret-value-1 and ghp_" + "a" * 36})
    log.close()
    ok, n, _ = verify(path)
    assert ok and n == 5
    text = path.read_text()
    assert "sk-ant-secret-value-1" not in text and "ghp_aaaa" not in text and MASK in text
    lines = text.splitlines()
    event = json.loads(lines[2])
    event["payload"]["i"] = 99
    lines[2] = json.dumps(event, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    ok, bad, msg = verify(path)
    assert not ok and bad == 3 and msg.startswith("line 3 was changed")
    # The tail: a changed last line is caught against the head recorded at the end.
    path.write_text(text)
    ok, n, _ = verify(path, expected_head=log.head)
    assert ok and n == 5
    path.write_text("\n".join(text.splitlines()[:4]) + "\n")
    ok, bad, msg = verify(path, expected_head=log.head)
    assert not ok and "does not match the chain head" in msg


def test_redactor_patterns() -> None:
    r = Redactor(["short", "a-long-secret-value"])
    s = r("short a-long-secret-value Authorization: Bearer abcdefghijkl xoxb-123456789012 AKIAABCDEFGHIJKLMNOP")
    assert s.startswith("short ") and "a-long-secret-value" not in s and "abcdefghijkl" not in s
    assert "xoxb-" not in s and "AKIA" not in s


def test_store_migrates_an_older_schema(tmp_path: Path) -> None:
    import sqlite3

    from agent_sandbox.store import SCHEMA, RunStore

    db = sqlite3.connect(tmp_path / "runs.sqlite")
    old_schema = re.sub(r",\n\s+audit_head TEXT[^\n]*", "", SCHEMA)
    assert "audit_head" not in old_schema
    db.executescript(old_schema)
    db.close()
    store = RunStore(tmp_path / "runs.sqlite")
    cols = {r["name"] for r in store.db.execute("PRAGMA table_info(runs)")}
    assert "audit_head" in cols


def test_a_fresh_store_opened_by_several_runs_at_once(tmp_path: Path) -> None:
    """A sweep's runs open a new store at the same instant. The switch to WAL used to fail with 'database is
    locked' in about one race in twenty (SQLite does not wait for the busy timeout there)."""
    import threading

    from agent_sandbox.store import RunStore

    for it in range(150):
        db = tmp_path / f"runs-{it}.sqlite"
        barrier = threading.Barrier(3)
        errors: list[str] = []

        def open_and_write(
            i: int, db: Path = db, barrier: threading.Barrier = barrier, errors: list[str] = errors
        ) -> None:
            barrier.wait()
            try:
                store = RunStore(db)
                store.add_spend(f"run-{i}", 1.0)
                store.close()
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"race {it}: {errors}"
        assert RunStore(db).spent_on() == 3.0
