#!/usr/bin/env python3
"""Benchmark: preparing a run's workspace on a large repository, against `git worktree add`.

    .venv/bin/python bench/checkout.py [--files 30000] [--commits 200] [--repeat 3] [--all] [--json]

It generates a repository with git fast-import (many files, a long history), then times each way of getting
a working tree of HEAD, median of --repeat runs, and prints the ratios. The sandbox's figures are those of
run/workspace.py `prepare`, the call the supervisor makes, with the disk quota the supervisor plans (the
policy's default 10 GiB: a loop-mounted filesystem as root) and the owner it gives the workspace (the agent's
uid as root); the workspace is released between runs, untimed.

- warm (the headline, issue 15 ratio 2): a run on a base commit whose tree is cached, as for every run after
  the first on that commit. Where the supervisor can mount an overlay (root, overlayfs) this is the quota
  filesystem, the overlay over the cached tree and the run's `.git`; elsewhere it is a full checkout.
- cold: the first run on a commit, which also builds the commit's tree in the cache (each sample starts with an
  empty cache): what a full checkout costs, plus refreshing the tree's index.
- `git worktree add` of the same commit, for scale.

Goal: warm <= 0.5 s and >= 10x faster than `git worktree add`. --all also times the per-run full checkout
(`prepare_checkout`, what a run costs without root or overlayfs) and `git clone` (local with hardlinks, and
--no-local, which repacks every object and takes minutes). --json prints one JSON object (the progress goes
to stderr).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
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

from agent_sandbox.git.checkout import open_repo, prepare_checkout, remove_tree  # noqa: E402
from agent_sandbox.run import quota, workspace  # noqa: E402
from agent_sandbox.run.workloads import Users  # noqa: E402

DISK = 10 * 1024**3  # the default policy's limits.disk
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


def git_status_s(ws: Path, objects: Path, owner: tuple[int, int] | None) -> float:
    """`git status` in the workspace as the agent runs it (its uid; the host's objects where the container has
    them): whether the index the run starts with is clean without reading the files."""
    env = {**os.environ, "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects), "HOME": "/tmp"}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    cmd = ["git", "-C", str(ws), "status", "--porcelain"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        user=owner[0] if owner else None,
        group=owner[1] if owner else None,
    )
    took = time.perf_counter() - t0
    if proc.returncode != 0 or proc.stdout.strip():
        raise SystemExit(f"git status in the workspace is not clean: {proc.stdout[:300]} {proc.stderr[:300]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=30000)
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--all", action="store_true", help="also time the full checkout and git clone (slow)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    owner = Users.here().chown  # what the supervisor gives the workspace (the agent's uid when run as root)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    mode = "copy" if workspace.overlay_unavailable() else "overlay"
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # `git status` as the agent's uid walks down to the workspace
        t0 = time.perf_counter()
        repo = generate(root, args.files, args.commits)
        size = sum(p.stat().st_size for p in (repo / ".git" / "objects").rglob("*") if p.is_file())
        generated = time.perf_counter() - t0
        say(
            f"repository: {args.files} files, {args.commits} commits, {size / 1e6:.0f} MB of objects "
            f"(generated in {generated:.1f}s); workspace mode: {mode}"
            + (f" ({workspace.overlay_unavailable()})" if mode == "copy" else "")
        )
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        host = open_repo(repo)
        runs = 0

        def prepare(state: Path) -> Callable[[Path], object]:
            """A run's workspace in `state`, as the supervisor prepares it (dest is ignored: runs/<id>)."""

            def go(_dest: Path) -> object:
                nonlocal runs
                runs += 1
                run_dir = state / "runs" / f"bench-{runs}"
                run_dir.mkdir(parents=True)
                q = quota.plan(run_dir.parent, DISK)
                return workspace.prepare(run_dir, host, head, f"sandbox/bench-{runs}", q, owner)

            return go

        def release(state: Path) -> None:
            for run_dir in sorted((state / "runs").glob("bench-*")):
                workspace.release_run(run_dir)
                remove_tree(run_dir)

        results: dict[str, list[float]] = {}
        status: list[float] = []
        warm_state = root / "state-warm"
        try:
            for i in range(args.repeat):
                cold_state = root / f"state-cold-{i}"
                ways: dict[str, Callable[[Path], object]] = {
                    "git worktree add": lambda d: subprocess.run(
                        ["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(d), head], check=True
                    ),
                    "sandbox, cold (tree built)": prepare(cold_state),
                }
                if i == 0:
                    ways["(warm-up: cache the tree)"] = prepare(warm_state)
                ways["sandbox, warm (tree cached)"] = prepare(warm_state)
                if args.all:
                    ways["sandbox full checkout (copy)"] = lambda d, i=i: prepare_checkout(
                        host, head, d, f"sandbox/bench-{i}", owner
                    )
                    ways["git clone (local, hardlinks)"] = lambda d: subprocess.run(
                        ["git", "clone", "-q", str(repo), str(d)], check=True
                    )
                    ways["git clone --no-local"] = lambda d: subprocess.run(
                        ["git", "clone", "-q", "--no-local", str(repo), str(d)], check=True
                    )
                for name, fn in ways.items():
                    dest = root / f"out-{i}-{len(results.get(name, []))}-{abs(hash(name))}"
                    took = timed(lambda fn=fn, dest=dest: fn(dest))
                    if not name.startswith("("):
                        results.setdefault(name, []).append(took)
                    if name.startswith("sandbox, warm"):
                        status.append(
                            git_status_s(warm_state / "runs" / f"bench-{runs}" / "workspace", host.objects, owner)
                        )
                    if dest.exists():
                        remove_tree(dest)
                release(warm_state)
                release(cold_state)
                remove_tree(cold_state)
                subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=True)
            remove_tree(warm_state)
        finally:
            for state in root.glob("state-*"):
                release(state)
        ours = statistics.median(results["sandbox, warm (tree cached)"])
        cold = statistics.median(results["sandbox, cold (tree built)"])
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
            "mode": mode,
            "sandbox_checkout_s": round(ours, 3),
            "cold_checkout_s": round(cold, 3),
            "worktree_add_s": round(worktree, 3),
            "speedup": round(worktree / ours, 2),
            "cold_speedup": round(worktree / cold, 2),
            "git_status_s": round(statistics.median(status), 3),
            "goal_s": GOAL_SECONDS,
            "goal_speedup": GOAL_SPEEDUP,
            "medians_s": {name: round(statistics.median(times), 3) for name, times in results.items()},
            "samples_s": {name: [round(t, 3) for t in times] for name, times in results.items()},
        }
        if args.json:
            print(json.dumps(result, indent=2))
            return
        print(f"{'method':<32} {'median s':>9} {'vs warm':>9}")
        for name, times in results.items():
            med = statistics.median(times)
            print(f"{name:<32} {med:>9.3f} {med / ours:>8.1f}x")
        print(f"`git status` in the warm workspace, as the agent: {statistics.median(status):.3f}s (clean)")
        ok = ours <= GOAL_SECONDS and worktree / ours >= GOAL_SPEEDUP
        print(
            f"headline ({mode}): a run's workspace {ours:.3f}s with the tree cached, {worktree / ours:.1f}x faster "
            f"than git worktree add (goal <= {GOAL_SECONDS}s and >= {GOAL_SPEEDUP:.0f}x): "
            f"{'met' if ok else 'not met'}; "
            f"the first run on a commit (cold, tree built) {cold:.2f}s, {worktree / cold:.2f}x"
        )


if __name__ == "__main__":
    main()
