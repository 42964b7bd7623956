#!/usr/bin/env python3
"""Benchmark: what the sandbox's moving parts add, one figure each (issue 15, goal 3).

    .venv/bin/python bench/overheads.py [--size-mib 256] [--rounds 5] [--requests 100] [--kill-after 8]
                                        [--sweep 10] [--no-sequential] [--only PART ...] [--json]

  throughput  A file of --size-mib (the same random MiB over and over) served by a small server on this
              machine (this script with --serve, on the address Docker maps `host-gateway` to), downloaded
              with curl (`-w '%{time_total} ...'`: the transfer timed by curl itself) by one shell script,
              over HTTPS (a tunnel through CONNECT, as the registries are reached; the certificate is this
              script's, verified with --cacert) and over plain HTTP (forwarded by the proxy), in
                direct   a container of the agent image on Docker's default bridge, no proxy, with the limits
                         (CPUs, memory, pids), read-only root, tmpfs and dropped capabilities of an agent;
                proxied  a real `sandbox run` (scripted model: one Bash call runs the script) under a policy
                         that allows the server's name, maps it to `host-gateway` (egress.hosts) and lets its
                         private address through (allow_addresses): every byte crosses the sidecar's egress
                         proxy.
              Both run at once and take turns at the server, round by round (who goes first alternates), so
              they download under the same load but never together: a warm-up round, then --rounds. Also
              the CPU each part spends per GiB: curl's (bash's `time`), the server's (its sending thread's
              CPU clock) and the sidecar's (docker stats, while the run's downloads go on).
              Goal: proxied/direct >= 0.8x over HTTPS (medians).
  ttfb        Time to first byte of a streamed POST /v1/messages (a Claude-Code-sized request of
              --body-kib), from the scripted model directly and through the model gateway in front of it:
              both in the real sidecar of a real run, asked from one client container that shares the
              sidecar's network namespace (`--network container:<sidecar>`, so both are on its loopback),
              one keep-alive connection each, --requests each, interleaved in blocks of 10 after a warm-up.
              TTFB is from sending the request to reading the `message_start` event. Goal: median added
              <= 5 ms; p95 added reported.
  kill        The same run's agent is in a Bash call that ignores SIGTERM (`trap '' TERM; sleep 600`) when
              the wall-clock limit (--kill-after seconds) hits; then a second run whose Bash call also freezes
              Claude Code itself (SIGSTOP), so that nothing in the container answers SIGTERM and the stop
              grace runs out. For each, the latency from the trail's `limit_hit` to the agent's exit as the
              trail records it (`resource_usage`, written once the supervisor has the container's exit), and
              the engine's view (`docker events`: the SIGTERM, a SIGKILL if the grace ran out, the
              container's `die`). Goal: <= 2 s + the stop grace (run/base.py STOP_GRACE).
  sweep       `sandbox sweep` of --sweep throwaway repositories at once (concurrency = --sweep), one process
              running every run (each a one-turn scripted task): every run must succeed; its wall time and the
              process's peak RSS (VmHWM, sampled from /proc). Then, unless --no-sequential, the same sweep
              one run at a time (concurrency 1) for the wall time to compare with.

Progress goes to stderr; a Markdown table of the headlines (with goals) to stdout, or, with --json, one JSON
object with every sample. Everything it creates (temporary directories, its state directory, the server,
containers labelled sandbox.bench=overheads, the runs' containers and networks) is removed at the end, also
on Ctrl-C; the exit code is 1 if a measurement failed or anything was left behind, else 0 (goals met or not).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for bench.machine, bench.soak and tests.testhosts

from bench.machine import cleanup, images, leftovers, machine, run  # noqa: E402
from bench.soak import vm_hwm  # noqa: E402

SANDBOX = str(Path(sys.executable).parent / "sandbox")
BENCH_LABEL = "sandbox.bench=overheads"
HOST_NAME = "bench.sandbox.test"
GOAL_THROUGHPUT = 0.8  # proxied / direct
GOAL_TTFB_MS = 5.0  # added by the gateway, median
GOAL_KILL_S = 2.0  # plus the stop grace
MiB = 1024**2

# One script for both settings: it takes the proxy, if any, from HTTPS_PROXY (set by the sandbox).
DOWNLOAD = r"""set -euo pipefail
# bench-download.sh WHO COUNT: COUNT rounds, each when the server says it is WHO's turn (it alternates them).
who=$1
here=$(cd "$(dirname "$0")" && pwd)
proxy=${HTTPS_PROXY:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
TIMEFORMAT='%3U %3S'
ask() { curl -sS --max-time 60 ${proxy:+--proxy "$proxy"} "http://@HOST@:@HTTP_PORT@/$1/$who/$2" || true; }
for i in $(seq 1 "$2"); do
  tries=0
  until [ "$(ask turn "$i")" = go ]; do  # the server answers `go`, or `wait` after 20 s
    tries=$((tries + 1))
    if [ "$tries" -gt 30 ]; then echo "bench: gave up waiting for round $i" >&2; exit 1; fi
    sleep 0.2
  done
  for proto in https http; do
    if [ "$proto" = https ]; then port=@HTTPS_PORT@; else port=@HTTP_PORT@; fi
    # curl's own timing on stdout; its CPU time (user, system) from bash's `time` on stderr
    cpu=$( { time curl -sS --fail -o /dev/null --cacert "$here/bench-ca.pem" ${proxy:+--proxy "$proxy"} \
      -w '%{time_total} %{size_download} %{time_starttransfer}' "$proto://@HOST@:$port/file/$who/$i" \
      >"$work/w"; } 2>&1 )
    echo "BENCH-DL $i $proto $(cat "$work/w") $cpu"
  done
  ask done "$i" >/dev/null
done
"""

# The kill runs' one Bash call: (what it shows, the command). Claude Code ends on SIGTERM by itself, once it has
# stopped its tool (which ignores SIGTERM here); a frozen agent (Claude Code stopped by its own tool) does not,
# and the container ends only at the SIGKILL after the grace. (Claude Code's Bash tool refuses `pkill claude`.)
KILL_CASES = {
    "tool_ignores_term": ("its Bash call ignoring SIGTERM", "trap '' TERM; sleep 600"),
    "agent_frozen": (
        "Claude Code frozen by its Bash call (SIGSTOP)",
        "trap '' TERM; for p in /proc/[0-9]*; do if [ \"$(cat $p/comm 2>/dev/null)\" = claude ]; then "
        "kill -STOP ${p#/proc/}; fi; done; sleep 600",
    ),
}

# Run in a container of the sidecar image sharing the sidecar's network namespace: the scripted model on
# 127.0.0.1:8099 and the gateway on 127.0.0.1:8080 (sidecar/config.py), each over one keep-alive connection.
TTFB_CLIENT = r"""
import http.client, json, sys, time
direct_port, gateway_port, count, warmup, body_bytes = (int(x) for x in sys.argv[1:6])
tool = {"name": "Bash", "description": "Run a command.",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
body = {"model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True,
        "system": [{"type": "text", "text": ""}], "tools": [tool],
        "messages": [{"role": "user", "content": "Write hello.txt saying hello."}]}
pad = body_bytes - len(json.dumps(body))
body["system"][0]["text"] = ("You are a careful engineer. " * (max(0, pad) // 28 + 1))[: max(0, pad)]
raw = json.dumps(body).encode()
headers = {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": "sk-ant-bench"}
conns = {"direct": http.client.HTTPConnection("127.0.0.1", direct_port, timeout=30),
         "gateway": http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=30)}
def one(conn):
    t0 = time.perf_counter()
    conn.request("POST", "/v1/messages", raw, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"status {resp.status}: {resp.read()[:300]!r}")
    first = None
    while line := resp.readline():
        if first is None and line.startswith(b"event: message_start"):
            first = time.perf_counter()
    if first is None:
        raise SystemExit("no message_start event")
    return (first - t0) * 1000, (time.perf_counter() - t0) * 1000
out = {"direct": [], "gateway": [], "body_bytes": len(raw)}
for i in range(warmup):
    for conn in conns.values():
        one(conn)
block = 10
for start in range(0, count, block):
    for name, conn in conns.items():
        for _ in range(min(block, count - start)):
            out[name].append(one(conn))
print(json.dumps(out))
"""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def git_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qm", "bench"],
    ):
        run(["git", "-C", str(path), *args], check=True)
    return path


# --- the file server (this script with --serve, in a process of its own) ------------------------------------


def serve(addr: str, cert: str, key: str, size: int, rounds: int) -> None:
    """Serve `size` bytes for a GET over HTTP and HTTPS on `addr`, print the ports, end when stdin closes.

    It also takes turns: `GET /turn/WHO/I` answers `go` when it is WHO's round I (else `wait`, after 20 s),
    `GET /done/WHO/I` ends that round. The rounds alternate between `direct` and `proxied`, each round's
    first the other one than the round before's, so both settings download under the same conditions, one at
    a time, while the other one waits."""
    chunk = memoryview(random.randbytes(MiB))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    plain, tls = socket.create_server((addr, 0)), socket.create_server((addr, 0))
    order = [
        (who, str(i))
        for i in range(1, rounds + 1)
        for who in (("direct", "proxied") if i % 2 else ("proxied", "direct"))
    ]
    pos = 0
    turn = threading.Condition()

    def reply(conn: socket.socket, body: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

    def handle(conn: socket.socket, secure: bool) -> None:
        nonlocal pos
        try:
            if secure:
                conn = ctx.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            target = head.split(b" ", 2)[1].decode()
            path = target.split("://", 1)[-1].split("/", 1)[-1]  # a forwarded request has an absolute URI
            what, _, rest = path.partition("/")
            if what in ("turn", "done"):
                mine = tuple(rest.split("/", 1))
                with turn:
                    if what == "turn":
                        go = turn.wait_for(lambda: pos >= len(order) or order[pos] == mine, timeout=20)
                        reply(conn, b"go" if go and pos < len(order) else b"wait")
                    else:
                        if pos < len(order) and order[pos] == mine:
                            pos += 1
                            turn.notify_all()
                        reply(conn, b"ok")
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % size
            )
            cpu = time.thread_time()  # this thread's: TLS encryption included
            left = size
            while left:
                n = min(left, len(chunk))
                conn.sendall(chunk[:n])
                left -= n
            who, _, i = rest.partition("/")
            proto = "https" if secure else "http"
            line = {"who": who, "round": i, "proto": proto, "cpu_s": round(time.thread_time() - cpu, 3)}
            with turn:
                print(json.dumps(line), flush=True)
        except OSError:
            pass
        finally:
            conn.close()

    def accept(sock: socket.socket, secure: bool) -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=handle, args=(conn, secure), daemon=True).start()

    for sock, secure in ((plain, False), (tls, True)):
        threading.Thread(target=accept, args=(sock, secure), daemon=True).start()
    print(json.dumps({"http": plain.getsockname()[1], "https": tls.getsockname()[1]}), flush=True)
    sys.stdin.read()  # the benchmark holds our stdin: when it goes, so do we


class FileServer:
    def __init__(self, root: Path, size: int, rounds: int) -> None:
        from tests.testhosts import bridge_gateway, local_ipv4

        self.address = bridge_gateway()
        if self.address not in local_ipv4():
            raise RuntimeError(f"`host-gateway` maps to {self.address}, not an address of this machine")
        self.cert, key = root / "bench-ca.pem", root / "bench-key.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-keyout", str(key), "-out", str(self.cert), "-subj", f"/CN={HOST_NAME}"),
                *("-addext", f"subjectAltName=DNS:{HOST_NAME}"),
            ],
            check=True,
            capture_output=True,
        )
        cmd = [sys.executable, __file__, "--serve", self.address, str(self.cert), str(key), str(size), str(rounds)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ports = json.loads(self.proc.stdout.readline() or "{}")
        if not ports:
            self.close()
            raise RuntimeError("the file server did not start")
        self.http_port, self.https_port = int(ports["http"]), int(ports["https"])

    def close(self) -> list[dict[str, Any]]:
        """Stop it; the server's CPU time per download it finished (who, round, proto, cpu_s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]


# --- the benchmark ----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, root: Path, tags: dict[str, str], args: argparse.Namespace) -> None:
        self.root = root
        self.tags = tags
        self.args = args
        self.state = root / "state"
        self.env = {**os.environ, "SANDBOX_STATE_DIR": str(self.state)}
        self.containers: list[str] = []  # our own, by name
        self.live: list[subprocess.Popen[str]] = []  # sandbox processes running now

    # -- running `sandbox` ---------------------------------------------------------------------------------

    def sandbox(
        self, args: list[str], timeout: float = 900, during: Callable[[subprocess.Popen[str]], None] | None = None
    ) -> tuple[subprocess.CompletedProcess[str], float, int]:
        """A `sandbox` command: its result, wall time and peak RSS (VmHWM, sampled every 0.1 s). `during` runs
        in a thread while it does. On Ctrl-C or a timeout it gets SIGINT and the time to tear down."""
        cmd = [SANDBOX, *args]
        peak = 0
        t0 = time.perf_counter()
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.root
        ) as proc:
            self.live.append(proc)
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, vm_hwm(proc.pid))
                    done.wait(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            helper = threading.Thread(target=during, args=(proc,), daemon=True) if during else None
            if helper:
                helper.start()
            try:
                out, err = proc.communicate(timeout=timeout)
            except BaseException:
                proc.send_signal(signal.SIGINT)  # the run tears down what it made, then exits 130
                try:
                    proc.communicate(timeout=180)
                except BaseException:
                    proc.kill()
                raise
            finally:
                wall = time.perf_counter() - t0
                done.set()
                sampler.join(5)
                self.live.remove(proc)
            if helper:
                helper.join(120)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, peak

    def run_dir_of(self, res: subprocess.CompletedProcess[str]) -> tuple[dict[str, Any], Path]:
        try:
            summary = json.loads(res.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"sandbox run: exit {res.returncode}, no summary\n{res.stderr[-3000:]}") from None
        return summary, Path(summary["run_dir"])

    # -- 1. throughput -------------------------------------------------------------------------------------

    def throughput(self) -> dict[str, Any]:
        a = self.args
        server = FileServer(self.root, a.size_mib * MiB, a.warmup + a.rounds)
        direct_name = f"bench-overheads-dl-{uuid.uuid4().hex[:8]}"
        direct: dict[str, Any] = {}
        server_cpu: list[dict[str, Any]] = []
        try:
            script = (
                DOWNLOAD.replace("@HTTPS_PORT@", str(server.https_port))
                .replace("@HTTP_PORT@", str(server.http_port))
                .replace("@HOST@", HOST_NAME)
            )
            kit = self.root / "download"
            kit.mkdir()
            (kit / "bench-download.sh").write_text(script)
            shutil.copy(server.cert, kit / "bench-ca.pem")
            say(
                f"throughput: {a.size_mib} MiB from {server.address} "
                f"(http :{server.http_port}, https :{server.https_port})"
            )
            # Both at once: the direct container and the sandbox run take turns at the server, round by round.
            worker = threading.Thread(target=self._direct, args=(kit, direct_name, direct), daemon=True)
            worker.start()
            try:
                proxied = self._proxied(kit, server)
            except BaseException:
                run(["docker", "rm", "-f", direct_name])  # it would wait for turns that never come
                raise
            finally:
                worker.join(300)
            if "samples" not in direct:
                raise RuntimeError(direct.get("error", "direct download: no result"))
        finally:
            server_cpu = server.close()
        cpu = {(c["who"], int(c["round"]), c["proto"]): c["cpu_s"] for c in server_cpu}
        gib = a.size_mib / 1024
        out: dict[str, Any] = {
            "size_mib": a.size_mib,
            "rounds": a.rounds,
            "server": f"{server.address} (host-gateway)",
            "goal": GOAL_THROUGHPUT,
        }
        for proto in ("https", "http"):
            d = [s for s in direct["samples"] if s["proto"] == proto]
            p = [s for s in proxied["samples"] if s["proto"] == proto]
            dm = statistics.median(s["mib_s"] for s in d)
            pm = statistics.median(s["mib_s"] for s in p)

            def per_gib(samples: list[dict[str, Any]], who: str) -> dict[str, float | None]:
                """Median CPU-seconds per GiB downloaded: curl's, and the server's sending thread's."""
                keys = [(who, s["round"], s["proto"]) for s in samples]
                srv = [cpu[k] for k in keys if k in cpu]
                return {
                    "curl": round(statistics.median(s["curl_cpu_s"] for s in samples) / gib, 2),
                    "server": round(statistics.median(srv) / gib, 2) if srv else None,
                }

            out[proto] = {
                "direct_mib_s": round(dm, 1),
                "proxied_mib_s": round(pm, 1),
                "ratio": round(pm / dm, 2),
                "samples": {"direct_mib_s": [s["mib_s"] for s in d], "proxied_mib_s": [s["mib_s"] for s in p]},
                "cpu_s_per_gib": {"direct": per_gib(d, "direct"), "proxied": per_gib(p, "proxied")},
            }
            c = out[proto]["cpu_s_per_gib"]
            say(
                f"  {proto:<5} direct {dm:7.1f} MiB/s  proxied {pm:7.1f} MiB/s  ratio {pm / dm:.2f}x; CPU-s per GiB: "
                f"curl {c['direct']['curl']} / {c['proxied']['curl']}, server {c['direct']['server']} / "
                f"{c['proxied']['server']}"
            )
        out["proxied_run"] = proxied["run"]
        return out

    def _samples(self, output: str, where: str) -> list[dict[str, Any]]:
        want = (self.args.warmup + self.args.rounds) * 2
        rows = [ln.split()[1:] for ln in output.splitlines() if ln.startswith("BENCH-DL ")]
        if len(rows) != want:
            raise RuntimeError(f"{where}: {len(rows)} of {want} downloads reported:\n{output[-3000:]}")
        samples = []
        for i, proto, total, size, first, user, system in rows:
            if int(float(size)) != self.args.size_mib * MiB:
                raise RuntimeError(f"{where}: {proto} round {i} downloaded {size} bytes")
            if int(i) > self.args.warmup:
                t = float(total)
                samples.append(
                    {
                        "round": int(i),
                        "proto": proto,
                        "curl_cpu_s": round(float(user) + float(system), 3),
                        "seconds": round(t, 3),
                        "first_byte_s": round(float(first), 4),
                        "mib_s": round(float(size) / MiB / t, 1),
                    }
                )
        return samples

    def _direct(self, kit: Path, name: str, out: dict[str, Any]) -> None:
        """The downloads in a container of the agent image on the default bridge, no proxy (in a thread)."""
        from agent_sandbox.config.policy import load_policy

        a = self.args
        lim = load_policy("default")[0].limits
        self.containers.append(name)
        cmd = ["docker", "run", "--rm", "--name", name, "--label", BENCH_LABEL, "--entrypoint", "bash"]
        cmd += ["--add-host", f"{HOST_NAME}:host-gateway", "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=1g"]
        cmd += ["--tmpfs", "/home/agent:rw,nosuid,nodev,size=512m,uid=1000,gid=1000,mode=0700"]
        cmd += ["--cpus", str(lim.cpus), "--memory", str(lim.memory_bytes), "--memory-swap", str(lim.memory_bytes)]
        cmd += ["--pids-limit", str(lim.pids), "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        cmd += ["-v", f"{kit}:/bench:ro", self.tags["agent"], "/bench/bench-download.sh", "direct"]
        cmd += [str(a.warmup + a.rounds)]
        try:
            res = run(cmd, timeout=900)
            if res.returncode:
                raise RuntimeError(
                    f"direct download: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
                )
            out["samples"] = self._samples(res.stdout, "direct")
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"

    def _proxied(self, kit: Path, server: FileServer) -> dict[str, Any]:
        a = self.args
        repo = git_repo(
            self.root / "download-repo",
            {n: (kit / n).read_text() for n in ("bench-download.sh", "bench-ca.pem")},
        )
        policy = self.root / "download-policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "name": "bench-overheads-download",
                    "egress": {
                        "allow": [f"{HOST_NAME}:{server.https_port}", f"{HOST_NAME}:{server.http_port}"],
                        "hosts": {HOST_NAME: "host-gateway"},
                        "allow_addresses": [f"{server.address}/32"],
                    },
                }
            )
        )
        model = self.root / "download-model.yaml"
        model.write_text(
            yaml.safe_dump(
                {
                    "turns": [
                        {"bash": f"bash bench-download.sh proxied {a.warmup + a.rounds}", "timeout_ms": 600000},
                        {"text": "Downloads timed."},
                    ]
                }
            )
        )
        args = ["run", "--repo", str(repo), "--task", "Time the downloads.", "--policy", str(policy)]
        before = self.run_ids()
        cpu: dict[str, float] = {}

        def sidecar_cpu(proc: subprocess.Popen[str]) -> None:
            """The sidecar's CPU time from the agent's Bash call on: the proxy's work (docker stats, sampled)."""
            try:
                import docker

                api = docker.from_env().api
                name = f"sbx-{self.in_tool_call(proc, before)}-sidecar"
                while proc.poll() is None:
                    stats = api.stats(name, stream=False, one_shot=True)
                    usage = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0) / 1e9
                    if usage > 0:  # a stopping container answers with zeros
                        cpu.setdefault("first", usage)
                        cpu["last"] = max(cpu["last"], usage) if "last" in cpu else usage
                    time.sleep(0.5)
            except Exception:  # the container went at teardown: the last sample stands
                pass

        res, wall, rss = self.sandbox([*args, "--model-script", str(model), "--json"], during=sidecar_cpu)
        summary, run_dir = self.run_dir_of(res)
        if res.returncode or summary.get("status") != "succeeded":
            raise RuntimeError(
                f"proxied download: exit {res.returncode}, {summary.get('message')}\n{res.stderr[-2000:]}"
            )
        transcript = [json.loads(ln) for ln in (run_dir / "model" / "transcript.jsonl").read_text().splitlines()]
        output = "\n".join(
            r["content"] if isinstance(r["content"], str) else json.dumps(r["content"])
            for entry in transcript
            for r in entry.get("tool_results", [])
        )
        events = [json.loads(ln) for ln in (run_dir / "audit.jsonl").read_text().splitlines()]
        egress = [e["payload"] for e in events if e["source"] == "proxy" and e["type"] == "egress"]
        refused = [e for e in egress if e["decision"] != "allow"]
        if refused:
            raise RuntimeError(f"proxied download: the proxy refused connections: {refused}")
        down = sum(e["bytes_down"] for e in egress)
        busy = cpu["last"] - cpu["first"] if "first" in cpu else 0.0
        say(
            f"  proxied: sandbox run {summary['id']}, {wall:.1f}s in all, {len(egress)} proxied connections, "
            f"{down / MiB:.0f} MiB; the sidecar used {busy:.2f} CPU-s meanwhile"
        )
        return {
            "samples": self._samples(output, f"sandbox run {summary['id']}"),
            "run": {
                "id": summary["id"],
                "wall_s": round(wall, 2),
                "connections": len(egress),
                "bytes_down": down,
                "supervisor_peak_rss_mib": round(rss / MiB),
                # The sidecar's CPU time while the downloads ran, and what one CPU of it moves at that cost.
                "sidecar_cpu_s": round(busy, 2) if busy else None,
                "proxy_mib_per_cpu_s": round(down / MiB / busy) if busy else None,
            },
        }

    # -- 2. and 3. gateway TTFB and kill latency --------------------------------------------------------------

    def kill(self, case: str, ttfb: dict[str, Any] | None = None) -> dict[str, Any]:
        """A run stopped by its wall-clock limit while its agent sits in the Bash call of KILL_CASES[case]: the
        latency from `limit_hit` to the agent's exit. With `ttfb`, the gateway's TTFB is measured meanwhile (into
        that dict)."""
        from agent_sandbox.run.base import STOP_GRACE

        a = self.args
        repo = git_repo(self.root / f"kill-{case}", {"README.md": "# sleeper\n"})
        model = self.root / f"kill-{case}.yaml"
        model.write_text(
            yaml.safe_dump(
                {
                    # Tiny usage: a hundred and more calls of the TTFB test stay far from the budget.
                    "usage": {"input_tokens": 10, "output_tokens": 5},
                    "turns": [{"bash": KILL_CASES[case][1], "timeout_ms": 600000}, {"text": "Slept."}],
                }
            )
        )

        def measure(proc: subprocess.Popen[str]) -> None:
            assert ttfb is not None
            try:
                ttfb.update(self._ttfb(proc, before))
            except Exception as exc:  # reported below, after the run has ended
                ttfb["error"] = f"{type(exc).__name__}: {exc}"

        before = self.run_ids()
        say(
            f"kill, {KILL_CASES[case][0]}: wall-clock limit {a.kill_after}s"
            + (", and TTFB" if ttfb is not None else "")
        )
        since = time.time()
        args = ["run", "--repo", str(repo), "--task", "Sleep.", "--model-script", str(model)]
        args += ["--timeout", str(a.kill_after), "--json"]
        res, wall, _ = self.sandbox(args, during=measure if ttfb is not None else None)
        until = time.time() + 1
        summary, run_dir = self.run_dir_of(res)
        if ttfb is not None and "ended_at" not in ttfb:
            raise RuntimeError(f"ttfb: {ttfb.get('error', 'not measured')}")
        if summary.get("reason") != "timeout":
            raise RuntimeError(
                f"kill: the run ended with {summary.get('reason')}, not timeout: {summary.get('message')}"
            )
        events = [json.loads(ln) for ln in (run_dir / "audit.jsonl").read_text().splitlines()]
        first: dict[str, float] = {}
        for e in events:
            first.setdefault(e["type"], e["time"])
        hit, usage = first["limit_hit"], first["resource_usage"]
        if first.get("tool_call", hit) >= hit:
            raise RuntimeError("kill: the limit hit before the agent's Bash call began (raise --kill-after)")
        if ttfb is not None and ttfb.pop("ended_at") > hit:
            say("  note: the TTFB measurement was still running when the limit hit (raise --kill-after)")
        engine = self._engine_events(f"sbx-{summary['id']}-agent", since, until)
        kills = [(t, sig) for t, action, sig in engine if action == "kill"]
        die = next(((t, code) for t, action, code in engine if action == "die"), None)
        out: dict[str, Any] = {
            "case": KILL_CASES[case][0],
            "bash": KILL_CASES[case][1],
            "latency_s": round(usage - hit, 3),
            "sigterm_after_s": round(kills[0][0] - hit, 3) if kills else None,
            "signals": [sig for _, sig in kills],
            "sigkill_after_s": next((round(t - hit, 3) for t, sig in kills if sig == "9"), None),
            "died_after_s": round(die[0] - hit, 3) if die else None,
            "agent_exit_code": die[1] if die else None,
            "run_id": summary["id"],
            "run_wall_s": round(wall, 2),
        }
        say(
            f"  limit_hit -> signals {out['signals']}, the agent's container died after {out['died_after_s']}s "
            f"(exit {out['agent_exit_code']}), its exit on record (resource_usage) after {out['latency_s']}s; "
            f"grace {STOP_GRACE}s"
        )
        return out

    def kills(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The TTFB (measured during the first kill run) and both kill cases."""
        from agent_sandbox.run.base import STOP_GRACE

        ttfb: dict[str, Any] = {}
        kill: dict[str, Any] = {
            "limit": "timeout",
            "kill_after_s": self.args.kill_after,
            "grace_s": STOP_GRACE,
            "goal_s": GOAL_KILL_S + STOP_GRACE,
        }
        kill["tool_ignores_term"] = self.kill("tool_ignores_term", ttfb)
        kill["agent_frozen"] = self.kill("agent_frozen")
        return ttfb, kill

    def run_ids(self) -> set[str]:
        runs = self.state / "runs"
        return {d.name for d in runs.iterdir() if d.is_dir()} if runs.is_dir() else set()

    def in_tool_call(self, proc: subprocess.Popen[str], before: set[str]) -> str:
        """Wait until the agent of a run started after `before` has asked for its Bash call; the run's id."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            for rid in self.run_ids() - before:
                trail = self.state / "runs" / rid / "audit.jsonl"
                if trail.exists() and '"type":"tool_call"' in trail.read_text().replace(" ", ""):
                    return rid
            time.sleep(0.1)
        raise RuntimeError("the agent never reached its Bash call")

    def _ttfb(self, proc: subprocess.Popen[str], before: set[str]) -> dict[str, Any]:
        """Wait until the run's agent sits in its Bash call, then time the gateway from the sidecar's loopback."""
        a = self.args
        run_id = self.in_tool_call(proc, before)
        from agent_sandbox.sidecar.config import GATEWAY_PORT, SCRIPTED_MODEL_PORT

        name = f"bench-overheads-ttfb-{uuid.uuid4().hex[:8]}"
        self.containers.append(name)
        cmd = ["docker", "run", "--rm", "--name", name, "--label", BENCH_LABEL]
        cmd += ["--network", f"container:sbx-{run_id}-sidecar", "--entrypoint", "/opt/sidecar/bin/python"]
        cmd += [self.tags["sidecar"], "-c", TTFB_CLIENT, str(SCRIPTED_MODEL_PORT), str(GATEWAY_PORT)]
        cmd += [str(a.requests), str(a.ttfb_warmup), str(a.body_kib * 1024)]
        t0 = time.perf_counter()
        res = run(cmd, timeout=300)
        ended = time.time()
        if res.returncode:
            raise RuntimeError(f"the TTFB client: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        data = json.loads(res.stdout)
        d_first = [x[0] for x in data["direct"]]
        g_first = [x[0] for x in data["gateway"]]
        d_all = [x[1] for x in data["direct"]]
        g_all = [x[1] for x in data["gateway"]]
        out = {
            "requests": a.requests,
            "warmup": a.ttfb_warmup,
            "body_bytes": data["body_bytes"],
            "goal_ms": GOAL_TTFB_MS,
            "direct_ms": {"median": round(statistics.median(d_first), 2), "p95": round(pct(d_first, 0.95), 2)},
            "gateway_ms": {"median": round(statistics.median(g_first), 2), "p95": round(pct(g_first, 0.95), 2)},
            "whole_response_ms": {
                "direct": round(statistics.median(d_all), 2),
                "gateway": round(statistics.median(g_all), 2),
            },
            "samples_ms": {"direct": [round(x, 2) for x in d_first], "gateway": [round(x, 2) for x in g_first]},
            "ended_at": ended,
        }
        out["added_ms"] = {
            "median": round(out["gateway_ms"]["median"] - out["direct_ms"]["median"], 2),
            "p95": round(out["gateway_ms"]["p95"] - out["direct_ms"]["p95"], 2),
        }
        say(
            f"  ttfb ({time.perf_counter() - t0:.1f}s): direct {out['direct_ms']}, gateway {out['gateway_ms']} "
            f"-> added {out['added_ms']} ms"
        )
        return out

    @staticmethod
    def _engine_events(container: str, since: float, until: float) -> list[tuple[float, str, str | None]]:
        """The engine's kill and die events of one container: (time, action, signal or exit code)."""
        res = run(
            [
                *("docker", "events", "--since", f"{since:.3f}", "--until", f"{until:.3f}"),
                *("--filter", "type=container", "--filter", f"container={container}"),
                *("--filter", "event=kill", "--filter", "event=die", "--format", "{{json .}}"),
            ],
            timeout=60,
        )
        out = []
        for line in res.stdout.splitlines():
            e = json.loads(line)
            attrs = e.get("Actor", {}).get("Attributes", {})
            detail = attrs.get("signal") if e["Action"] == "kill" else attrs.get("exitCode")
            out.append((e["timeNano"] / 1e9, e["Action"], detail))
        return sorted(out)

    # -- 4. a sweep of many runs in one process ------------------------------------------------------------

    def sweep(self) -> dict[str, Any]:
        a = self.args
        base = self.root / "sweep"
        repos = [git_repo(base / f"repo-{i:02d}", {"README.md": f"# sweep {i}\n"}) for i in range(a.sweep)]
        model = base / "model.yaml"
        model.write_text(yaml.safe_dump({"turns": [{"bash": "echo hello > hello.txt"}, {"text": "Wrote hello.txt."}]}))
        out: dict[str, Any] = {"runs": a.sweep, "cores": os.cpu_count()}
        phases = [("at_once", a.sweep)] + ([] if a.no_sequential else [("one_at_a_time", 1)])
        for key, concurrency in phases:
            name = f"bench-overheads-{concurrency}"
            manifest = base / f"{name}.yaml"
            manifest.write_text(
                yaml.safe_dump(
                    {
                        "name": name,
                        "task": "Write hello.txt saying hello.",
                        "model_script": str(model),
                        "concurrency": concurrency,
                        "repos": [{"path": str(r)} for r in repos],
                    }
                )
            )
            say(f"sweep: {a.sweep} runs, {concurrency} at a time, in one `sandbox sweep` ...")
            res, wall, rss = self.sandbox(["sweep", str(manifest), "--json"], timeout=1800)
            try:
                summary = json.loads(res.stdout)
            except json.JSONDecodeError:
                raise RuntimeError(f"sandbox sweep: exit {res.returncode}, no summary\n{res.stderr[-3000:]}") from None
            rows = summary["rows"]
            ok = [r for r in rows if r["status"] == "succeeded" and r["files_changed"] == 1]
            failed = [
                f"{Path(r['repo']).name}: {r['status']} {r['reason']} {r['message']}"[:200] for r in rows if r not in ok
            ]
            durations = [r["duration_s"] for r in rows]
            out[key] = {
                "concurrency": concurrency,
                "exit_code": res.returncode,
                "succeeded": len(ok),
                "failed": failed,
                "wall_s": round(wall, 2),
                "run_median_s": round(statistics.median(durations), 2),
                "run_max_s": round(max(durations), 2),
                "peak_rss_mib": round(rss / MiB),
                "run_ids": [r["run_id"] for r in rows],
            }
            say(
                f"  {len(ok)}/{len(rows)} succeeded, exit {res.returncode}, wall {wall:.1f}s, run median "
                f"{statistics.median(durations):.1f}s, peak RSS {rss / MiB:.0f} MiB"
            )
        return out

    # -- leftovers -----------------------------------------------------------------------------------------

    def leftovers(self) -> tuple[list[str], list[str]]:
        """Containers and networks of this benchmark (its own, and its runs') still on the engine."""
        return leftovers(self.state, BENCH_LABEL)

    def cleanup(self) -> list[str]:
        """Remove what is left; returns what had to be removed (a run's own teardown should leave nothing)."""
        return cleanup(self.state, BENCH_LABEL, self.containers)


def mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def headlines(res: dict[str, Any]) -> list[str]:
    """The table rows of the headline figures (also used by bench/all.py)."""
    rows: list[str] = []
    tp, tt, kl, sw = (res.get(k) for k in ("throughput", "ttfb", "kill", "sweep"))
    if tp:
        h, p = tp["https"], tp["http"]
        rows.append(
            f"| 3. download through the egress proxy / direct, {tp['size_mib']} MiB, HTTPS (CONNECT), median of "
            f"{tp['rounds']} | **{h['ratio']:.2f}x** ({h['proxied_mib_s']:.0f} / {h['direct_mib_s']:.0f} MiB/s) "
            f"| >= {tp['goal']}x | {mark(h['ratio'] >= tp['goal'])} |"
        )
        rows.append(
            f"| 3. the same, plain HTTP (forwarded by the proxy) | {p['ratio']:.2f}x ({p['proxied_mib_s']:.0f} / "
            f"{p['direct_mib_s']:.0f} MiB/s) | reported | |"
        )
    if tt:
        add = tt["added_ms"]
        rows.append(
            f"| 3. gateway: time to first byte added, median (p95) of {tt['requests']} | **{add['median']:.2f} ms** "
            f"({add['p95']:.2f} ms) | <= {tt['goal_ms']:.0f} ms | {mark(add['median'] <= tt['goal_ms'])} |"
        )
    if kl:
        for key in ("tool_ignores_term", "agent_frozen"):
            if k := kl.get(key):
                died = f"; container gone {k['died_after_s']:.2f} s" if k["died_after_s"] is not None else ""
                rows.append(
                    f"| 3. kill: `limit_hit` to the agent's exit on record, {k['case']}{died} | "
                    f"**{k['latency_s']:.2f} s** | <= {GOAL_KILL_S:.0f} s + {kl['grace_s']:.0f} s grace "
                    f"| {mark(k['latency_s'] <= kl['goal_s'])} |"
                )
    if sw:
        once = sw["at_once"]
        all_ok = once["succeeded"] == sw["runs"] and once["exit_code"] == 0
        rows.append(
            f"| 3. `sandbox sweep` of {sw['runs']} runs at once on {sw['cores']} cores, one process | "
            f"**{once['succeeded']}/{sw['runs']} succeeded** | all succeed | {mark(all_ok)} |"
        )
        seq = sw.get("one_at_a_time")
        also = " / one at a time" if seq else ""
        rows.append(
            f"| 3. sweep wall time, {sw['runs']} runs at once{also} | {once['wall_s']:.1f} s"
            + (f" / {seq['wall_s']:.1f} s" if seq else "")
            + " | reported | |"
        )
        rows.append(
            f"| 3. sweep process peak RSS, {sw['runs']} runs at once{also} | {once['peak_rss_mib']} MiB"
            + (f" / {seq['peak_rss_mib']} MiB" if seq else "")
            + " | reported | |"
        )
    return rows


def notes(res: dict[str, Any]) -> list[str]:
    """The detail lines under the table: samples, breakdowns (also used by bench/all.py)."""
    lines = []
    if tp := res.get("throughput"):
        run_ = tp["proxied_run"]
        h, p = tp["https"]["samples"], tp["http"]["samples"]
        lines.append(
            f"- overheads, downloads of {tp['size_mib']} MiB from {tp['server']}, MiB/s: https direct "
            f"{h['direct_mib_s']}, proxied {h['proxied_mib_s']}; http direct {p['direct_mib_s']}, proxied "
            f"{p['proxied_mib_s']}"
        )
        lines.append(
            f"- overheads, the proxied `sandbox run`: {run_['connections']} connections, "
            f"{run_['bytes_down'] / MiB:.0f} MiB through the proxy"
            + (
                f", {run_['sidecar_cpu_s']} CPU-s of the sidecar meanwhile: {run_['proxy_mib_per_cpu_s']} MiB per "
                "CPU-second (the sidecar's limit is 1 CPU)"
                if run_["sidecar_cpu_s"]
                else ""
            )
        )
        if run_["proxy_mib_per_cpu_s"] and "cpu_s_per_gib" in tp["https"]:
            proxy = round(1024 / run_["proxy_mib_per_cpu_s"], 2)
            for proto in ("https", "http"):
                c = tp[proto]["cpu_s_per_gib"]
                lines.append(
                    f"- overheads, {proto}: CPU-seconds per GiB downloaded, direct: curl {c['direct']['curl']} + "
                    f"the server {c['direct']['server']}; proxied: curl {c['proxied']['curl']} + the server "
                    f"{c['proxied']['server']} + the sidecar {proxy} (both protocols)"
                )
    if tt := res.get("ttfb"):
        d, g, w = tt["direct_ms"], tt["gateway_ms"], tt["whole_response_ms"]
        lines.append(
            f"- overheads, gateway: {tt['body_bytes'] // 1024} KiB streamed requests from the sidecar's loopback, ms "
            f"to `message_start` median/p95: scripted model {d['median']}/{d['p95']}, through the gateway "
            f"{g['median']}/{g['p95']}; whole response (median) {w['direct']} / {w['gateway']}"
        )
    if kl := res.get("kill"):
        for key in ("tool_ignores_term", "agent_frozen"):
            if k := kl.get(key):
                lines.append(
                    f"- overheads, kill, {k['case']}: wall-clock limit {kl['kill_after_s']} s, grace "
                    f"{kl['grace_s']} s; after `limit_hit`: signals {k['signals']} (SIGTERM after "
                    f"{k['sigterm_after_s']} s, SIGKILL after "
                    + (f"{k['sigkill_after_s']} s" if k["sigkill_after_s"] is not None else "none")
                    + "), the agent's container died "
                    f"after {k['died_after_s']} s (exit {k['agent_exit_code']}), its exit on record "
                    f"(`resource_usage`) after {k['latency_s']} s"
                )
    if sw := res.get("sweep"):
        for key in ("at_once", "one_at_a_time"):
            if p := sw.get(key):
                lines.append(
                    f"- overheads, `sandbox sweep` of {sw['runs']} runs, {p['concurrency']} at a time: wall "
                    f"{p['wall_s']} s, run median {p['run_median_s']} s, max {p['run_max_s']} s, the process's peak "
                    f"RSS {p['peak_rss_mib']} MiB" + (f"; failed: {p['failed']}" if p["failed"] else "")
                )
    return lines


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    return "\n".join(
        [
            "| headline | measured | goal | met |",
            "| --- | --- | --- | --- |",
            *headlines(res),
            "",
            f"- machine: {m['cores']} cores ({m['cpu']}), {m['memory']}, kernel {m['kernel']}, Docker {m['docker']}",
            f"- date: {res['date']}; images: {res['images']['agent']}, {res['images']['sidecar']}; "
            f"the script took {res['duration_s']:.0f} s",
            *notes(res),
            *(f"- **failed**: {e}" for e in res.get("errors", [])),
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="the downloaded file (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="downloads per protocol and setting (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted downloads first (default 1)")
    ap.add_argument("--requests", type=int, default=100, help="TTFB requests each way (default 100)")
    ap.add_argument("--ttfb-warmup", type=int, default=10, help="uncounted TTFB requests first (default 10)")
    ap.add_argument("--body-kib", type=int, default=64, help="TTFB request body (default 64 KiB)")
    ap.add_argument("--kill-after", type=int, default=8, help="the wall-clock limit of the kill run (default 8 s)")
    ap.add_argument("--sweep", type=int, default=10, help="runs in the sweep (default 10)")
    ap.add_argument("--no-sequential", action="store_true", help="skip the sweep one run at a time")
    ap.add_argument("--only", nargs="+", choices=["throughput", "ttfb", "sweep"], help="run only these parts")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)  # the file server's own process
    args = ap.parse_args()
    if args.serve:
        addr, cert, key, size, rounds = args.serve
        serve(addr, cert, key, int(size), int(rounds))
        return 0
    parts = [p for p in ("throughput", "ttfb", "sweep") if p in (args.only or ("throughput", "ttfb", "sweep"))]
    started = time.perf_counter()
    tags = images()
    root = Path(tempfile.mkdtemp(prefix="sandbox-bench-overheads-"))
    bench = Bench(root, tags, args)
    res: dict[str, Any] = {
        "benchmark": "overheads",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "images": tags,
        "command": shlex.join(["bench/overheads.py", *sys.argv[1:]]),
    }
    errors: list[str] = []
    try:
        for part in parts:  # each on its own: one that fails does not cost the others
            try:
                if part == "throughput":
                    res["throughput"] = bench.throughput()
                elif part == "ttfb":
                    res["ttfb"], res["kill"] = bench.kills()
                else:
                    res["sweep"] = bench.sweep()
            except Exception as exc:
                errors.append(f"{part}: {type(exc).__name__}: {exc}")
                say(f"overheads: {part} FAILED: {exc}")
    except KeyboardInterrupt:
        errors.append("interrupted")
        say("overheads: interrupted")
    finally:
        for proc in list(bench.live):  # interrupted mid-run: let it tear down
            proc.send_signal(signal.SIGINT)
        removed = bench.cleanup()
        left = bench.leftovers()
        shutil.rmtree(root, ignore_errors=True)
    res["leftovers"] = {"removed_by_bench": removed, "still_there": left[0] + left[1]}
    if removed:
        say(f"LEFT BEHIND by a run, removed by this script: {removed}")
    if left[0] or left[1]:
        say(f"LEFT BEHIND on the engine (containers, networks): {left}")
    res["duration_s"] = round(time.perf_counter() - started, 1)
    if errors:
        res["errors"] = errors
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
    return 1 if errors or removed or left[0] or left[1] else 0


if __name__ == "__main__":
    sys.exit(main())
