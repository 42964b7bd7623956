"""Reading Claude Code's stream-json output: each line becomes zero or more audit events.

Everything read here is the agent's own account: any process in its container can write lines to this
stream. The events are recorded with source `agent`, as claims; the gateway's record of model calls is the
one the agent cannot touch. A malformed line of any shape becomes `agent_output`, never an error."""

from __future__ import annotations

import json
from typing import Any

EXCERPT = 2000


def _excerpt(value: Any, limit: int = EXCERPT) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _tool_input(name: str, inp: dict[str, Any]) -> dict[str, Any]:
    """The input worth recording: the command, the path; other fields bounded."""
    out: dict[str, Any] = {}
    for k, v in list(inp.items())[:50]:
        out[str(k)[:200]] = v if isinstance(v, int | float | bool) or v is None else _excerpt(v, 4000)
    return out


def _result_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
    return content if isinstance(content, str) else json.dumps(content)


def events_from_line(line: str) -> list[tuple[str, dict[str, Any]]]:
    """(type, payload) pairs for the audit trail from one line of the agent's stdout."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return [("agent_output", {"text": _excerpt(line)})]
    if not isinstance(msg, dict):
        return [("agent_output", {"text": _excerpt(line)})]
    try:
        return _events(msg)
    except (AttributeError, TypeError, ValueError, RecursionError):  # a line shaped like no real event
        return [("agent_output", {"text": _excerpt(line)})]


def _blocks(message: Any) -> list[dict[str, Any]]:
    content = message.get("content") if isinstance(message, dict) else None
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _str(value: Any) -> str | None:
    return None if value is None else str(value)[:EXCERPT]


def _events(msg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    kind = msg.get("type")
    if kind == "sandbox_pre":
        output = _excerpt(msg.get("output", ""))
        return [("pre_command", {"exit_code": int(msg.get("exit_code", -1)), "output": output})]
    if kind == "system" and msg.get("subtype") == "init":
        return [
            (
                "agent_init",
                {
                    "session_id": msg.get("session_id"),
                    "model": msg.get("model"),
                    "cwd": msg.get("cwd"),
                    "tools": len(msg.get("tools") or []),
                    "permission_mode": msg.get("permissionMode"),
                    "claude_code_version": msg.get("claude_code_version"),
                },
            )
        ]
    if kind == "assistant":
        m = msg.get("message") or {}
        mid = _str(m.get("id")) if isinstance(m, dict) else None
        out: list[tuple[str, dict[str, Any]]] = []
        for block in _blocks(m):
            if block.get("type") == "tool_use":
                inp = block.get("input")
                out.append(
                    (
                        "tool_call",
                        {
                            "id": _str(block.get("id")),
                            "name": _str(block.get("name")),
                            "input": _tool_input(str(block.get("name")), inp if isinstance(inp, dict) else {}),
                            "message_id": mid,
                        },
                    )
                )
            elif block.get("type") == "text" and block.get("text"):
                out.append(("assistant_text", {"text": _excerpt(block["text"]), "message_id": mid}))
        return out
    if kind == "user":
        m = msg.get("message") or {}
        out = []
        for block in _blocks(m):
            if block.get("type") == "tool_result":
                text = _result_text(block.get("content"))
                out.append(
                    (
                        "tool_result",
                        {
                            "tool_use_id": _str(block.get("tool_use_id")),
                            "is_error": bool(block.get("is_error")),
                            "size": len(text),
                            "excerpt": _excerpt(text),
                        },
                    )
                )
        return out
    if kind == "result":
        return [
            (
                "result",
                {
                    "subtype": msg.get("subtype"),
                    "is_error": bool(msg.get("is_error")),
                    "num_turns": msg.get("num_turns"),
                    "total_cost_usd": msg.get("total_cost_usd"),
                    "duration_ms": msg.get("duration_ms"),
                    "permission_denials": msg.get("permission_denials") or [],
                    "result": _excerpt(msg.get("result") or ""),
                },
            )
        ]
    return [("agent_event", {"kind": kind, "subtype": msg.get("subtype")})]
