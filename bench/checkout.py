#!/usr/bin/env python3
"""Benchmark: the sandbox's task checkout against `git clone` and `git worktree add` on a large repository.

    .venv/bin/python bench/checkout.py [--files 30000] [--commits 200] [--repeat 3] [--all] [--json]

It generates a repository with git fast-import (many files, a long history), then times each way of
getting a working tree of HEAD, median of --repeat runs, and prints the ratios. The sandbox's checkout
(git/checkout.py, prepare_checkout, with the owner the supervisor gives the workspace: the agent's uid when
run as root) borrows the host's objects (alternates) and copies nothing but the working tree. The workspace's
disk-quota filesystem, which the supervisor mounts first where the machine allows it, is not counted.

The headline (issue 15, ratio 2): the sandbox checkout against `git worktree add`, goal <= 0.5 s and >= 10x
faster. --all also times `git clone` (local with hardlinks, and --no-local, which repacks every object and
takes minutes). --json prints one JSON object (the progress goes to stderr).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for bench.machine

from bench.machine import machine  # noqa: E402

from agent_sandbox.git.checkout import open_repo, prepare_checkout  # noqa: E402
from agent_sandbox.run.workloads import Users  # noqa: E402

GOAL_SECONDS = 0.5
GOAL_SPEEDUP = 10.0


def generate(root: Path, files: int, commits: int) -> Path:
    repo = root / "big"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    rng = random.Random(7)
    words = [f"token{i}" for i in range(5000)]
    lines: list[bytes] = []
    mark = 0

    def blob(content: bytes) -> int:
        nonlocal mark
        mark += 1
        lines.append(b"blob\nmark :%d\ndata %d\n%s\n" % (mark, len(content), content))
        return mark

    def text() -> bytes:
        return ("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(40)) + "\n").encode()

    paths = [f"pkg{i % 300}/mod{i // 300}/file{i}.py" for i in range(files)]
    for c in range(commits):
        touched = paths if c == 0 else rng.sample(paths, 150)
        marks = [(p, blob(text())) for p in touched]
        when = 1_700_000_000 + c * 3600
        lines.append(b"commit refs/heads/main\ncommitter bench <bench@example.invalid> %d +0000\n" % when)
        msg = f"commit {c}".encode()
        lines.append(b"data %d\n%s\n" % (len(msg), msg))
        for p, m in marks:
            lines.append(b"M 100644 :%d %s\n" % (m, p.encode()))
        lines.append(b"\n")
    subprocess.run(["git", "-C", str(repo), "fast-import", "--quiet"], input=b"".join(lines), check=True)
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "-f", "main"], check=True)
    subprocess.run(["git", "-C", str(repo), "gc", "-q"], check=True)
    return repo


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=30000)
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="also time git clone (local, and --no-local: slow)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    owner = Users.here().chown  # what the supervisor gives the workspace (the agent's uid when run as root)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        repo = generate(root, args.files, args.commits)
        size = sum(p.stat().st_size for p in (repo / ".git" / "objects").rglob("*") if p.is_file())
        generated = time.perf_counter() - t0
        say(
            f"repository: {args.files} files, {args.commits} commits, {size / 1e6:.0f} MB of objects "
            f"(generated in {generated:.1f}s)"
        )
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        host = open_repo(repo)
        results: dict[str, list[float]] = {}
        for i in range(args.repeat):
            ways: dict[str, Callable[[Path], object]] = {
                "git worktree add": lambda d: subprocess.run(
                    ["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(d), head], check=True
                ),
                "sandbox checkout": lambda d, i=i: prepare_checkout(host, head, d, f"sandbox/bench-{i}", owner),
            }
            if args.all:
                ways["git clone (local, hardlinks)"] = lambda d: subprocess.run(
                    ["git", "clone", "-q", str(repo), str(d)], check=True
                )
                ways["git clone --no-local"] = lambda d: subprocess.run(
                    ["git", "clone", "-q", "--no-local", str(repo), str(d)], check=True
                )
            for name, fn in ways.items():
                dest = root / f"out-{i}-{len(results.get(name, []))}-{abs(hash(name))}"
                results.setdefault(name, []).append(timed(lambda fn=fn, dest=dest: fn(dest)))
                shutil.rmtree(dest)
            subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=True)
        ours = statistics.median(results["sandbox checkout"])
        worktree = statistics.median(results["git worktree add"])
        result = {
            "benchmark": "checkout",
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "files": args.files,
            "commits": args.commits,
            "objects_mb": round(size / 1e6),
            "repeat": args.repeat,
            "owner": list(owner) if owner else None,
            "sandbox_checkout_s": round(ours, 3),
            "worktree_add_s": round(worktree, 3),
            "speedup": round(worktree / ours, 2),
            "goal_s": GOAL_SECONDS,
            "goal_speedup": GOAL_SPEEDUP,
            "medians_s": {name: round(statistics.median(times), 3) for name, times in results.items()},
            "samples_s": {name: [round(t, 3) for t in times] for name, times in results.items()},
        }
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(f"{'method':<30} {'median s':>9} {'vs sandbox':>11}")
        for name, times in results.items():
            med = statistics.median(times)
            print(f"{name:<30} {med:>9.2f} {med / ours:>10.2f}x")
        ok = ours <= GOAL_SECONDS and worktree / ours >= GOAL_SPEEDUP
        print(
            f"headline: sandbox checkout {ours:.2f}s, {worktree / ours:.2f}x faster than git worktree add "
            f"(goal <= {GOAL_SECONDS}s and >= {GOAL_SPEEDUP:.0f}x): {'met' if ok else 'not met'}"
        )


if __name__ == "__main__":
    main()
