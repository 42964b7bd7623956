"""Issue 11, class 8: the audit trail cannot be flooded. Below the bounds no line of the agent's output is
lost (the supervisor reads the container's own stream, so a flood waits in the container instead of being
rotated away); a line over 1 MiB is cut and recorded as cut, at bounded memory; more than the total bound ends
the run with limit output_flood and keeps what came before."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent_sandbox.run.output import MAX_LINE_BYTES, MAX_OUTPUT_BYTES

from ..conftest import audit_events

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

FLOOD_LINES = 200_000


def test_a_flood_of_short_lines_loses_nothing(make_repo, sandbox, write_script) -> None:
    script = write_script(f"""
turns:
  - bash: "seq 1 {FLOOD_LINES} | sed 's/^/flood /' > /proc/$(pgrep -o -x claude)/fd/1; echo flooded"
  - bash: "echo the real call after the flood"
  - text: finished after the flood
""")
    t0 = time.monotonic()
    res = sandbox("run", "--repo", str(make_repo()), "--task", "flood", "--model-script", str(script), "--json")
    took = time.monotonic() - t0
    assert res.code == 0, res.stdout + res.stderr
    s = res.json()
    stream = Path(s["run_dir"], "agent-stream.jsonl").read_text().splitlines()
    flood = [line for line in stream if line.startswith("flood ")]
    assert flood == [f"flood {i}" for i in range(1, FLOOD_LINES + 1)]
    events = audit_events(s["run_dir"])
    assert (
        sum(1 for e in events if e["type"] == "agent_output" and e["payload"]["text"].startswith("flood "))
        == FLOOD_LINES
    )
    calls = [e["payload"]["input"].get("command") for e in events if e["type"] == "tool_call"]
    assert "echo the real call after the flood" in calls
    results = [e["payload"] for e in events if e["type"] == "result"]
    assert results and results[-1]["result"] == "finished after the flood"
    assert s["reason"] == "completed"
    assert took < 90, took


def test_a_32_mb_line_is_cut_at_bounded_memory(make_repo, sandbox, write_script) -> None:
    size = 32 * 1024**2
    script = write_script(f"""
turns:
  - bash: "o=/proc/$(pgrep -ox claude)/fd/1; head -c {size} /dev/zero | tr '\\\\0' a > $o; echo > $o; echo written"
  - text: done
""")
    res = sandbox("run", "--repo", str(make_repo()), "--task", "long line", "--model-script", str(script), "--json")
    assert res.code == 0, res.stdout + res.stderr
    s = res.json()
    events = audit_events(s["run_dir"])
    # Cut at 1 MiB, recorded with its whole length. (A pipe write over 4 KiB is not atomic: a line Claude Code
    # writes meanwhile can land inside the long one and split it; nothing of it is buffered whole either way.)
    cut = [e["payload"] for e in events if e["type"] == "agent_line_truncated"]
    assert cut and all(c["stream"] == "stdout" and c["kept"] == MAX_LINE_BYTES for c in cut), cut
    assert size <= sum(c["bytes"] for c in cut) < size + 64 * 1024, cut
    stream = Path(s["run_dir"], "agent-stream.jsonl").read_text().splitlines()
    assert "a" * MAX_LINE_BYTES in stream
    usage = next(e["payload"] for e in events if e["type"] == "resource_usage")
    assert usage["supervisor_rss_bytes"] < 300 * 1024**2, usage
    assert s["reason"] == "completed"


def test_output_over_the_bound_ends_the_run_with_output_flood(make_repo, sandbox, write_script) -> None:
    total = MAX_OUTPUT_BYTES + 16 * 1024**2
    script = write_script(f"""
turns:
  - bash: "o=/proc/$(pgrep -ox claude)/fd/1; head -c {total} /dev/zero | tr '\\\\0' b | fold -w 65535 >$o; echo done"
  - bash: "echo never reached"
  - text: never reached
""")
    res = sandbox("run", "--repo", str(make_repo()), "--task", "flood", "--model-script", str(script), "--json")
    s = res.json()
    assert s["reason"] == "error" and "output_flood" in s["message"], s
    events = audit_events(s["run_dir"])
    hits = [e["payload"] for e in events if e["type"] == "limit_hit"]
    assert [h["limit"] for h in hits] == ["output_flood"], hits
    kept = [line for line in Path(s["run_dir"], "agent-stream.jsonl").read_text().splitlines() if line.startswith("b")]
    # What came before the bound is kept (a line Claude Code wrote meanwhile may split one of the flood's,
    # as pipe writes over 4 KiB are not atomic), and nothing after it.
    kept_bytes = sum(len(line) + 1 for line in kept)
    assert MAX_OUTPUT_BYTES - 4 * 1024**2 < kept_bytes <= MAX_OUTPUT_BYTES, kept_bytes
    assert json.loads(Path(s["run_dir"], "agent-stream.jsonl").read_text().splitlines()[0])["type"] == "system"
    assert not any(e["type"] == "tool_call" and "never reached" in json.dumps(e["payload"]) for e in events)
