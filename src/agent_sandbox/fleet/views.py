"""What the operator's commands show: models for their --json output, and readable one-line events."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent_sandbox.errors import UsageError
from agent_sandbox.run.liveness import supervised
from agent_sandbox.run.lookup import find_run_dir
from agent_sandbox.run.spec import RunSpec, RunSummary
from agent_sandbox.store import RunStore


class RunRow(BaseModel):
    """One run as the run store indexes it (`sandbox ls --json`)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    """The run id."""
    repo: str
    """The host repository."""
    base_commit: str
    """Where the agent started."""
    branch: str | None
    """The branch with the work."""
    task: str
    """The task's first line."""
    policy: str
    """The policy's name."""
    policy_sha256: str
    """The policy's hash."""
    status: str
    """running, succeeded, failed or killed; `orphaned` for a run the store calls running that nobody
    supervises any more (its supervisor died): `sandbox gc`, or the next `sandbox run`, recovers it."""
    reason: str | None
    """Why it ended."""
    message: str | None
    """For people."""
    started_at: float
    """Unix time."""
    ended_at: float | None
    """Unix time."""
    duration_s: float | None
    """Wall time."""
    cost_usd: float
    """Model spend."""
    input_tokens: int
    """Uncached input tokens."""
    output_tokens: int
    """Output tokens."""
    cache_read_tokens: int
    """Cache-read tokens."""
    cache_write_tokens: int
    """Cache-write tokens."""
    turns: int
    """Agent turns."""
    egress_denied: int
    """Connections the proxy refused."""
    files_changed: int
    """Paths the branch changes."""
    pushed: bool
    """Pushed for review."""
    run_dir: str
    """The run directory."""
    supervisor_pid: int | None
    """The supervisor's process id."""
    audit_head: str | None
    """SHA-256 of the audit trail's last line, recorded when the run ended."""
    recover: str | None = None
    """Set while the run's work waits for `sandbox gc` to import it (the engine or the disk failed)."""


class RunDetails(BaseModel):
    """Everything `sandbox show` shows about one run."""

    model_config = ConfigDict(extra="forbid")

    run: RunRow
    """The store's row."""
    summary: RunSummary | None
    """The outcome, once the run has ended."""
    spec: RunSpec
    """What was asked: repo, base, task, policy (with its limits), model."""
    hosts_allowed: dict[str, int] = Field(default_factory=dict)
    """host:port -> connections let through."""
    hosts_denied: dict[str, int] = Field(default_factory=dict)
    """host:port -> connections refused."""
    hosts_would_deny: dict[str, int] = Field(default_factory=dict)
    """host:port -> connections report mode let through that enforce mode would refuse."""
    limits_hit: list[str] = Field(default_factory=list)
    """The limits that ended the run."""
    tool_calls: dict[str, int] = Field(default_factory=dict)
    """Tool name -> calls."""


def since_to_epoch(value: str) -> float:
    """'30m', '2h', '7d' ago, or an ISO date/time (UTC unless it says otherwise)."""
    m = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if m:
        return time.time() - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--since {value!r}: use e.g. 30m, 2h, 7d or 2026-11-22T08:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def list_runs(
    store: RunStore, repo: str | None = None, status: str | None = None, since: str | None = None, limit: int = 50
) -> list[RunRow]:
    """`sandbox ls`: the latest runs, filtered by the command's options (`since` as the option takes it)."""
    rows = store.list_runs(
        repo=str(Path(repo).expanduser().resolve()) if repo else None,
        status=status or None,
        since=since_to_epoch(since) if since else None,
        limit=limit,
    )
    return [_row(r) for r in rows]


def _row(r: dict[str, Any]) -> RunRow:
    if r["status"] == "running" and not supervised(Path(r["run_dir"])):
        r["status"] = "orphaned"
    return RunRow.model_validate(r)


def resolve_run(run_id: str) -> Path:
    """The run directory for an id or a unique prefix of one."""
    return find_run_dir(run_id, marker="audit.jsonl")


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines() if line.strip()]


def follow_events(run_dir: Path, follow: bool, poll: float = 0.25) -> Iterator[str]:
    """Lines of the audit trail; with follow, keep reading until the run has ended, or until nobody
    supervises it any more (its supervisor died: `sandbox gc` finishes it)."""
    path = run_dir / "audit.jsonl"
    idle_polls = 0
    with path.open() as fh:
        buf = ""
        while True:
            chunk = fh.readline()
            if chunk:
                idle_polls = 0
                buf += chunk
                if buf.endswith("\n"):
                    line, buf = buf.rstrip("\n"), ""
                    yield line
                    if follow and '"type":"run_ended"' in line:
                        return
                continue
            if not follow or (run_dir / "summary.json").exists():
                return
            idle_polls += 1
            # The lock is held from before the first line to after the last: free means no one will write more.
            if idle_polls % 4 == 0 and not supervised(run_dir):
                return
            time.sleep(poll)


def brief(event: dict[str, Any]) -> str:
    """One readable line for an event."""
    p, t = event.get("payload", {}), event.get("type")
    stamp = dt.datetime.fromtimestamp(event.get("time", 0), dt.UTC).strftime("%H:%M:%S")
    text: str
    if t == "tool_call":
        inp = p.get("input") or {}
        text = f"{p.get('name')}: {inp.get('command') or inp.get('file_path') or inp.get('pattern') or ''}"
    elif t == "tool_result":
        text = f"{'error' if p.get('is_error') else 'ok'} ({p.get('size')} chars) {p.get('excerpt', '')[:100]}"
    elif t == "assistant_text":
        text = p.get("text", "")
    elif t == "model_call":
        u = p.get("usage", {})
        text = (
            f"{p.get('model')} {u.get('input_tokens')} in / {u.get('output_tokens')} out, "
            f"${p.get('cost_usd')} (run ${p.get('spent_usd')} of ${p.get('budget_usd')})"
        )
    elif t == "egress":
        text = f"{p.get('decision')} {p.get('method')} {p.get('host')}:{p.get('port')}"
        text += f" rule={p.get('rule')}" if p.get("rule") else ""
        text += f" ({p.get('reason')})" if p.get("reason") else f" {p.get('bytes_up')}B up {p.get('bytes_down')}B down"
    elif t == "limit_hit":
        text = f"{p.get('limit')}: {p.get('message')}"
    elif t == "run_ended":
        text = f"{p.get('status')} ({p.get('reason')}): {p.get('message')}"
    elif t == "container_created":
        sec = p.get("security", {})
        text = f"{p.get('role')} {sec.get('name')} user={sec.get('user')} image={sec.get('image')}"
    elif t == "result":
        text = f"{p.get('subtype')} after {p.get('num_turns')} turns"
    elif t == "run_started":
        sp = p.get("spec", {})
        text = (
            f"{sp.get('repo')} @ {str(sp.get('base_commit'))[:12]}, policy {sp.get('policy', {}).get('name')}, "
            f"model {sp.get('model')}: {p.get('task', '').splitlines()[0][:80] if p.get('task') else ''}"
        )
    elif t == "ready":
        text = (
            f"gateway :{p.get('gateway_port')} -> {p.get('upstream')}, proxy :{p.get('proxy_port')} "
            f"({p.get('egress_mode')}, {len(p.get('allow', []))} allow rule(s))"
        )
    elif t == "resource_usage":
        text = (
            f"peak memory {p.get('peak_memory_bytes', 0) // 2**20} MiB, cpu {p.get('cpu_seconds')}s, "
            f"peak pids {p.get('peak_pids')}"
        )
    elif t == "imported":
        text = f"{p.get('branch')}: {len(p.get('commits', []))} commit(s), {len(p.get('files', []))} file(s)"
    else:
        text = json.dumps(p, separators=(",", ":"))[:160]
    return f"{stamp} {event.get('seq'):>4} {event.get('source'):<10} {t:<18} {text}".rstrip()


def details(run_dir: Path, store: RunStore) -> RunDetails:
    spec = RunSpec.model_validate_json((run_dir / "spec.json").read_text())
    row = store.get(spec.run_id)
    if row is None:
        raise UsageError(f"run {spec.run_id} is not in the run store {store.path}")
    summary = None
    if (run_dir / "summary.json").is_file():
        summary = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
    events = read_events(run_dir)
    by_decision: dict[str, Counter[str]] = {"allow": Counter(), "deny": Counter(), "would_deny": Counter()}
    tools: Counter[str] = Counter()
    limits = []
    for e in events:
        p = e["payload"]
        if e["type"] == "egress":
            key = f"{p.get('host')}:{p.get('port')}"
            # An upstream error was still an allowed connection.
            by_decision.get(str(p.get("decision")), by_decision["allow"])[key] += 1
        elif e["type"] == "tool_call":
            tools[p.get("name") or "?"] += 1
        elif e["type"] == "limit_hit":
            limits.append(str(p.get("limit")))
    return RunDetails(
        run=_row(dict(row)),
        summary=summary,
        spec=spec,
        hosts_allowed=dict(by_decision["allow"]),
        hosts_denied=dict(by_decision["deny"]),
        hosts_would_deny=dict(by_decision["would_deny"]),
        limits_hit=limits,
        tool_calls=dict(tools),
    )
