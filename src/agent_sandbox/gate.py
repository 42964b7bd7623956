"""The diff policy gate: the agent's change is checked against the policy's git rules before anything is
pushed. It reads only objects, through plumbing commands in the host repository: no checkout, no
attributes, no filters, no hooks."""

from __future__ import annotations

import posixpath

import git
import pathspec
from pydantic import BaseModel, ConfigDict, Field

from .checkout import HARDENED, HostRepo
from .policy import GitSettings


class Violation(BaseModel):
    """One way the change breaks the policy's git rules."""

    model_config = ConfigDict(extra="forbid")

    rule: str
    """forbidden_paths, max_changed_files, max_changed_lines, allow_binary, symlink or submodule_url."""
    path: str | None = None
    """The offending path, where there is one."""
    detail: str
    """What is wrong, for people."""
    hint: str = ""
    """What to do about it."""


HINTS = {
    "forbidden_paths": "if the change may touch this path, remove its pattern from the policy's git.forbidden_paths",
    "symlink": "links that leave the repository are never imported; replace the link with the file it means",
    "allow_binary": "a generated file? add its pattern to the repository's .gitignore; if the change really "
                    "needs binary files, set git.allow_binary: true in the policy",
    "max_changed_files": "split the task, or raise git.max_changed_files in the policy",
    "max_changed_lines": "split the task, or raise git.max_changed_lines in the policy",
    "submodule_url": "submodule URLs are never changed by a sandboxed run; change them by hand after review",
}
"""What to do when a rule fires: in the summary, the report and the CLI's output."""


def _violation(rule: str, detail: str, path: str | None = None) -> Violation:
    return Violation(rule=rule, path=path, detail=detail, hint=HINTS.get(rule, ""))


class GateResult(BaseModel):
    """The gate's verdict on one change."""

    model_config = ConfigDict(extra="forbid")

    files: int = 0
    """Paths changed."""
    lines: int = 0
    """Lines added plus lines deleted (binary files count none)."""
    violations: list[Violation] = Field(default_factory=list)
    """Empty when the change passes."""

    @property
    def ok(self) -> bool:
        return not self.violations


def _git(repo: HostRepo, *args: str) -> str:
    return git.Git(repo.path).execute(["git", *HARDENED, *args], strip_newline_in_stdout=False)


def _changes(repo: HostRepo, base: str, head: str) -> list[tuple[str, str, str, str]]:
    """(old mode, new mode, new blob, path) for every changed path, from `git diff --raw -z`."""
    raw = _git(repo, "diff", "--raw", "-z", "--no-renames", "--no-abbrev", base, head)
    parts = raw.split("\0")
    out = []
    i = 0
    while i + 1 < len(parts) and parts[i].startswith(":"):
        old_mode, new_mode, _old_sha, new_sha, _status = parts[i][1:].split(" ")
        out.append((old_mode, new_mode, new_sha, parts[i + 1]))
        i += 2
    return out


def _numstat(repo: HostRepo, base: str, head: str) -> dict[str, tuple[int | None, int | None]]:
    raw = _git(repo, "diff", "--numstat", "-z", "--no-renames", base, head)
    out: dict[str, tuple[int | None, int | None]] = {}
    for rec in raw.split("\0"):
        if rec.count("\t") >= 2:
            added, deleted, path = rec.split("\t", 2)
            out[path] = (None if added == "-" else int(added), None if deleted == "-" else int(deleted))
    return out


def _submodule_urls(repo: HostRepo, commit: str) -> dict[str, str]:
    try:
        raw = _git(repo, "config", "--blob", f"{commit}:.gitmodules", "--get-regexp", r"^submodule\..*\.url$")
    except git.GitCommandError:
        return {}
    urls = {}
    for line in raw.splitlines():
        key, _, url = line.partition(" ")
        urls[key] = url
    return urls


def _escapes(path: str, target: str) -> bool:
    if target.startswith("/"):
        return True
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return joined == ".." or joined.startswith("../")


def check(repo: HostRepo, base: str, head: str, rules: GitSettings) -> GateResult:
    changes = _changes(repo, base, head)
    stats = _numstat(repo, base, head)
    result = GateResult(files=len(changes))
    v = result.violations
    forbidden = pathspec.GitIgnoreSpec.from_lines(rules.forbidden_paths)
    for _old_mode, new_mode, new_sha, path in changes:
        if forbidden.match_file(path):
            v.append(_violation("forbidden_paths", f"{path} matches forbidden_paths", path))
        if new_mode == "120000":
            target = _git(repo, "cat-file", "blob", new_sha)
            if _escapes(path, target):
                v.append(_violation("symlink", f"{path} links outside the repository: {target}", path))
        added, deleted = stats.get(path, (0, 0))
        if added is None and new_mode not in ("160000", "000000") and not rules.allow_binary:
            v.append(_violation("allow_binary", f"{path} is binary", path))
        result.lines += (added or 0) + (deleted or 0)
    if result.files > rules.max_changed_files:
        v.append(_violation("max_changed_files", f"{result.files} files changed, more than {rules.max_changed_files}"))
    if result.lines > rules.max_changed_lines:
        v.append(_violation("max_changed_lines", f"{result.lines} lines changed, more than {rules.max_changed_lines}"))
    if any(p == ".gitmodules" for *_, p in changes):
        before, after = _submodule_urls(repo, base), _submodule_urls(repo, head)
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                v.append(_violation("submodule_url", f"{key}: {before.get(key)!r} -> {after.get(key)!r}",
                                    ".gitmodules"))
    return result
