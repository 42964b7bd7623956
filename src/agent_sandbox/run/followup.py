"""Follow-up runs: a run that continues an earlier run's branch, with what came before as context.

The earlier run is read from its run directory (spec.json, summary.json, the audit trail), never from the
fleet's views: the runner resolves it before anything exists, and a refusal leaves nothing behind. The
context is plain text appended to the new instruction, bounded in size, newest run last.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import git
from pydantic import ValidationError

from agent_sandbox.errors import UsageError
from agent_sandbox.git.checkout import HostRepo, branch_exists
from agent_sandbox.run.lookup import find_run_dir
from agent_sandbox.run.spec import RunSpec, RunSummary

log = logging.getLogger(__name__)

# The whole context section, in UTF-8 bytes: enough for a few rounds of instruction and result, small next to
# the model's context window, and a fixed cost whatever the history.
MAX_CONTEXT_BYTES = 16 * 1024
# One run's instruction or result text: a long one must not push every other run out of the section.
MAX_TEXT_CHARS = 4000
MAX_COMMITS = 30
MAX_FILES = 50
# How far back a chain is followed: older runs would not fit the bound anyway.
MAX_CHAIN = 20

BEGIN = "===== Context: earlier sandbox runs on this branch (for reference; do what the instruction above asks) ====="
END = "===== End of context ====="


@dataclass(frozen=True)
class EarlierRun:
    """A finished run, as its run directory records it."""

    run_dir: Path
    spec: RunSpec
    summary: RunSummary | None  # None while it runs, or when its supervisor died before writing it

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def instruction(self) -> str:
        """What this run was asked, without the context of its own earlier runs."""
        return self.spec.instruction if self.spec.instruction is not None else self.spec.task


@dataclass(frozen=True)
class Step:
    """One earlier run as the agent is told about it."""

    run_id: str
    instruction: str
    outcome: str  # status (reason): message
    result: str | None  # the agent's final text, when it gave one
    commits: list[str] = field(default_factory=list)  # "<short sha> <subject>", oldest first
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FollowUp:
    """What a follow-up run takes from the run it continues."""

    earlier: EarlierRun
    branch: str
    head: str  # the branch's current tip: the new run's base
    context: str  # the section appended to the new instruction
    warnings: list[str]


def find_run(run_id: str) -> Path:
    """The run directory of a run id, or of a unique prefix of one."""
    return find_run_dir(run_id, marker="spec.json", label="--follow-up")


def load_run(run_dir: Path) -> EarlierRun:
    try:
        spec = RunSpec.model_validate_json((run_dir / "spec.json").read_text())
        summary = None
        if (run_dir / "summary.json").is_file():
            summary = RunSummary.model_validate_json((run_dir / "summary.json").read_text())
    except (OSError, ValidationError) as exc:
        raise UsageError(f"--follow-up: the records of run {run_dir.name} are unreadable: {exc}") from None
    return EarlierRun(run_dir=run_dir, spec=spec, summary=summary)


def result_text(run_dir: Path) -> str | None:
    """The agent's final result text: from the audit trail's `result` event, else from its raw stream (a trail
    written before the event existed). The last one wins."""
    found: str | None = None
    for name, kind, key in (("audit.jsonl", "type", "payload"), ("agent-stream.jsonl", "type", None)):
        path = run_dir / name
        if not path.is_file():
            continue
        with path.open("rb") as fh:
            for raw in fh:
                if b'"result"' not in raw:  # most lines are not: skip the parse
                    continue
                try:
                    line = json.loads(raw)
                    if line.get(kind) != "result":
                        continue
                    body = line[key] if key else line
                    text = body.get("result")
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                if isinstance(text, str):
                    found = text
        if found is not None:
            return found
    return None


def chain(run: EarlierRun) -> list[EarlierRun]:
    """The run and the runs it followed up on, oldest first; a link whose run is gone ends the chain."""
    runs = [run]
    seen = {run.run_id}
    while runs[-1].spec.follow_up and len(runs) < MAX_CHAIN:
        earlier_id = runs[-1].spec.follow_up
        if earlier_id in seen:
            break
        try:
            runs.append(load_run(find_run(earlier_id)))
        except UsageError:
            log.info("follow_up_chain_ends run_id=%s missing=%s", runs[-1].run_id, earlier_id)
            break
        seen.add(earlier_id)
    return runs[::-1]


def _cut(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + f"\n[... cut: {len(text) - limit} more characters]"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines()) or ">"


def render_step(step: Step, text_limit: int = MAX_TEXT_CHARS) -> str:
    lines = [f"## Run {step.run_id}", "", "What it was asked:", _quote(_cut(step.instruction, text_limit)), ""]
    lines += [f"How it ended: {step.outcome}", ""]
    if step.result is not None:
        lines += ["The agent's final answer:", _quote(_cut(step.result, text_limit)), ""]
    else:
        lines += ["The agent gave no final answer.", ""]
    if step.commits:
        lines.append("Its commits:")
        lines += [f"- {c}" for c in step.commits[:MAX_COMMITS]]
        if len(step.commits) > MAX_COMMITS:
            lines.append(f"- ... and {len(step.commits) - MAX_COMMITS} more")
    else:
        lines.append("Its commits: none")
    if step.files:
        shown = ", ".join(step.files[:MAX_FILES])
        more = f", and {len(step.files) - MAX_FILES} more" if len(step.files) > MAX_FILES else ""
        lines.append(f"Files it changed: {shown}{more}")
    return "\n".join(lines).rstrip() + "\n"


def build_context(steps: list[Step], branch: str, limit: int = MAX_CONTEXT_BYTES) -> str:
    """The context section for the steps (oldest first), at most `limit` UTF-8 bytes. The newest runs matter
    most: older ones are left out first, and the newest is shortened rather than dropped; the section says
    what it left out."""

    def size(text: str) -> int:
        return len(text.encode())

    head = (
        f"{BEGIN}\n\nThis run continues the branch `{branch}`: the workspace starts at its tip, with the work of "
        f"the earlier run(s) below already committed. Oldest first:\n\n"
    )
    tail = f"{END}\n"
    budget = limit - size(head) - size(tail) - 200  # room for the note on what was left out
    kept: list[str] = []
    for i, step in enumerate(reversed(steps)):
        text = render_step(step)
        if size(text) + 1 > budget - sum(size(k) + 1 for k in kept):
            if i > 0:
                break
            # The newest run alone is too big: shorten its texts until it fits.
            text_limit = MAX_TEXT_CHARS
            while size(text) + 1 > budget and text_limit > 200:
                text_limit //= 2
                text = render_step(step, text_limit)
            text = text.encode()[: max(budget - 1, 0)].decode(errors="ignore")
        kept.append(text)
    left_out = steps[: len(steps) - len(kept)]
    note = ""
    if left_out:
        ids = ", ".join(s.run_id for s in left_out)
        note = f"[{len(left_out)} older run(s) left out to keep this section under {limit // 1024} kB: {ids[:120]}]\n\n"
    body = "\n".join(reversed(kept))
    out = head + note + body + "\n" + tail
    if size(out) > limit:  # only a pathological run id or branch name gets here
        out = out.encode()[: limit - size(tail) - 1].decode(errors="ignore") + "\n" + tail
    return out


def _subjects(host: HostRepo, commits: list[str]) -> list[str]:
    """ "<short sha> <subject>" per commit; a commit the repository no longer has is named by its sha alone."""
    if not commits:
        return []
    shown = commits[:MAX_COMMITS]
    try:
        out = git.Git(host.path).show("-s", "--format=%H %s", "--no-walk=unsorted", *shown)
        subjects = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())
    except git.GitCommandError:
        subjects = {}
    return [f"{c[:12]} {subjects.get(c, '')}".rstrip() for c in shown] + commits[MAX_COMMITS:]


def _checked_out(host: HostRepo, branch: str) -> str | None:
    """The working tree (the main one or a linked worktree) that has the branch checked out, if any."""
    try:
        out = git.Git(host.path).worktree("list", "--porcelain")
    except git.GitCommandError:
        return None
    path: str | None = None
    for line in out.splitlines():
        if line.startswith("worktree "):
            path = line.removeprefix("worktree ")
        elif line == f"branch refs/heads/{branch}":
            return path or str(host.path)
    return None


def step_of(host: HostRepo, run: EarlierRun) -> Step:
    s = run.summary
    outcome = f"{s.status} ({s.reason}): {s.message}" if s is not None else "unknown (the run left no summary)"
    return Step(
        run_id=run.run_id,
        instruction=run.instruction,
        outcome=_cut(outcome, 600),
        result=result_text(run.run_dir),
        commits=_subjects(host, s.commits) if s is not None else [],
        files=list(s.files_changed) if s is not None else [],
    )


def resolve(run_id: str, host: HostRepo, active_branches: dict[str, str] | None = None) -> FollowUp:
    """The earlier run a follow-up continues, checked: it exists, is this repository's, finished, left a
    branch that passed the policy's git rules, the branch is still there, and no other run is at work on it
    (active_branches: branch -> id of a running run). Every refusal is a UsageError; nothing is created."""
    earlier = load_run(find_run(run_id))
    rid = earlier.run_id
    if Path(earlier.spec.repo).resolve() != host.path.resolve():
        raise UsageError(
            f"--follow-up: run {rid} belongs to another repository ({earlier.spec.repo}), not {host.path}",
            hint=f"pass --repo {earlier.spec.repo}",
        )
    s = earlier.summary
    if s is None:
        raise UsageError(
            f"--follow-up: run {rid} has not finished (it is running, or its supervisor died)",
            hint="wait for it (`sandbox logs -f`), or let `sandbox gc` finish it",
        )
    if s.kept:
        raise UsageError(
            f"--follow-up: run {rid}'s work was never imported onto its branch (kept at {s.kept})",
            hint="`sandbox gc` imports it once the cause is fixed",
        )
    # A follow-up that changed nothing leaves its branch where the run before it put it: that branch goes on.
    branch = s.branch or (earlier.spec.branch if earlier.spec.follow_up else None)
    if branch is None:
        raise UsageError(f"--follow-up: run {rid} changed nothing, so there is no branch to continue")
    if s.violations:
        # Its commits would reach the remote with the follow-up's, past the gate that refused them.
        raise UsageError(
            f"--follow-up: run {rid}'s change broke the policy's git rules ({s.violations[0].rule}); "
            "a follow-up would carry it onto the remote",
            hint="start a new run instead",
        )
    if not branch_exists(host, branch):
        raise UsageError(f"--follow-up: run {rid}'s branch {branch} no longer exists in {host.path}")
    where = _checked_out(host, branch)
    if where is not None:
        # git will not move a branch a working tree has checked out, and the follow-up's work would be lost
        # at the import: refused now, before it is done.
        raise UsageError(
            f"--follow-up: branch {branch} is checked out in {where}; the follow-up could not move it",
            hint="check out another branch there first (`git switch -`)",
        )
    busy = (active_branches or {}).get(branch)
    if busy is not None and busy != rid:
        raise UsageError(
            f"--follow-up: run {busy} is still working on {branch}; wait for it to finish",
            hint=f"then follow up on {busy} (if its supervisor died, `sandbox gc` finishes it)",
        )
    g = git.Git(host.path)
    head = g.rev_parse("--verify", f"refs/heads/{branch}^{{commit}}")
    warnings: list[str] = []
    if s.head and s.head != head:
        try:
            g.merge_base("--is-ancestor", s.head, head)
            moved = "has moved on since (commits added on top)"
        except git.GitCommandError:
            moved = "was rewritten since: its earlier tip is no longer in its history, so a push may be refused"
        warnings.append(f"branch {branch} {moved}; run {rid} left it at {s.head[:12]}, this run starts at {head[:12]}")
    steps = [step_of(host, r) for r in chain(earlier)]
    return FollowUp(earlier=earlier, branch=branch, head=head, context=build_context(steps, branch), warnings=warnings)


def task_with_context(instruction: str, context: str) -> str:
    """The agent's task: the new instruction first (it names the run in `sandbox ls` and titles a pull request),
    then the delimited context."""
    return f"{instruction.rstrip()}\n\n{context}"
