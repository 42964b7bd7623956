"""The scripted model: an Anthropic Messages API server that plays a YAML script.

It stands in for the paid model API in tests and in the demo. The real Claude Code CLI talks to it through
the real gateway. Which scripted answer a request gets is derived from the request itself (the number of
assistant messages already in the conversation), so a retried request gets the same answer again and side
requests without tools never consume a turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from agent_sandbox.sidecar.script import Script, Turn, Usage


@dataclass(frozen=True)
class Step:
    """One model response derived from the script."""

    turn: int  # index of the script entry this step plays
    tool: str | None  # tool name, or None for a final text answer
    tool_input: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    usage: Usage = field(default_factory=Usage)


def _abspath(workspace: str, path: str) -> str:
    return path if path.startswith("/") else posixpath.join(workspace, path)


def expand(script: Script) -> list[Step]:
    """Turn script entries into the sequence of responses the model gives."""
    steps: list[Step] = []
    for i, t in enumerate(script.turns):
        usage = t.usage or script.usage
        steps.extend(_steps_for(i, t, usage, script.workspace))
    return steps


def _steps_for(i: int, t: Turn, usage: Usage, ws: str) -> list[Step]:
    if t.bash is not None:
        inp: dict[str, Any] = {"command": t.bash, "description": f"scripted turn {i + 1}"}
        if t.timeout_ms is not None:
            inp["timeout"] = t.timeout_ms
        return [Step(i, "Bash", inp, usage=usage)]
    if t.write is not None:
        path = _abspath(ws, t.write.path)
        return [Step(i, "Write", {"file_path": path, "content": t.write.content}, usage=usage)]
    if t.read is not None:
        return [Step(i, "Read", {"file_path": _abspath(ws, t.read.path)}, usage=usage)]
    if t.edit is not None:
        path = _abspath(ws, t.edit.path)
        # Claude Code refuses to edit a file it has not read in this session.
        return [
            Step(i, "Read", {"file_path": path}, usage=usage),
            Step(i, "Edit", {"file_path": path, "old_string": t.edit.old, "new_string": t.edit.new}, usage=usage),
        ]
    return [Step(i, None, text=t.text or "", usage=usage)]


def _tool_results(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool results the agent sent back since the model's last answer.

    Claude Code may follow a tool result with a further user message (a reminder, say), so every user
    message after the last assistant message counts, not only the last one.
    """
    msgs = body.get("messages") or []
    tail: list[dict[str, Any]] = []
    for m in reversed(msgs):
        if m.get("role") == "assistant":
            break
        tail.insert(0, m)
    out = []
    for m in tail:
        if not isinstance(m.get("content"), list):
            continue
        for block in m["content"]:
            if not isinstance(block, dict) or block.get("type") != "tool_result":
                continue
            content = block.get("content")
            if isinstance(content, list):
                content = "\n".join(c.get("text", "") for c in content if isinstance(c, dict))
            out.append(
                {
                    "tool_use_id": block.get("tool_use_id"),
                    "is_error": bool(block.get("is_error")),
                    "content": content if isinstance(content, str) else json.dumps(content),
                }
            )
    return out


class ScriptedModel:
    """Plays one script; writes a JSONL transcript of every request it receives."""

    def __init__(self, script: Script, transcript: Path | None = None, side_text: str = "OK.") -> None:
        self.script = script
        self.steps = expand(script)
        self.transcript = transcript
        self.side_text = side_text
        self._seq = 0

    def _record(self, entry: dict[str, Any]) -> None:
        self._seq += 1
        if self.transcript is None:
            return
        entry = {"seq": self._seq, "time": time.time(), **entry}
        with self.transcript.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def choose(self, body: dict[str, Any]) -> tuple[int | None, Step]:
        """The step that answers this request: (index into steps or None for a side answer, step)."""
        if not body.get("tools"):
            return None, Step(-1, None, text=self.side_text, usage=self.script.usage)
        done = sum(1 for m in body.get("messages") or [] if m.get("role") == "assistant")
        if done < len(self.steps):
            return done, self.steps[done]
        return done, Step(len(self.script.turns), None, text=self.script.final_text, usage=self.script.usage)

    def message(self, body: dict[str, Any], idx: int | None, step: Step) -> dict[str, Any]:
        block: dict[str, Any]
        if step.tool is None:
            block = {"type": "text", "text": step.text}
        else:
            block = {"type": "tool_use", "id": f"toolu_scripted_{idx:04d}", "name": step.tool, "input": step.tool_input}
        return {
            "id": f"msg_scripted_{self._seq:05d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "scripted"),
            "content": [block],
            "stop_reason": "end_turn" if step.tool is None else "tool_use",
            "stop_sequence": None,
            "usage": step.usage.model_dump(),
        }

    async def handle_messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response(_error("invalid_request_error", "body is not JSON"), status=400)
        idx, step = self.choose(body)
        key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
        self._record(
            {
                "path": request.path,
                "model": body.get("model"),
                "stream": bool(body.get("stream")),
                "offers_tools": bool(body.get("tools")),
                "messages": len(body.get("messages") or []),
                "step": idx,
                "turn": step.turn,
                "tool_results": _tool_results(body),
                "answer": {"tool": step.tool, "input": step.tool_input} if step.tool else {"text": step.text},
                # A digest, never the key: the transcript lives in the run directory.
                "api_key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
                "anthropic_version": request.headers.get("anthropic-version"),
                "anthropic_beta": request.headers.get("anthropic-beta"),
            }
        )
        msg = self.message(body, idx, step)
        if not body.get("stream"):
            return web.json_response(msg)
        return await self._stream(request, msg)

    async def _stream(self, request: web.Request, msg: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        usage = msg["usage"]
        start = {
            **msg,
            "content": [],
            "stop_reason": None,
            "usage": {**usage, "output_tokens": min(1, usage["output_tokens"])},
        }
        await send("message_start", {"type": "message_start", "message": start})
        block = msg["content"][0]
        if block["type"] == "text":
            await send(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            await send(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": block["text"]}},
            )
        else:
            await send(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}},
                },
            )
            await send(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
                },
            )
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp

    async def handle_count_tokens(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self._record({"path": request.path, "bytes": len(raw)})
        return web.json_response({"input_tokens": max(1, len(raw) // 4)})

    async def handle_other(self, request: web.Request) -> web.Response:
        self._record({"path": request.path, "method": request.method, "unhandled": True})
        return web.json_response(_error("not_found_error", f"no such endpoint: {request.path}"), status=404)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.handle_messages)
        app.router.add_post("/v1/messages/count_tokens", self.handle_count_tokens)
        app.router.add_route("*", "/{tail:.*}", self.handle_other)
        return app


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


async def serve(model: ScriptedModel, host: str, port: int) -> web.AppRunner:
    """Start the server in the running loop; the caller keeps the runner and cleans it up."""
    runner = web.AppRunner(model.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def run_forever(model: ScriptedModel, host: str, port: int) -> None:
    async def main() -> None:
        await serve(model, host, port)
        await asyncio.Event().wait()

    asyncio.run(main())
