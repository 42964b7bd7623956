#!/usr/bin/env python3
"""Soak: many real `sandbox run`s, one after another and then side by side, and nothing left behind.

    .venv/bin/python bench/soak.py [--sequential 100] [--concurrent 10] [--keep-going] [--keep]

It makes a throwaway git repository and a state directory of its own (SANDBOX_STATE_DIR; the user's runs and
run store are never touched), then runs --sequential `sandbox run --repo R --task ... --model-script S --json`
subprocesses one after another, then --concurrent more started together on the same repository. Every run
has its own scripted model (SCRIPT below): one Bash tool call writes `soak/<name>.txt` with a token of that
run's own, and the agent finishes; the finaliser commits it. A run counts as passed when `sandbox run` exits
0, its summary says succeeded/completed on branch `sandbox/<id>` with exactly that one file changed, and the
file on the branch in the repository holds exactly the run's content. Each failure is listed with a one-line
reason. Without --keep-going the soak starts no new run after the first failure (and skips the concurrent
phase).

After each phase, and once more at the end, it looks for leaks, attributed to the soak's own runs (the run
ids are the directories in its state directory):

  containers, networks   labelled `sandbox.run-id=<id>` on the engine;
  workspaces             run directories still holding `workspace` or `check` (or their quota images
                         `*.img`: teardown removes both unless --keep is passed to `sandbox run`);
  mounts                 mount points under the state directory (/proc/self/mounts; the quota filesystems);
  loop devices           backed by a file under the state directory (`losetup -J -l`);
  iptables rules         carrying the comment `sandbox.run-id=<id>` (`iptables-save`, `ip6tables-save`);
  budget sockets         /tmp/sbx-budget-* directories that appeared while the soak ran (the shared-budget
                         broker's; these cannot be tied to a run id, so another process's would count too);
  processes              any supervisor, or process it started, still alive: one seen in a run's process
                         tree, or one whose environment holds the soak's SANDBOX_STATE_DIR.

Each is counted, then removed (containers and networks, rules, mounts, loop devices, workspaces, processes;
budget sockets are only reported), and the check at the end sees whether the removal held. It prints one
Markdown table per phase (runs, failures, wall time per run: median, p95, max; the phase's total; the peak RSS
of the supervisor processes, read from /proc/<pid>/status VmHWM while they ran) and one of the leaks, then
`soak: N runs, F failures, L leaks` and exits 0 only when F and L are both 0. The images are built first if
needed (`sandbox images build`); a run refused with exit 3 (the images changed under it: the work tree was
edited) is retried once after a build, and the retries are reported. The temporary repository and state
directory are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for bench.machine

from bench.machine import machine, run  # noqa: E402

SANDBOX = [sys.executable, "-m", "agent_sandbox.cli"]
RUN_LABEL = "sandbox.run-id"
LEAK_KINDS = (
    "containers",
    "networks",
    "workspaces",
    "mounts",
    "loop devices",
    "iptables rules",
    "budget sockets",
    "processes",
)
QUOTA_DIRS = ("workspace", "check", "workspace.img", "check.img")
BUDGET_GLOB = "sbx-budget-*"


_images_lock = threading.Lock()
USED_IMAGES: set[str] = set()  # every tag images() returned: a rebuild during the soak shows as two


def images() -> dict[str, str]:
    """The images the current inputs call for (role -> tag), built first if one is missing."""

    def ls() -> tuple[dict[str, str], bool]:
        res = run([*SANDBOX, "images", "ls", "--json"], cwd=REPO_ROOT)  # exits 3 when one is missing
        rows = json.loads(res.stdout)
        return {i["role"]: i["ref"] for i in rows}, all(i["present"] for i in rows)

    with _images_lock:  # concurrent runs refused at once build once
        tags, present = ls()
        if not present:
            print("building the images (sandbox images build) ...", file=sys.stderr, flush=True)
            subprocess.run([*SANDBOX, "images", "build"], check=True, cwd=REPO_ROOT, stdout=sys.stderr)
            tags, present = ls()
        USED_IMAGES.update(tags.values())
        return tags


def vm_hwm(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Run:
    phase: str
    name: str  # seq-001, con-01: the file soak/<name>.txt and the task
    token: str
    script: Path
    rc: int | None = None
    wall: float = 0.0
    run_id: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    failure: str = ""  # one line; empty when the run passed
    retries: int = 0  # refused with exit 3 (images changed) and run again
    rss_peak: int = 0  # the supervisor's VmHWM, bytes
    pids: set[tuple[int, float]] = field(default_factory=set)  # the supervisor and every descendant seen
    started: bool = False  # a run never started (after a failure, or an interrupt) is reported as skipped
    stderr_tail: str = ""
    timed_out: bool = False  # the soak interrupted it after --timeout
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def skipped(self) -> bool:
        return not self.started

    @property
    def path(self) -> str:
        return f"soak/{self.name}.txt"

    @property
    def content(self) -> str:
        return f"soak {self.name} {self.token}\n"

    @property
    def task(self) -> str:
        return f"Write {self.path} for soak run {self.name}."


class Soak:
    def __init__(self, root: Path, keep_going: bool, timeout: float) -> None:
        self.root = root
        self.keep_going = keep_going
        self.timeout = timeout
        self.state = root / "state"
        self.env = {**os.environ, "SANDBOX_STATE_DIR": str(self.state)}
        self.repo = root / "repo"
        self.repo.mkdir()
        (self.repo / "README.md").write_text("# soak\n\nA throwaway repository for bench/soak.py.\n")
        for args in (
            ["init", "-q", "-b", "main"],
            ["add", "-A"],
            ["-c", "user.name=soak", "-c", "user.email=soak@example.invalid", "commit", "-qm", "soak"],
        ):
            run(["git", "-C", str(self.repo), *args], check=True)
        self.base = self.git("rev-parse", "HEAD").stdout.strip()
        self.scripts = root / "scripts"
        self.scripts.mkdir()
        self.budget_before = {p.name for p in Path(tempfile.gettempdir()).glob(BUDGET_GLOB)}
        self.live: dict[int, subprocess.Popen[str]] = {}
        self.live_lock = threading.Lock()
        self.stop = False
        self.seen: set[tuple[str, str]] = set()  # every leak found, (kind, what): counted once
        self.checks: dict[str, dict[str, list[str]]] = {}  # when -> kind -> what

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["git", "-C", str(self.repo), *args])

    def new_run(self, phase: str, name: str) -> Run:
        token = uuid.uuid4().hex
        r = Run(phase=phase, name=name, token=token, script=self.scripts / f"{name}.yaml")
        # The scripted model: one Bash call writes the file, then the final answer.
        script = {
            "turns": [
                {"bash": f"mkdir -p soak && printf '%s\\n' {shlex.quote(r.content.rstrip())} > {r.path}"},
                {"text": f"Wrote {r.path}."},
            ]
        }
        r.script.write_text(yaml.safe_dump(script, sort_keys=False))
        return r

    # --- running ----------------------------------------------------------------------------------------

    def _watch(self, proc: subprocess.Popen[str], r: Run) -> None:
        """Sample the supervisor's peak RSS and its process tree until it exits."""
        try:
            sup = psutil.Process(proc.pid)
            r.pids.add((sup.pid, sup.create_time()))
        except psutil.Error:
            return
        while proc.poll() is None:
            r.rss_peak = max(r.rss_peak, vm_hwm(proc.pid))
            try:
                for child in sup.children(recursive=True):
                    r.pids.add((child.pid, child.create_time()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def _attempt(self, r: Run) -> subprocess.CompletedProcess[str]:
        cmd = [*SANDBOX, "run", "--repo", str(self.repo), "--task", r.task, "--model-script", str(r.script), "--json"]
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=REPO_ROOT
        ) as proc:
            with self.live_lock:
                self.live[proc.pid] = proc
            watcher = threading.Thread(target=self._watch, args=(proc, r), daemon=True)
            watcher.start()
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # the run tears down what it made, then exits 130
                try:
                    out, err = proc.communicate(timeout=180)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                err += f"\n[soak] timed out after {self.timeout:.0f}s; sent SIGINT"
                r.timed_out = True
            finally:
                with self.live_lock:
                    self.live.pop(proc.pid, None)
            watcher.join(5)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def execute(self, r: Run, barrier: threading.Barrier | None) -> None:
        try:
            if barrier is not None:
                barrier.wait()
            if self.stop:
                return
            r.started = True
            for attempt in range(2):
                t0 = time.perf_counter()
                res = self._attempt(r)
                r.wall = time.perf_counter() - t0
                if res.returncode != 3 or "images not built" not in res.stderr or attempt or self.stop:
                    break  # any other exit 3 (the engine lost, a full disk) is a failure of the run
                r.retries += 1  # the images changed under us (the work tree was edited); build, retry
                images()
            r.rc = res.returncode
            r.stderr_tail = res.stderr[-3000:]
            self.verify(r, res)
            if r.timed_out:
                r.failure = f"soak timeout: still running after {self.timeout:.0f}s, interrupted; {r.failure}"[:300]
        except Exception as exc:  # the soak's own trouble is a failure of that run, not a crash of the soak
            r.failure = r.failure or f"soak error: {type(exc).__name__}: {exc}"
        finally:
            r.done.set()

    def verify(self, r: Run, res: subprocess.CompletedProcess[str]) -> None:
        try:
            r.summary = json.loads(res.stdout) if res.stdout.strip() else {}
        except json.JSONDecodeError:
            r.summary = {}
        s = r.summary
        r.run_id = s.get("id", "") or self.find_run_id(r.task)
        last = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "")
        if res.returncode != 0:
            why = f"{s.get('status')}/{s.get('reason')}: {s.get('message')}" if s else f"no summary; stderr: {last}"
            r.failure = f"exit {res.returncode}: {why}"[:300]
            return
        if not s:
            r.failure = f"exit 0 but no JSON summary on stdout; stderr: {last}"[:300]
            return
        if (s.get("status"), s.get("reason")) != ("succeeded", "completed"):
            r.failure = f"summary says {s.get('status')}/{s.get('reason')}: {s.get('message')}"[:300]
            return
        branch = s.get("branch")
        if branch != f"sandbox/{r.run_id}":
            r.failure = f"summary branch is {branch!r}, not sandbox/{r.run_id}"
            return
        if s.get("files_changed") != [r.path]:
            r.failure = f"files_changed is {s.get('files_changed')}, not [{r.path!r}]"
            return
        if self.git("rev-parse", "--verify", "-q", f"refs/heads/{branch}").returncode:
            r.failure = f"branch {branch} is not in the repository"
            return
        got = self.git("cat-file", "blob", f"{branch}:{r.path}")
        if got.returncode:
            r.failure = f"{branch} has no {r.path}: {got.stderr.strip()}"
        elif got.stdout != r.content:
            r.failure = f"{branch}:{r.path} holds {got.stdout[:80]!r}, not {r.content!r}"

    def find_run_id(self, task: str) -> str:
        """The run directory whose spec.json holds this task (for a run that printed no summary), or ''."""
        for rid in self.run_ids():
            try:
                if json.loads((self.state / "runs" / rid / "spec.json").read_text()).get("task") == task:
                    return rid
            except (OSError, ValueError):
                continue
        return ""

    def phase(self, runs: list[Run], parallel: bool) -> float:
        """Run these (one after another, or all started together); returns the phase's wall time."""
        t0 = time.perf_counter()
        if parallel:
            if self.stop:
                return 0.0
            barrier = threading.Barrier(len(runs))
            threads = [threading.Thread(target=self.execute, args=(r, barrier), daemon=True) for r in runs]
            for t in threads:
                t.start()
            self._wait(runs)
            for r in runs:
                self.progress(r, len(runs))
            if any(r.failure for r in runs) and not self.keep_going:
                self.stop = True
        else:
            for r in runs:
                if self.stop:
                    continue
                t = threading.Thread(target=self.execute, args=(r, None), daemon=True)
                t.start()
                self._wait([r])
                self.progress(r, len(runs))
                if r.failure and not self.keep_going:
                    self.stop = True
        return time.perf_counter() - t0

    def _wait(self, runs: list[Run]) -> None:
        """Wait for the runs; on Ctrl-C or SIGTERM, interrupt them (each tears down, then exits 130) and wait for
        that. (Events, not Thread.join: a join interrupted by KeyboardInterrupt may not wait again.)"""
        try:
            for r in runs:
                while not r.done.wait(0.5):
                    pass
        except KeyboardInterrupt:
            self.stop = True  # no run starts any more
            signalled: set[int] = set()
            deadline = time.monotonic() + 180
            while not all(r.done.is_set() for r in runs) and time.monotonic() < deadline:
                with self.live_lock:
                    procs = [p for pid, p in self.live.items() if pid not in signalled]
                for p in procs:  # also one that was starting as the signal came
                    p.send_signal(signal.SIGINT)
                    signalled.add(p.pid)
                time.sleep(0.2)
            raise

    @staticmethod
    def progress(r: Run, total: int) -> None:
        n = int(r.name.split("-")[1])
        ok = f"FAILED: {r.failure}" if r.failure else "ok"
        extra = f" (retried {r.retries}x after exit 3)" if r.retries else ""
        print(
            f"{r.phase:<10} {n:>3}/{total:<3} {r.run_id or '-':<22} {r.wall:6.1f}s  "
            f"rss {r.rss_peak / 1024**2:5.0f} MiB  {ok}{extra}",
            file=sys.stderr,
            flush=True,
        )

    # --- leaks ------------------------------------------------------------------------------------------

    def run_ids(self) -> list[str]:
        runs = self.state / "runs"
        return sorted(d.name for d in runs.iterdir() if d.is_dir()) if runs.is_dir() else []

    def leaks(self, all_runs: list[Run]) -> dict[str, list[str]]:
        """What the soak's runs left behind, by kind (see the docstring)."""
        ids = self.run_ids()
        found: dict[str, list[str]] = {k: [] for k in LEAK_KINDS}
        for rid in ids:
            flt = f"label={RUN_LABEL}={rid}"
            found["containers"] += run(["docker", "ps", "-aq", "--no-trunc", "--filter", flt]).stdout.split()
            found["networks"] += run(["docker", "network", "ls", "-q", "--no-trunc", "--filter", flt]).stdout.split()
            for sub in QUOTA_DIRS:
                if (self.state / "runs" / rid / sub).exists():
                    found["workspaces"].append(str(self.state / "runs" / rid / sub))
        state = str(self.state)
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1].replace("\\040", " ")
            if target == state or target.startswith(state + "/"):
                found["mounts"].append(target)
        if shutil.which("losetup"):
            res = run(["losetup", "-J", "-l"])
            devices = json.loads(res.stdout).get("loopdevices", []) if res.returncode == 0 and res.stdout else []
            for dev in devices:
                back = (dev.get("back-file") or "").removesuffix(" (deleted)")
                if back.startswith(state + "/"):
                    found["loop devices"].append(f"{dev['name']} {dev.get('back-file')}")
        for save in ("iptables-save", "ip6tables-save"):
            if not shutil.which(save):
                continue
            table = ""
            for line in run([save]).stdout.splitlines():
                if line.startswith("*"):
                    table = line[1:]
                elif line.startswith("-A ") and any(f"{RUN_LABEL}={rid}" in line for rid in ids):
                    found["iptables rules"].append(f"{save.removesuffix('-save')} -t {table} {line}")
        for p in sorted(Path(tempfile.gettempdir()).glob(BUDGET_GLOB)):
            if p.name not in self.budget_before:
                found["budget sockets"].append(str(p))
        found["processes"] = self.leftover_processes(all_runs)
        return found

    def leftover_processes(self, all_runs: list[Run]) -> list[str]:
        with self.live_lock:
            running = set(self.live)
        seen = {pid_t for r in all_runs for pid_t in r.pids}
        out: dict[int, str] = {}
        for p in psutil.process_iter(["pid", "create_time", "name", "status", "cmdline"]):
            info = p.info
            if info["pid"] in running or info["pid"] == os.getpid():
                continue
            ours = (info["pid"], info["create_time"]) in seen
            if not ours:
                try:
                    ours = p.environ().get("SANDBOX_STATE_DIR") == str(self.state)
                except psutil.Error:
                    ours = False
            if ours:
                cmd = " ".join(info["cmdline"] or [info["name"] or "?"])[:120]
                out[info["pid"]] = f"{info['pid']}@{info['create_time']:.2f} {cmd} [{info['status']}]"
        return [out[k] for k in sorted(out)]

    def check(self, when: str, all_runs: list[Run]) -> dict[str, list[str]]:
        found = self.leaks(all_runs)
        self.checks[when] = found
        for kind, items in found.items():
            for item in items:
                key = item.rsplit(" [", 1)[0] if kind == "processes" else item  # a status may change
                self.seen.add((kind, key))
            if items:
                print(f"LEAK {when}: {len(items)} {kind}:", file=sys.stderr)
                for item in items:
                    print(f"    {item}", file=sys.stderr)
        return found

    def remove(self, found: dict[str, list[str]]) -> None:
        """Remove what check() found (after counting it). Budget sockets are left: they may not be ours."""
        for entry in found["processes"]:
            pid_s, started = entry.split()[0].split("@")
            try:
                p = psutil.Process(int(pid_s))
                if abs(p.create_time() - float(started)) < 0.05:
                    p.kill()
            except (psutil.Error, ValueError):
                pass
        if found["containers"]:
            run(["docker", "rm", "-f", "-v", *found["containers"]])
        if found["networks"]:
            run(["docker", "network", "rm", *found["networks"]])
        for rule in found["iptables rules"]:
            tool, _t, table, _a, *rest = shlex.split(rule)
            run([tool, "-w", "10", "-t", table, "-D", *rest])
        for target in sorted(found["mounts"], key=len, reverse=True):
            run(["umount", "-l", target])
        for dev in found["loop devices"]:
            run(["losetup", "-d", dev.split()[0]])
        for path in found["workspaces"]:
            p = Path(path)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# --- the report -------------------------------------------------------------------------------------------


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def phase_row(label: str, runs: list[Run], total: float | None) -> str:
    done = [r for r in runs if not r.skipped]
    walls = [r.wall for r in done]
    rss = [r.rss_peak / 1024**2 for r in done if r.rss_peak]
    fails = sum(1 for r in done if r.failure)
    skipped = len(runs) - len(done)
    cells = [label, f"{len(done)}" + (f" (+{skipped} skipped)" if skipped else ""), str(fails)]
    cells += [f"{statistics.median(walls):.1f}", f"{p95(walls):.1f}", f"{max(walls):.1f}"] if walls else ["-"] * 3
    cells.append(f"{total:.1f}" if total is not None else "-")
    cells.append(f"{statistics.median(rss):.0f} / {max(rss):.0f}" if rss else "-")
    cells.append(str(sum(r.retries for r in done)))
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequential", type=int, default=100, help="runs one after another (default 100)")
    ap.add_argument("--concurrent", type=int, default=10, help="runs started together afterwards (default 10)")
    ap.add_argument("--keep-going", action="store_true", help="go on after a failed run (default: start no more)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary repository and state directory")
    ap.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds one `sandbox run` may take before the soak interrupts it (default 900)",
    )
    args = ap.parse_args()
    info = machine()
    started = datetime.datetime.now(datetime.UTC)
    images()
    root = Path(tempfile.mkdtemp(prefix="sandbox-soak-"))
    soak = Soak(root, args.keep_going, args.timeout)
    seq = [soak.new_run("sequential", f"seq-{i + 1:03d}") for i in range(args.sequential)]
    con = [soak.new_run("concurrent", f"con-{i + 1:03d}") for i in range(args.concurrent)]
    totals: dict[str, float | None] = {"sequential": None, "concurrent": None}
    repo_problem = ""
    print(f"soak: repository {soak.repo}, state {soak.state}", file=sys.stderr, flush=True)
    interrupted = False

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (CI, timeout) ends the soak like Ctrl-C: runs torn down, then reported

    signal.signal(signal.SIGTERM, on_term)
    try:
        for label, runs, parallel in (("sequential", seq, False), ("concurrent", con, True)):
            if not runs:
                continue
            totals[label] = soak.phase(runs, parallel)
            if all(r.skipped for r in runs):
                totals[label] = None
            print(f"{label}: {totals[label] or 0:.1f}s", file=sys.stderr, flush=True)
            soak.remove(soak.check(f"after {label}", seq + con))
        # The host repository itself: its own branch and working tree untouched by every run.
        head = soak.git("rev-parse", "HEAD").stdout.strip()
        dirty = soak.git("status", "--porcelain").stdout.strip()
        if head != soak.base or dirty:
            repo_problem = f"the repository's HEAD moved ({soak.base[:12]} -> {head[:12]}) or its tree changed: {dirty}"
    except KeyboardInterrupt:
        interrupted = True
        print("soak: interrupted; the runs under way were sent SIGINT", file=sys.stderr, flush=True)
    finally:
        soak.remove(soak.check("at the end", seq + con))
        if args.keep:
            print(f"kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    done = [r for r in seq + con if not r.skipped]
    failures = [r for r in done if r.failure]
    n_fail = len(failures) + (1 if repo_problem else 0)
    n_leaks = len(soak.seen)
    print(f"## Soak: {args.sequential} sequential and {args.concurrent} concurrent `sandbox run`s\n")
    print(
        "| phase | runs | failures | wall median s | p95 s | max s | phase total s | supervisor peak RSS "
        "MiB (median / max) | retried (exit 3) |"
    )
    print("|" + " --- |" * 9)
    print(phase_row("sequential", seq, totals["sequential"]))
    print(phase_row("concurrent", con, totals["concurrent"]))
    both = [t for t in totals.values() if t is not None]
    print(phase_row("all", seq + con, sum(both) if both else None))
    whens = list(soak.checks)
    print("\n| leaks | " + " | ".join(whens) + " |")
    print("|" + " --- |" * (len(whens) + 1))
    for kind in LEAK_KINDS:
        print(f"| {kind} | " + " | ".join(str(len(soak.checks[w][kind])) for w in whens) + " |")
    print()
    if failures or repo_problem:
        print("Failures:")
        for r in failures:
            print(f"- {r.name} ({r.run_id or 'no run id'}, {r.wall:.1f}s): {r.failure}")
        if repo_problem:
            print(f"- repository: {repo_problem}")
        print()
    if seen := sorted(soak.seen):
        print("Leaked (counted once each, then removed; budget sockets left in place):")
        for kind, what in seen:
            print(f"- {kind}: {what}")
        print()
    print(f"- command: `{shlex.join(['.venv/bin/python', 'bench/soak.py', *sys.argv[1:]])}`")
    print(
        f"- machine: {info['cores']} cores ({info['cpu']}), {info['memory']} memory, kernel {info['kernel']}, "
        f"Docker {info['docker']}"
    )
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC; images: {', '.join(sorted(USED_IMAGES))}")
    print(
        "- a run: `sandbox run --json` with the scripted model (one Bash call writes one file, then the answer), "
        "default policy; wall time includes the CLI's start-up; peak RSS is the supervisor process's VmHWM"
    )
    if interrupted:
        print("- **interrupted**: the runs under way were stopped (exit 130, counted as failures), the rest skipped")
    print(f"\nsoak: {len(done)} runs, {n_fail} failures, {n_leaks} leaks" + (" (interrupted)" if interrupted else ""))
    for r in failures[:5]:  # the first failures' stderr, for the issue
        print(
            f"\n--- stderr of {r.name} ({r.run_id or 'no run id'}), last lines ---\n{r.stderr_tail[-1500:]}",
            file=sys.stderr,
        )
    if interrupted:
        return 130
    return 0 if n_fail == 0 and n_leaks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
