#!/usr/bin/env python3
"""Benchmark: the sandbox's task checkout against `git clone` and `git worktree add` on a large repository.

    .venv/bin/python bench/checkout.py [--files 30000] [--commits 200] [--repeat 3]

It generates a repository with git fast-import (many files, a long history), then times each way of
getting a working tree of HEAD, median of --repeat runs, and prints the ratios. The sandbox's checkout
borrows the host's objects (alternates) and copies nothing but the working tree.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from agent_sandbox.git.checkout import open_repo, prepare_checkout


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


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=30000)
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        repo = generate(root, args.files, args.commits)
        size = sum(p.stat().st_size for p in (repo / ".git" / "objects").rglob("*") if p.is_file())
        print(
            f"repository: {args.files} files, {args.commits} commits, {size / 1e6:.0f} MB of objects "
            f"(generated in {time.perf_counter() - t0:.1f}s)"
        )
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        host = open_repo(repo)
        results: dict[str, list[float]] = {}
        for i in range(args.repeat):
            ways = {
                "git clone (local, hardlinks)": lambda d: subprocess.run(
                    ["git", "clone", "-q", str(repo), str(d)], check=True
                ),
                "git clone --no-local": lambda d: subprocess.run(
                    ["git", "clone", "-q", "--no-local", str(repo), str(d)], check=True
                ),
                "git worktree add": lambda d: subprocess.run(
                    ["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(d), head], check=True
                ),
                "sandbox checkout": lambda d, i=i: prepare_checkout(host, head, d, f"sandbox/bench-{i}", None),
            }
            for name, fn in ways.items():
                dest = root / f"out-{i}-{len(results.get(name, []))}-{abs(hash(name))}"
                results.setdefault(name, []).append(timed(lambda fn=fn, dest=dest: fn(dest)))
                shutil.rmtree(dest)
            subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=True)
        ours = statistics.median(results["sandbox checkout"])
        print(f"{'method':<30} {'median s':>9} {'vs sandbox':>11}")
        for name, times in results.items():
            med = statistics.median(times)
            print(f"{name:<30} {med:>9.2f} {med / ours:>10.2f}x")


if __name__ == "__main__":
    main()
