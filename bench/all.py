#!/usr/bin/env python3
"""The benchmark suite: lifecycle, checkout, overheads and a small soak, and one table of the headline figures.

    .venv/bin/python bench/all.py [--rounds 5] [--sequential 10] [--concurrent 10] [--json] [--write-docs]

It runs, one after another (never at once: each would skew the others' timings),

  bench/lifecycle.py --rounds R --json     a one-turn `sandbox run` against a bare `docker run` (ratio 1)
  bench/checkout.py --json                 the workspace of a 30,000-file repository against
                                           `git worktree add` (ratio 2)
  bench/overheads.py --json                goal 3: download throughput through the egress proxy against
                                           direct, the gateway's added time to first byte, the kill latency
                                           at a limit, and a `sandbox sweep` of 10 runs at once
  bench/soak.py --sequential S --concurrent C   S runs one after another, then C at once: every run
                                           succeeds, nothing left behind, the supervisor's peak RSS

and prints one Markdown table of the headline figures with their goals (issue 15), the machine, and the
sandbox run's phase breakdown from lifecycle. --json prints everything as one JSON object instead.
--write-docs also writes the tables into docs/performance.md between the markers BEGIN and END below
(they must be there already). The exit code is 0 when every benchmark ran, whether or not a goal is met.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for bench.machine

from bench.machine import machine  # noqa: E402
from bench.overheads import headlines as overheads_headlines  # noqa: E402
from bench.overheads import notes as overheads_notes  # noqa: E402

DOCS = REPO_ROOT / "docs" / "performance.md"
BEGIN = "<!-- bench/all.py: begin -->"
END = "<!-- bench/all.py: end -->"
PY = sys.executable


def step(name: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # Their progress lines go straight to our stderr; their results are read from stdout.
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    print(f"== {name}: exit {res.returncode} after {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return res


def soak_figures(out: str) -> dict[str, Any]:
    """The figures of bench/soak.py's Markdown report (it has no --json)."""
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in ("sequential", "concurrent", "all") and len(cells) == 9:
            rows[cells[0]] = cells
    m = re.search(r"^soak: (\d+) runs, (\d+) failures, (\d+) leaks", out, re.M)
    if not m or "sequential" not in rows:
        raise RuntimeError(f"bench/soak.py printed no report:\n{out[-2000:]}")

    def phase(cells: list[str]) -> dict[str, Any]:
        return {
            "runs": cells[1],
            "failures": int(cells[2]) if cells[2].isdigit() else cells[2],
            "wall_median_s": cells[3],
            "p95_s": cells[4],
            "max_s": cells[5],
            "total_s": cells[6],
            "supervisor_rss_mib": cells[7],
        }

    return {
        "runs": int(m.group(1)),
        "failures": int(m.group(2)),
        "leaks": int(m.group(3)),
        **{name: phase(cells) for name, cells in rows.items()},
    }


def mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def tables(res: dict[str, Any]) -> str:
    lc, co, so = res["lifecycle"], res["checkout"], res["soak"]
    m = res["machine"]
    seq, con = so.get("sequential", {}), so.get("concurrent", {})
    lines = [
        "| headline | measured | goal | met |",
        "| --- | --- | --- | --- |",
        f"| 1. lifecycle: `sandbox run` / bare `docker run`, one-turn task, warm daemon (a pool of 1), median of "
        f"{lc['rounds']} | **{lc['ratio']:.2f}x** ({lc['sandbox_median_s']:.2f} s / {lc['bare_median_s']:.2f} s) "
        f"| <= {lc['goal']}x | {mark(lc['ratio'] <= lc['goal'])} |",
        f"| 1. the same, cold (no daemon) | {lc['cold']['ratio']:.2f}x ({lc['cold']['median_s']:.2f} s) | reported | |",
        f"| 2. checkout: workspace of a {co['files']:,}-file repository | **{co['sandbox_checkout_s']:.2f} s** "
        f"| <= {co['goal_s']} s | {mark(co['sandbox_checkout_s'] <= co['goal_s'])} |",
        f"| 2. checkout: speed-up over `git worktree add` ({co['worktree_add_s']:.2f} s) | **{co['speedup']:.2f}x** "
        f"| >= {co['goal_speedup']:.0f}x | {mark(co['speedup'] >= co['goal_speedup'])} |",
        *overheads_headlines(res.get("overheads") or {}),
        f"| soak: {so['runs']} runs ({seq.get('runs', '-')} sequential, {con.get('runs', '-')} at once) | "
        f"{so['failures']} failures, {so['leaks']} leaks | 0, 0 | {mark(so['failures'] == 0 and so['leaks'] == 0)} |",
        f"| soak: wall per run, median (sequential / {con.get('runs', '-')} at once on {m['cores']} cores) | "
        f"{seq.get('wall_median_s', '-')} s / {con.get('wall_median_s', '-')} s | reported | |",
        f"| soak: phase total (sequential / at once) | {seq.get('total_s', '-')} s / {con.get('total_s', '-')} s "
        "| reported | |",
        f"| soak: supervisor peak RSS, MiB (median / max) | {seq.get('supervisor_rss_mib', '-')} | reported | |",
        "",
        f"- machine: {m['cores']} cores ({m['cpu']}), {m['memory']} memory, kernel {m['kernel']}, Docker {m['docker']}",
        f"- date: {res['date']}; images: {lc['images']['agent']}, {lc['images']['sidecar']}",
        f"- bare `docker run`: `--network host` to the scripted model on the host's loopback; lifecycle samples "
        f"(s): bare {lc['samples']['bare_s']}, warm {lc['samples']['warm_s']}, cold {lc['samples']['cold_s']}",
        f"- checkout: {co['files']:,} files, {co['commits']} commits, {co['objects_mb']} MB of objects, median "
        f"of {co['repeat']}; workspace owner {co['owner']}; mode {co.get('mode', '-')}; the first run on a commit "
        f"(the tree built, cold) {co.get('cold_checkout_s', '-')} s",
        *overheads_notes(res.get("overheads") or {}),
        "",
        f"Phases of the `sandbox run` (medians of {lc['rounds']}, from its audit trail):",
        "",
        "| phase | warm | cold |",
        "| --- | --- | --- |",
    ]
    warm, cold = lc["warm"]["phases_median_s"], lc["cold"]["phases_median_s"]
    for name in dict.fromkeys([*warm, *cold]):
        w, c = warm.get(name), cold.get(name)
        lines.append(f"| {name} | {'-' if w is None else f'{w:.3f}'} | {'-' if c is None else f'{c:.3f}'} |")
    lines.append(
        f"| sum of the medians (whole run: warm {lc['warm']['median_s']:.2f} s, cold {lc['cold']['median_s']:.2f} s) "
        f"| {sum(warm.values()):.3f} | {sum(cold.values()):.3f} |"
    )
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"wrote the tables into {DOCS.relative_to(REPO_ROOT)}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="lifecycle rounds (default 5)")
    ap.add_argument("--sequential", type=int, default=10, help="soak runs one after another (default 10)")
    ap.add_argument("--concurrent", type=int, default=10, help="soak runs at once (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    ap.add_argument("--write-docs", action="store_true", help=f"write the tables into {DOCS.relative_to(REPO_ROOT)}")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lc = step("lifecycle", [PY, "bench/lifecycle.py", "--rounds", str(args.rounds), "--json"])
    co = step("checkout", [PY, "bench/checkout.py", "--json"])
    ov = step("overheads", [PY, "bench/overheads.py", "--json"])
    so = step("soak", [PY, "bench/soak.py", "--sequential", str(args.sequential), "--concurrent", str(args.concurrent)])
    failed = [name for name, r in (("lifecycle", lc), ("checkout", co), ("overheads", ov)) if r.returncode]
    if failed:
        print(f"bench: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    res: dict[str, Any] = {
        "date": started,
        "machine": machine(),
        "lifecycle": json.loads(lc.stdout),
        "checkout": json.loads(co.stdout),
        "overheads": json.loads(ov.stdout),
        "soak": {**soak_figures(so.stdout), "exit_code": so.returncode},
    }
    text = tables(res)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
