"""The run report: a Markdown account of one run, from its audit trail and summary. Written to the run
directory, printed by `sandbox report`, and used as the pull request's body."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from agent_sandbox.audit.redact import visible
from agent_sandbox.run.spec import RunSummary
from agent_sandbox.sidecar.egress import DecisionTally, EgressHost, overview

MAX_COMMANDS = 60


KEPT_TYPES = ("run_started", "limit_hit", "imported")


class _Trail:
    """What the report needs from a trail, read line by line: a trail of any size (a connection flood) costs
    bounded memory. Egress lines are folded into one line per kind, with its count."""

    def __init__(self, run_dir: Path) -> None:
        self.by_type: dict[str, list[dict[str, Any]]] = {t: [] for t in KEPT_TYPES}
        self.commands: list[str] = []
        self.command_count = 0
        self.tools: Counter[str] = Counter()
        tally = DecisionTally()
        path = run_dir / "audit.jsonl"
        if not path.is_file():
            self.egress: list[dict[str, Any]] = []
            return
        with path.open("rb") as fh:
            for raw in fh:
                try:
                    e = json.loads(raw)
                    t, p = e["type"], e["payload"]
                except (ValueError, KeyError, TypeError):
                    continue
                if t in self.by_type:
                    self.by_type[t].append(p)
                elif t == "tool_call":
                    self.tools[str(p.get("name"))] += 1
                    if p.get("name") == "Bash":
                        self.command_count += 1
                        if len(self.commands) < MAX_COMMANDS:
                            self.commands.append(str((p.get("input") or {}).get("command", "")))
                elif t == "egress":
                    tally.add(p)
        self.egress = tally.lines()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(run_dir: Path, summary: RunSummary) -> str:
    # Much of the report is the agent's (commands, file names, messages): no control character of it reaches
    # the file, a terminal or a pull request raw; each is shown escaped (`\x1b`).
    return visible(_render(run_dir, summary))


def _render(run_dir: Path, summary: RunSummary) -> str:
    trail = _Trail(run_dir)
    by_type = trail.by_type
    started = (by_type.get("run_started") or [{}])[0]
    spec = started.get("spec", {})
    policy = spec.get("policy", {})
    task = started.get("task", "")
    if spec.get("instruction") is not None:
        # A follow-up's task repeats the earlier runs' tasks and results: their own reports have them.
        task = spec["instruction"]
    lines = [f"# Sandbox run {summary.id}", ""]
    lines += ["## Task", "", *(f"> {line}" if line else ">" for line in task.splitlines()), ""]
    if summary.follow_up:
        lines += [
            f"A follow-up of run {summary.follow_up}: it continued that run's branch, with the earlier "
            "runs' tasks, results and commits given to the agent as context.",
            "",
        ]
    lines += [
        "## Outcome",
        "",
        "| | |",
        "| --- | --- |",
        f"| status | **{summary.status}** ({summary.reason}) |",
        f"| message | {_md(summary.message)} |",
        f"| duration | {summary.duration_s:.1f} s |",
        f"| cost | ${summary.cost_usd:.4f} over {summary.model_calls} model call(s) |",
        f"| tokens | {summary.tokens.input} in, {summary.tokens.output} out, "
        f"{summary.tokens.cache_read} cache read, {summary.tokens.cache_write} cache write |",
        f"| turns | {summary.turns} |",
        f"| model | {spec.get('model', '?')} (Claude Code {started.get('claude_code_version', '?')}) |",
        f"| policy | {policy.get('name', '?')} (sha256 `{started.get('policy_hash', '?')[:16]}`) |",
        f"| base | `{summary.base_commit[:12]}`"
        + (f" (the tip of the branch, after run {summary.follow_up})" if summary.follow_up else "")
        + " |",
        f"| branch | {f'`{summary.branch}`' if summary.branch else 'none (no changes)'} |",
    ]
    if summary.pushed:
        lines.append(f"| pushed | yes, to `{summary.remote}` |")
    elif summary.push_error:
        lines.append(f"| pushed | no: {_md(summary.push_error)} |")
    lines.append("")

    if summary.warnings:
        lines += ["## Warnings", "", *(f"- {_md(w)}" for w in summary.warnings), ""]

    limits = by_type.get("limit_hit", [])
    lines += ["## Limits hit", ""]
    lines += [f"- {h.get('limit')}: {h.get('message', '')}" for h in limits] or ["None."]
    lines.append("")

    if summary.violations:
        lines += ["## Policy violations", "", "The branch is kept locally and was not pushed.", ""]
        lines += [
            f"- `{v.rule}`"
            + (f" `{v.path}`" if v.path else "")
            + f": {v.detail}"
            + (f". What to do: {v.hint}" if v.hint else "")
            for v in summary.violations
        ]
        lines.append("")

    imported = (by_type.get("imported") or [{}])[-1]
    files = imported.get("files", [])
    lines += ["## Files changed", ""]
    if files:
        lines += ["| file | + | - |", "| --- | ---: | ---: |"]
        for f in files:
            added = "bin" if f["added"] is None else f["added"]
            deleted = "bin" if f["deleted"] is None else f["deleted"]
            lines.append(f"| `{_md(f['path'])}` | {added} | {deleted} |")
    else:
        lines.append("None.")
    lines.append("")

    commands = trail.commands
    lines += [
        "## Commands run",
        "",
        "_As the agent's own output stream reports them: claims, not verified. "
        "The model calls and the network are the gateway's and the proxy's record._",
        "",
    ]
    if commands:
        lines += ["```"] + [c.replace("\n", " ")[:300] for c in commands[:MAX_COMMANDS]] + ["```"]
        if trail.command_count > MAX_COMMANDS:
            lines.append(f"... and {trail.command_count - MAX_COMMANDS} more (see the audit trail)")
    else:
        lines.append("None.")
    tools = trail.tools
    if tools:
        lines += ["", "Tool calls: " + ", ".join(f"{name} {n}" for name, n in tools.most_common())]
    lines.append("")

    report_mode = (policy.get("egress") or {}).get("mode") == "report"
    lines += network(trail.egress, report_mode)
    lines += ["", f"_Audit trail: `{run_dir / 'audit.jsonl'}`_", ""]
    lines += suggestion(trail.egress, report_mode)
    return "\n".join(lines)


def _hosts(hosts: list[EgressHost], with_reasons: bool) -> list[str]:
    out = []
    for h in hosts:
        line = f"- `{_md(h.where)}` ({h.connections})"
        if with_reasons and h.reasons:
            line += ": " + _md("; ".join(h.reasons))
        out.append(line)
    return out


def network(egress: list[dict[str, Any]], report_mode: bool) -> list[str]:
    """The report's network section: hosts allowed, denied and (report mode) would be denied, with reasons."""
    net = overview(egress)
    lines = ["## Network", ""]
    for title, hosts, show in (
        ("Hosts allowed", net.allowed, True),
        ("Hosts denied", net.denied, True),
        ("Would be denied (report mode)", net.would_deny, report_mode or net.would_deny),
    ):
        if not show:
            continue
        if hosts:
            lines += [f"{title}:", "", *_hosts(hosts, True), ""]
        else:
            lines += [f"{title}: none", ""]
    return lines[:-1]


def suggestion(egress: list[dict[str, Any]], report_mode: bool) -> list[str]:
    """The policy entries that would allow what was refused, as YAML to paste; nothing when nothing was."""
    s = overview(egress).suggestion
    if s.empty:
        return []
    if report_mode:
        lines = [
            "## Policy lines to add",
            "",
            "To allow in enforce mode what this run would have been denied, add these entries to the policy "
            "(merged into the `egress:` lists it already has):",
        ]
    else:
        lines = [
            "## To allow the denied hosts",
            "",
            "The policy would need these entries (merged into the `egress:` lists it already has) to allow "
            "the hosts denied above:",
        ]
    return [*lines, "", "```yaml", s.yaml().rstrip("\n"), "```", ""]


def write(run_dir: Path, summary: RunSummary) -> Path:
    path = run_dir / "report.md"
    path.write_text(render(run_dir, summary))
    return path
