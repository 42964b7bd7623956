"""Fast checks (no Docker) of reading the agent's stream: bounded lines in linear time, malformed lines of any
shape, the gateway-backed verdict on a claimed result, and escaping of terminal control characters."""

from __future__ import annotations

import time

from agent_sandbox.audit.redact import visible
from agent_sandbox.run.agent_stream import events_from_line
from agent_sandbox.run.output import lines as _lines
from agent_sandbox.run.state import RunState as _Watch
from agent_sandbox.run.supervisor import Supervisor


def test_lines_are_split_across_chunks_and_cut_beyond_the_limit() -> None:
    out = list(_lines([b"ab", b"c\nde", b"f\n\ng", b"h"], limit=4))
    assert out == ["abc", "def", "", "gh"]
    cut = list(_lines([b"x" * 10, b"y" * 10 + b"\nz\n"], limit=4))
    assert cut == ["xxxx", "z"] and (cut[0].size, cut[0].cut) == (20, 16) and cut[1].cut == 0


def test_a_long_line_costs_linear_time() -> None:
    chunk = b"a" * 65536
    t0 = time.monotonic()
    out = list(_lines(iter([chunk] * 512 + [b"\n"])))  # 32 MiB in one line
    assert time.monotonic() - t0 < 2
    assert len(out) == 1 and len(out[0]) == 1024**2 and out[0].size == 32 * 1024**2


def test_malformed_lines_become_agent_output() -> None:
    for line in (
        '{"type":"assistant","message":{"content":[1, "x", null]}}',
        '{"type":"assistant","message":"nope"}',
        '{"type":"user","message":{"content":[{"type":"tool_result","content":[{"type":"text","text":5}]}]}}',
        "[" * 100000,
        '{"type":"assistant","message":{"content":[{"type":"tool_use","id":1,"name":null,"input":[1]}]}}',
    ):
        events = events_from_line(line)
        assert all(t in ("agent_output", "tool_call", "tool_result") for t, _ in events), events
    ((t, p),) = events_from_line('{"type":"assistant","message":{"content":[{"type":"tool_use","id":1,"input":[1]}]}}')
    assert t == "tool_call" and p["id"] == "1" and p["input"] == {}


def _verdict(calls: list[tuple[float, dict]], result: dict, at: float = 100.0, open_tools: list[str] | None = None):
    w = _Watch()
    w.gateway_calls, w.result_at, w.open_at_result = calls, at, open_tools or []
    return Supervisor._result_backed(None, w, result)  # type: ignore[arg-type]


def _call(n: int, at: float, **extra: object) -> tuple[float, dict]:
    return at, {"call": n, "status": 200, "duration_ms": 500, **extra}


def test_a_claimed_result_needs_the_gateways_record() -> None:
    ok = {"subtype": "success", "num_turns": 2}
    assert _verdict([_call(1, 50), _call(2, 99)], ok)[0]
    assert _verdict([], ok) == (False, "the gateway recorded no successful model call")
    assert "claims 5 turns" in _verdict([_call(1, 50)], {"num_turns": 5})[1]
    assert "still running" in _verdict([_call(1, 50), _call(2, 99)], ok, open_tools=["Bash toolu_1"])[1]
    assert "began after" in _verdict([_call(1, 50), _call(2, 99), _call(3, 120)], ok)[1]
    # With the gateway's stop reasons: the last call that offered tools must have ended the conversation.
    tools = [
        _call(1, 50, stop_reason="tool_use", tool_uses=[{"id": "t", "name": "Bash"}], tools_offered=9),
        _call(2, 60, stop_reason="end_turn", tools_offered=0),
    ]
    assert "ended with tool_use" in _verdict(tools, ok)[1]
    assert _verdict([*tools, _call(3, 99, stop_reason="end_turn", tools_offered=9)], ok)[0]


def test_visible_escapes_every_terminal_control() -> None:
    raw = "a\x1b]52;c;aGk=\x07b\r\x08\x9b\u202e\u2066\x7f\tc\nd"
    shown = visible(raw)
    assert shown == "a\\x1b]52;c;aGk=\\x07b\\r\\x08\\x9b\\u202e\\u2066\\x7f\tc\nd"
    assert visible(raw, oneline=True).count("\n") == 0 and "\\n" in visible(raw, oneline=True)
    assert visible("plain ünïcödé ✓ [bold]") == "plain ünïcödé ✓ [bold]"
