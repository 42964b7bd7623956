#!/usr/bin/env python3
"""Benchmark: a whole `sandbox run` of a one-turn task against a bare `docker run` of the same agent image.

    .venv/bin/python bench/lifecycle.py [--rounds 5] [--warmup 1] [--json]

The three settings run the same Claude Code (the agent image of `sandbox images build`) on the same one-turn task
against the same scripted model (SCRIPT below: one Bash call writes hello.txt, then the final answer):

  bare     `docker run --rm -i --network host --entrypoint claude AGENT_IMAGE <the run's Claude Code
           arguments>` with the task on stdin and ANTHROPIC_BASE_URL pointing at a scripted model this
           script serves on the host's loopback (agent_sandbox.sidecar.scripted_model, in a thread). Host
           networking: no bridge, no NAT, the cheapest path a container has to a host stub. No mounts, no
           limits, no entry point: Claude Code writes into the image's own /workspace. The container is
           labelled sandbox.bench=lifecycle.
  warm     `sandbox run --repo R --task T --model-script SCRIPT --json` (the venv's console script, as a user
           runs it) on a small throwaway repository (one README), with a state directory of its own
           (SANDBOX_STATE_DIR) in which `sandbox daemon start --pool 1` runs: the command is handed to the
           daemon (cli/launch.py), which runs it with everything imported, on a slot of its pool (the run's
           networks and its sidecar made ahead: fleet/pool.py); the run's objects are removed right after its
           answer. The round starts once the pool holds a slot, and the next round once the run's objects are
           gone and the pool has made its next slot: neither is on any round's clock.
  cold     the same command with SANDBOX_DAEMON=off: a one-shot process that imports everything, makes the
           networks and the sidecar, and removes everything before it exits.

Each is timed from just before the process starts to its exit, --rounds times, interleaved (each setting in
each place of the round in turn), after --warmup uncounted rounds of each. A round fails the benchmark unless
the bare Claude Code ends with a successful result line and the sandbox run exits 0 with status succeeded and
hello.txt as the one changed file.

For every sandbox round the phases come from its audit trail (audit.jsonl): the time between consecutive
events, plus the CLI's own start-up (process start to run_started) and exit (run_ended to process exit).
Printed: the medians, the ratios to bare (the headline, goal <= 1.5x of issue 15, is the warm one), and the
median of every phase. --json prints the same, with every sample, as one JSON object. Everything it creates
(the repository, the state directory, the daemon, the containers) is removed at the end; it fails if anything
labelled with one of its run ids, its state directory or sandbox.bench=lifecycle is left on the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for bench.machine

from bench.machine import images, machine, run  # noqa: E402

from agent_sandbox.backend.base import STATE_LABEL  # noqa: E402
from agent_sandbox.run.liveness import state_id  # noqa: E402
from agent_sandbox.sidecar.script import load_script  # noqa: E402
from agent_sandbox.sidecar.scripted_model import ScriptedModel, serve  # noqa: E402

SANDBOX = str(Path(sys.executable).parent / "sandbox")
GOAL = 1.5
BENCH_LABEL = "sandbox.bench=lifecycle"
TASK = "Write hello.txt saying hello."
SCRIPT = 'turns:\n  - bash: "echo hello > hello.txt"\n  - text: Wrote hello.txt.\n'
# The arguments the supervisor gives Claude Code (run/workloads.py, Recipes.claude_args) with the default
# policy's max_turns.
CLAUDE_ARGS = [
    "-p",
    "--output-format",
    "stream-json",
    "--verbose",
    "--permission-mode",
    "bypassPermissions",
    "--model",
    "sonnet",
    "--max-turns",
    "50",
    "--no-session-persistence",
]

# The sandbox run's phases: (name, the event that ends it). Each runs from the previous marker present in
# the trail to its own; "start" and "exit" are the process's own start and end. The agent's container_created
# is recorded once the isolation helper has run (backend/docker.py, start), so that phase holds both.
PHASES = [
    ("CLI start-up", "run_started"),
    ("checkout (disk quota, workspace)", "checkout_prepared"),
    ("networks", "network_created"),
    (
        "sidecar and agent containers, side by side, to the sidecar's start (warm: the pool's, taken over)",
        "container_created:sidecar",
    ),
    ("sidecar's ports open (`listening`)", "listening"),
    (
        "agent container and isolation, past the sidecar's `listening` (warm: made and confined by the pool)",
        "container_created:agent",
    ),
    ("network_isolated recorded", "network_isolated"),
    ("Claude Code start-up, to its first line (cold: the sidecar's imports meanwhile)", "agent_first"),
    ("agent's turns (first to last line)", "agent_last"),
    ("agent exit, resource usage", "resource_usage"),
    ("result check", "result_verified"),
    (
        "finaliser container (held: warm, the pool's; cold, started once the agent ran 3 s; else now)",
        "container_created:finaliser",
    ),
    ("finaliser run", "finalised"),
    ("import", "imported"),
    (
        "teardown (cold: what is left, the agent, sidecar and networks removed meanwhile; warm: after the answer)",
        "teardown",
    ),
    ("gate, report", "run_ended"),
    ("CLI exit", "exit"),
]


class Stub:
    """The scripted model on the host's loopback, in a thread with its own event loop."""

    def __init__(self, script: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model = ScriptedModel(load_script(script))
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner = self.loop.run_until_complete(serve(self.model, "127.0.0.1", self.port))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the scripted model did not start")

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Sample:
    wall: float
    phases: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    setting: str = "bare"


class Bench:
    def __init__(self, root: Path, agent_image: str) -> None:
        self.root = root
        self.agent_image = agent_image
        self.script = root / "model.yaml"
        self.script.write_text(SCRIPT)
        self.repo = root / "repo"
        self.repo.mkdir()
        (self.repo / "README.md").write_text("# lifecycle\n\nA throwaway repository for bench/lifecycle.py.\n")
        for args in (
            ["init", "-q", "-b", "main"],
            ["add", "-A"],
            ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qm", "bench"],
        ):
            run(["git", "-C", str(self.repo), *args], check=True)
        self.state = root / "state"
        # As installed on a user's machine: Python caches the package's bytecode (a shell that forbids it,
        # PYTHONDONTWRITEBYTECODE, would make every run compile its sources again, a tenth of a second).
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env["SANDBOX_STATE_DIR"] = str(self.state)
        self.stub = Stub(self.script)
        self.daemon = False

    def bare(self) -> Sample:
        cmd = [
            "docker",
            "run",
            "--rm",
            "-i",
            "--network",
            "host",
            "--label",
            BENCH_LABEL,
            "-e",
            f"ANTHROPIC_BASE_URL=http://127.0.0.1:{self.stub.port}",
            "-e",
            "ANTHROPIC_API_KEY=sk-ant-bench-placeholder",
            "--entrypoint",
            "claude",
            self.agent_image,
            *CLAUDE_ARGS,
        ]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, input=TASK, capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
        last = next((ln for ln in reversed(res.stdout.splitlines()) if ln.strip()), "{}")
        try:
            result = json.loads(last)
        except json.JSONDecodeError:
            result = {}
        if res.returncode or result.get("type") != "result" or result.get("is_error"):
            raise RuntimeError(f"bare docker run: exit {res.returncode}, last line {last[:300]}\n{res.stderr[-2000:]}")
        return Sample(wall=wall)

    def start_daemon(self) -> None:
        res = run([SANDBOX, "daemon", "start", "--pool", "1", "--json"], env=self.env)
        if res.returncode:
            raise RuntimeError(f"sandbox daemon start: exit {res.returncode}: {res.stderr[-1000:]}")
        self.daemon = True

    def stop_daemon(self) -> None:
        if self.daemon:
            run([SANDBOX, "daemon", "stop"], env=self.env)
            self.daemon = False

    def pool_ready(self, timeout: float = 120.0) -> None:
        """Until the daemon's pool holds a slot again (made after the last warm run): not on any round's clock."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = run([SANDBOX, "daemon", "status", "--json"], env=self.env)
            status = json.loads(res.stdout or "{}")
            if not status.get("current", True):
                raise RuntimeError("the daemon runs other code than this checkout")
            if (status.get("pool") or {}).get("ready", 0) >= 1:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the daemon's pool made no slot in {timeout:g}s")

    def cold(self) -> Sample:
        return self.sandbox(warm=False)

    def warm(self) -> Sample:
        self.pool_ready()
        sample = self.sandbox(warm=True)
        # Its objects are removed right after its answer, and the pool makes its next slot a little later: both
        # are over before the next round, whose clock they would otherwise share the machine with.
        deadline = time.monotonic() + 60
        while self.leftovers([sample.run_id]) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.pool_ready()
        return sample

    def sandbox(self, warm: bool) -> Sample:
        cmd = [SANDBOX, "run", "--repo", str(self.repo), "--task", TASK, "--model-script", str(self.script), "--json"]
        env = dict(self.env)
        if not warm:
            env["SANDBOX_DAEMON"] = "off"
        start = time.time()
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=self.root, timeout=600)
        wall = time.perf_counter() - t0
        try:
            summary = json.loads(res.stdout)
        except json.JSONDecodeError:
            summary = {}
        if res.returncode or summary.get("status") != "succeeded" or summary.get("files_changed") != ["hello.txt"]:
            raise RuntimeError(
                f"sandbox run: exit {res.returncode}, summary {json.dumps(summary)[:400]}\n{res.stderr[-2000:]}"
            )
        events = [json.loads(ln) for ln in (Path(summary["run_dir"]) / "audit.jsonl").read_text().splitlines()]
        setting = "warm" if warm else "cold"
        return Sample(wall=wall, phases=phases(events, start, start + wall), run_id=summary["id"], setting=setting)

    def leftovers(self, run_ids: list[str]) -> list[str]:
        found: list[str] = []
        flts = [f"label=sandbox.run-id={rid}" for rid in run_ids]
        if not self.daemon:
            # The pool's slots nobody claimed carry no run id of ours: the state directory's label names them.
            flts += [f"label={BENCH_LABEL}", f"label={STATE_LABEL}={state_id(self.state)}"]
        for flt in flts:
            found += run(["docker", "ps", "-aq", "--filter", flt]).stdout.split()
            found += [f"network {n}" for n in run(["docker", "network", "ls", "-q", "--filter", flt]).stdout.split()]
        return found


def phases(events: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """The run's phases (PHASES) from its audit trail: seconds between consecutive markers present."""
    marks: dict[str, float] = {"start": start, "exit": end}
    agent = [e["time"] for e in events if e.get("source") == "agent"]
    if agent:
        marks["agent_first"], marks["agent_last"] = agent[0], agent[-1]
    for e in events:
        kind = e["type"]
        if kind == "container_created":
            kind = f"container_created:{e['payload'].get('role')}"
        if kind == "network_created":
            marks[kind] = e["time"]  # the last of them
        else:
            marks.setdefault(kind, e["time"])
    out: dict[str, float] = {}
    prev = marks["start"]
    for name, marker in PHASES:
        if marker in marks:
            out[name] = max(0.0, marks[marker] - prev)
            prev = marks[marker]
    return out


def summarise(bare: list[Sample], cold: list[Sample], warm: list[Sample]) -> dict[str, Any]:
    bare_med = statistics.median(s.wall for s in bare)
    out: dict[str, Any] = {"bare_median_s": round(bare_med, 3), "goal": GOAL}
    out["samples"] = {"bare_s": [round(s.wall, 3) for s in bare]}
    for setting, samples in (("warm", warm), ("cold", cold)):
        med = statistics.median(s.wall for s in samples)
        names = [n for n, _ in PHASES if any(n in s.phases for s in samples)]
        out[setting] = {
            "median_s": round(med, 3),
            "ratio": round(med / bare_med, 2),
            "phases_median_s": {n: round(statistics.median(s.phases.get(n, 0.0) for s in samples), 3) for n in names},
        }
        out["samples"][f"{setting}_s"] = [round(s.wall, 3) for s in samples]
        out["samples"][f"{setting}_phases_s"] = [{k: round(v, 3) for k, v in s.phases.items()} for s in samples]
    # The headline: `sandbox run` as a user who started the daemon runs it (docs/cli.md, "The warm daemon").
    out["ratio"] = out["warm"]["ratio"]
    out["sandbox_median_s"] = out["warm"]["median_s"]
    return out


def table(result: dict[str, Any]) -> str:
    rounds = result["rounds"]
    warm, cold = result["warm"], result["cold"]
    lines = [
        f"| median of {rounds} rounds | seconds | ratio to bare |",
        "| --- | --- | --- |",
        f"| bare `docker run` | {result['bare_median_s']:.2f} | |",
        f"| `sandbox run`, warm (`sandbox daemon start`, a pool of 1) | {warm['median_s']:.2f} "
        f"| **{warm['ratio']:.2f}x** (goal <= {GOAL}x) |",
        f"| `sandbox run`, cold (no daemon: SANDBOX_DAEMON=off) | {cold['median_s']:.2f} | {cold['ratio']:.2f}x |",
        "",
        "| `sandbox run` phase (median s) | warm | cold |",
        "| --- | --- | --- |",
    ]
    names = list(dict.fromkeys([*warm["phases_median_s"], *cold["phases_median_s"]]))
    for name in names:
        w, c = warm["phases_median_s"].get(name), cold["phases_median_s"].get(name)
        lines.append(f"| {name} | {'-' if w is None else f'{w:.3f}'} | {'-' if c is None else f'{c:.3f}'} |")
    sums = [sum(x["phases_median_s"].values()) for x in (warm, cold)]
    lines.append(f"| sum of the medians | {sums[0]:.3f} | {sums[1]:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds of each setting first (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = ap.parse_args()
    tags = images()
    root = Path(tempfile.mkdtemp(prefix="sandbox-bench-lifecycle-"))
    samples: dict[str, list[Sample]] = {"bare": [], "cold": [], "warm": []}
    run_ids: list[str] = []
    bench: Bench | None = None
    try:
        bench = Bench(root, tags["agent"])
        bench.start_daemon()
        settings = [bench.bare, bench.warm, bench.cold]
        for i in range(args.warmup + args.rounds):
            # Each setting in each place in turn: none always follows the same one.
            order = settings[i % 3 :] + settings[: i % 3]
            for fn in order:
                s = fn()
                if s.run_id:
                    run_ids.append(s.run_id)
                counted = i >= args.warmup
                if counted:
                    samples[s.setting].append(s)
                tag = f"round {i - args.warmup + 1}" if counted else "warm-up"
                print(f"{tag:<9} {s.setting:<8} {s.wall:6.2f}s", file=sys.stderr, flush=True)
    finally:
        if bench is not None:
            bench.stop_daemon()
            bench.stub.close()
            left = bench.leftovers(run_ids)
        else:
            left = []
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "lifecycle",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "images": tags,
        "rounds": args.rounds,
        "bare_network": "host",
        **summarise(samples["bare"], samples["cold"], samples["warm"]),
        "leftovers": left,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        m = result["machine"]
        print(
            f"\n{m['cores']} cores ({m['cpu']}), {m['memory']}, kernel {m['kernel']}, Docker {m['docker']}; "
            f"agent image {tags['agent']}; {result['date']}"
        )
    if left:
        print(f"lifecycle: left behind on the engine: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
