"""The diff policy gate: the agent's change is checked against the policy's git rules before anything is
pushed. It reads only objects, through plumbing commands in the host repository: no checkout, no
attributes, no filters, no hooks."""

from __future__ import annotations

import subprocess
import threading

import git
import pathspec
from pydantic import BaseModel, ConfigDict, Field

from agent_sandbox.config.policy import GitSettings
from agent_sandbox.git.checkout import HARDENED, HostRepo


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


MAX_LINK_HOPS = 40
"""Links followed while resolving one path, as Linux's MAXSYMLINKS: past it a path does not resolve (ELOOP)."""


def _raw(repo: HostRepo, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(["git", *HARDENED, *args], cwd=repo.path, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        raise git.GitCommandError(["git", *args], proc.returncode, proc.stderr)
    return proc.stdout


def _links(repo: HostRepo, commit: str) -> dict[str, str]:
    """Every symbolic link in the commit's tree: path -> target, both as the bytes git holds (surrogateescape)."""
    raw = _raw(repo, "ls-tree", "-r", "-z", "--full-tree", commit)
    shas: dict[str, str] = {}
    for rec in raw.split(b"\0"):
        meta, _, path = rec.partition(b"\t")
        if meta.startswith(b"120000 "):
            shas[path.decode("utf-8", "surrogateescape")] = meta.split(b" ")[2].decode()
    if not shas:
        return {}
    unique = sorted(set(shas.values()))
    out = _raw(repo, "cat-file", "--batch", stdin="".join(f"{s}\n" for s in unique).encode())
    targets: dict[str, str] = {}
    pos = 0
    for sha in unique:
        end = out.index(b"\n", pos)
        size = int(out[pos:end].split(b" ")[2])
        targets[sha] = out[end + 1 : end + 1 + size].decode("utf-8", "surrogateescape")
        pos = end + 1 + size + 1
    return {path: targets[sha] for path, sha in shas.items()}


def resolve_link(links: dict[str, str], path: str) -> str | None:
    """Why the link at `path` resolves outside the repository, or None when it stays inside.

    Resolves as the filesystem would, with the tree as the filesystem: the target is read relative to the
    link's directory, every component that is itself a link is followed (also the last one: links to
    links), `..` climbs, and a target or component that starts with `/` is absolute. Paths the tree does not
    hold count as plain directories, so `missing/../..` is judged by its text. More than MAX_LINK_HOPS links
    on the way means it does not resolve at all (a loop), which is flagged too."""
    resolved: list[str] = path.split("/")[:-1]
    pending = links[path].split("/")
    if links[path].startswith("/"):
        return f"its target {links[path]!r} is absolute"
    hops = 1
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return "it climbs above the top of the repository"
            resolved.pop()
            continue
        here = "/".join([*resolved, part])
        target = links.get(here)
        if target is None:
            resolved.append(part)
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:
            return f"it does not resolve: more than {MAX_LINK_HOPS} links on the way (a loop?)"
        if target.startswith("/"):
            return f"it goes through {here} -> {target}, which is absolute"
        pending = target.split("/") + pending
    return None


def _escaping_links(repo: HostRepo, base: str, head: str) -> list[tuple[str, str, str]]:
    """(path, target, why) for each link of the head commit that resolves outside the repository and is new
    in doing so: a link the change added or retargeted, or one that stayed inside at the base (a chain the
    change completed, say by turning a directory it goes through into a link). A link that is unchanged and
    already left the repository at the base is the host's own, and not the change's doing."""
    links = _links(repo, head)
    out = []
    base_links: dict[str, str] | None = None
    for path in sorted(links):
        why = resolve_link(links, path)
        if why is None:
            continue
        if base_links is None:
            base_links = _links(repo, base)
        if base_links.get(path) == links[path] and resolve_link(base_links, path) is not None:
            continue
        out.append((path, links[path], why))
    return out


def _blobs_with_nul(repo: HostRepo, shas: list[str]) -> set[str]:
    """The blobs among `shas` that hold a NUL byte anywhere. git's own binary sniff reads the first 8,000
    bytes only, so text followed by binary passes it; this reads every byte, streamed, a blob at a time."""
    if not shas:
        return set()
    found: set[str] = set()
    proc = subprocess.Popen(
        ["git", *HARDENED, "cat-file", "--batch"],
        cwd=repo.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None and stdout is not None

    def feed() -> None:  # in a thread: git answers while it reads, and neither pipe may fill up and stall
        with stdin:
            stdin.write("".join(f"{sha}\n" for sha in shas).encode())

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        for _ in shas:
            header = stdout.readline().split()
            if len(header) != 3:
                continue  # "<sha> missing"
            left = int(header[2])
            while left:
                chunk = stdout.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                if b"\0" in chunk:
                    found.add(header[0].decode())
            stdout.read(1)  # the newline after the contents
    finally:
        stdout.close()
        proc.wait()
        feeder.join(timeout=10)
    return found


def _forbidden(spec: pathspec.GitIgnoreSpec, patterns: list[str], path: str, is_link: bool) -> str | None:
    """Why `path` breaks forbidden_paths, or None. Case does not matter (a case-insensitive checkout puts
    `.GitHub/workflows/x.yml` in `.github/workflows`), and a link counts for what lies beneath it: a link at
    `.github/workflows` (or `.github`) to a directory of the agent's puts that directory's files there."""
    low = path.lower()
    if spec.match_file(low):
        return f"{path} matches forbidden_paths"
    if is_link and (spec.match_file(low + "/_") or any(p.lstrip("/").startswith(low + "/") for p in patterns)):
        return f"{path} is a link where forbidden_paths covers what lies beneath it"
    return None


def check(repo: HostRepo, base: str, head: str, rules: GitSettings) -> GateResult:
    changes = _changes(repo, base, head)
    stats = _numstat(repo, base, head)
    result = GateResult(files=len(changes))
    v = result.violations
    patterns = [p.lower() for p in rules.forbidden_paths]
    forbidden = pathspec.GitIgnoreSpec.from_lines(patterns)
    text_blobs = [
        sha
        for _o, mode, sha, path in changes
        if mode in ("100644", "100755") and stats.get(path, (0, 0))[0] is not None
    ]
    nul = set() if rules.allow_binary else _blobs_with_nul(repo, text_blobs)
    for _old_mode, new_mode, new_sha, path in changes:
        why = _forbidden(forbidden, patterns, path, new_mode == "120000")
        if why:
            v.append(_violation("forbidden_paths", why, path))
        added, deleted = stats.get(path, (0, 0))
        if (added is None or new_sha in nul) and new_mode not in ("160000", "000000") and not rules.allow_binary:
            v.append(_violation("allow_binary", f"{path} is binary", path))
        result.lines += (added or 0) + (deleted or 0)
    for path, target, why in _escaping_links(repo, base, head):
        v.append(_violation("symlink", f"{path} links outside the repository: {target} ({why})", path))
    if result.files > rules.max_changed_files:
        v.append(_violation("max_changed_files", f"{result.files} files changed, more than {rules.max_changed_files}"))
    if result.lines > rules.max_changed_lines:
        v.append(_violation("max_changed_lines", f"{result.lines} lines changed, more than {rules.max_changed_lines}"))
    if any(p == ".gitmodules" for *_, p in changes):
        before, after = _submodule_urls(repo, base), _submodule_urls(repo, head)
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                v.append(
                    _violation("submodule_url", f"{key}: {before.get(key)!r} -> {after.get(key)!r}", ".gitmodules")
                )
    return result
