#!/usr/bin/env python3
"""Benchmark: real package installs through the sandbox's egress proxy, against the same installs without it.

    .venv/bin/python bench/install.py [--rounds 3]

One shell script (SCRIPT below) creates a fresh virtualenv and an empty directory, then times, with
`date +%s.%N` around each command, `pip install --no-cache-dir` of a pinned set of PyPI packages and
`npm install` of a pinned set of npm packages with an empty `--cache`, from the real registries. Caches are
new and empty every time, so every round really downloads; pip's and npm's configuration files are shut out
(PIP_CONFIG_FILE=/dev/null, `--isolated`, empty `--userconfig`/`--globalconfig`) so nothing host-only (find-
links, local indexes, constraints) short-circuits a download. Virtualenv creation is not timed. The script
runs in three settings:

  host     on this machine directly, the CA bundle passed explicitly;
  direct   in a container of the agent image on Docker's default bridge network, no proxy, with the same
           limits (CPUs, memory, pids, read-only root, tmpfs /tmp and home) and certificate authorities (as
           /sandbox/in/ca-certificates.pem, through sandbox/env.sh) a sandboxed run gets;
  proxied  inside a real `sandbox run` with the scripted model (one bash turn runs the script), under the
           dependency-update preset plus this network's allow_addresses and ca_certificates
           (tests/registries.py), so every download goes through the sidecar's egress proxy.

Each of --rounds rounds runs every setting once, in a rotating order, after --warmup uncounted rounds
(default 1: the first connections to a registry pay for DNS and for whatever the network in between
caches). The medians are printed as one Markdown table with the ratios proxied/host and proxied/direct,
the machine, the date and the tool versions.
Everything it creates (temporary directories, containers, the runs' state directory) is removed at the end;
it fails if anything labelled with one of its run ids is left on the engine. The images are built first if
needed (`sandbox images build`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for tests.registries: how this machine reaches the real registries

from bench.machine import cleanup, leftovers, machine, run  # noqa: E402
from tests import registries  # noqa: E402

from agent_sandbox.config.policy import load_policy  # noqa: E402

SANDBOX = [sys.executable, "-m", "agent_sandbox.cli"]
# Every package pinned, dependencies included, so each round downloads the very same files.
PIP_PACKAGES = (
    "requests==2.32.3",
    "certifi==2024.12.14",
    "charset-normalizer==3.4.1",
    "idna==3.10",
    "urllib3==2.3.0",
    "six==1.17.0",
    "packaging==24.2",
)
NPM_PACKAGES = ("semver@7.6.3", "lodash@4.17.21")
# --large: a 16 MB wheel, and two npm packages with dependencies (about 70 packages in all; the dependencies
# are whatever the ranges of these versions resolve to today) and a 20 MB one.
LARGE_PIP = (*PIP_PACKAGES, "numpy==2.2.1")
LARGE_NPM = (*NPM_PACKAGES, "express@4.21.2", "typescript@5.7.2")
SETTINGS = {"host": "host", "direct": "container, direct", "proxied": "sandbox, through the proxy"}
BENCH_LABEL = "sandbox.bench=install"
SYSTEM_CAS = Path("/etc/ssl/certs/ca-certificates.crt")

# Run with bash in each setting. It takes the CA bundle from SSL_CERT_FILE (set on the host by this script,
# in containers by sandbox/env.sh) and the proxy, if any, from HTTPS_PROXY (set by the sandbox).
SCRIPT = r"""set -euo pipefail
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
proxy=${HTTPS_PROXY:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/bench-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
: >"$work/npmrc-user"
: >"$work/npmrc-global"
mkdir "$work/npm"
echo "BENCH-VERSIONS python=$("$work/venv/bin/python" -V 2>&1 | cut -d' ' -f2)" \
     "pip=$("$work/venv/bin/pip" --version | cut -d' ' -f2) node=$(node --version) npm=$(npm --version)"
t0=$(date +%s.%N)
PIP_CONFIG_FILE=/dev/null "$work/venv/bin/pip" install --isolated --no-cache-dir --disable-pip-version-check \
  --quiet --cert "$ca" ${proxy:+--proxy "$proxy"} @PIP@
t1=$(date +%s.%N)
cd "$work/npm"
npm install --userconfig "$work/npmrc-user" --globalconfig "$work/npmrc-global" --cache "$work/npm-cache" \
  --cafile "$ca" --no-audit --no-fund --no-update-notifier --no-progress --loglevel=error @NPM@ >/dev/null
t2=$(date +%s.%N)
test -n "$(ls node_modules)"
echo "BENCH-TIMES pip=$t0:$t1 npm=$t1:$t2"
"""


@dataclass
class Sample:
    pip: float
    npm: float
    versions: str
    extra: dict[str, Any] = field(default_factory=dict)


def parse(output: str, where: str) -> Sample:
    times = re.search(r"BENCH-TIMES pip=([\d.]+):([\d.]+) npm=([\d.]+):([\d.]+)", output)
    versions = re.search(r"BENCH-VERSIONS (.*)", output)
    if not times or not versions:
        raise RuntimeError(f"{where}: the script printed no timings:\n{output[-3000:]}")
    a, b, c, d = (float(x) for x in times.groups())
    return Sample(pip=b - a, npm=d - c, versions=versions.group(1).strip())


def images() -> dict[str, str]:
    """The images the current inputs call for (role -> tag), built first if one is missing.

    The tags follow the files in images/, sandbox/ and the sidecar's modules, so they are asked for again
    before every container: a change to those files in the work tree means new images.
    """

    def ls() -> tuple[dict[str, str], bool]:
        res = run([*SANDBOX, "images", "ls", "--json"], cwd=REPO_ROOT)  # exits 3 when one is missing
        rows = json.loads(res.stdout)
        return {i["role"]: i["ref"] for i in rows}, all(i["present"] for i in rows)

    tags, present = ls()
    if not present:
        print("building the images (sandbox images build) ...", file=sys.stderr, flush=True)
        subprocess.run([*SANDBOX, "images", "build"], check=True, cwd=REPO_ROOT, stdout=sys.stderr)
        tags, present = ls()
    return tags


class Bench:
    def __init__(self, root: Path, pip: tuple[str, ...], npm: tuple[str, ...], static_hosts: bool = False) -> None:
        self.root = root
        self.cas = registries.company_network()["ca_certificates"]
        # The script, with the package lists filled in.
        self.script = root / "bench-install.sh"
        self.script.write_text(SCRIPT.replace("@PIP@", shlex.join(pip)).replace("@NPM@", shlex.join(npm)))
        # The company CAs alone (what the sandbox mounts as /sandbox/in/ca-certificates.pem), and the host's
        # bundle: the system's plus those.
        extra = "".join(Path(p).read_text().rstrip("\n") + "\n" for p in self.cas)
        self.ca_pem = root / "ca-certificates.pem"
        self.ca_pem.write_text(extra)
        self.host_bundle = root / "host-ca-bundle.pem"
        self.host_bundle.write_text(SYSTEM_CAS.read_text() + extra)
        self.policy_path = registries.dependency_update_policy(root / "policy.yaml")
        if static_hosts:
            # The registries' addresses as this host resolves them now, as static entries of the sidecar's
            # resolver: the proxy then sends no DNS query per connection.
            data = yaml.safe_load(self.policy_path.read_text())
            data["egress"]["hosts"] = {
                h: socket.getaddrinfo(h, 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
                for h in registries.PYPI_HOSTS + registries.NPM_HOSTS
            }
            self.policy_path.write_text(yaml.safe_dump(data))
        self.limits = load_policy(str(self.policy_path))[0].limits
        # The repository the sandboxed runs work on: it holds the script, and the agent runs it.
        self.repo = root / "repo"
        self.repo.mkdir()
        (self.repo / "bench-install.sh").write_text(self.script.read_text())
        for args in (
            ["init", "-q", "-b", "main"],
            ["add", "-A"],
            ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qm", "bench"],
        ):
            run(["git", "-C", str(self.repo), *args], check=True)
        self.model_script = root / "model.yaml"
        self.model_script.write_text(
            "turns:\n  - bash: bash bench-install.sh\n    timeout_ms: 600000\n  - text: The installs are timed.\n"
        )
        self.state = root / "state"
        self.containers: list[str] = []

    def host(self) -> Sample:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith(("PIP_", "NPM_CONFIG_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"))
        }
        env.update(
            SSL_CERT_FILE=str(self.host_bundle),
            PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
            TMPDIR=str(self.root),
        )
        res = run(["bash", str(self.script)], env=env, timeout=900)
        if res.returncode:
            raise RuntimeError(f"host: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
        return parse(res.stdout, "host")

    def direct(self, image: str) -> Sample:
        name = f"bench-install-{uuid.uuid4().hex[:10]}"
        self.containers.append(name)
        lim = self.limits
        cmd = [
            "docker",
            "run",
            "--rm",
            "--name",
            name,
            "--label",
            BENCH_LABEL,
            "--entrypoint",
            "bash",
            "--read-only",
            "--tmpfs",
            f"/tmp:rw,nosuid,nodev,exec,size={min(lim.disk_bytes, 1024**3)}",
            "--tmpfs",
            "/home/agent:rw,nosuid,nodev,exec,size=512m,uid=1000,gid=1000,mode=0700",
            "--cpus",
            str(lim.cpus),
            "--memory",
            str(lim.memory_bytes),
            "--memory-swap",
            str(lim.memory_bytes),
            "--pids-limit",
            str(lim.pids),
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "-v",
            f"{self.script}:/bench/install.sh:ro",
        ]
        if self.cas:
            cmd += ["-v", f"{self.ca_pem}:/sandbox/in/ca-certificates.pem:ro"]
        cmd += [image, "-c", ". /opt/sandbox/env.sh && exec bash /bench/install.sh"]
        res = run(cmd, timeout=900)
        if res.returncode:
            raise RuntimeError(f"direct: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
        return parse(res.stdout, "direct")

    def proxied(self) -> Sample:
        env = {**os.environ, "SANDBOX_STATE_DIR": str(self.state)}
        cmd = [
            *SANDBOX,
            "run",
            "--repo",
            str(self.repo),
            "--task",
            "Time the package installs.",
            "--policy",
            str(self.policy_path),
            "--model-script",
            str(self.model_script),
            "--json",
        ]
        for _attempt in range(2):
            t0 = time.perf_counter()
            res = run_sandbox(cmd, env)
            wall = time.perf_counter() - t0
            if res.returncode != 3:  # 3: the images changed under us (the work tree was edited); build, retry
                break
            images()
        if res.returncode:
            raise RuntimeError(f"sandbox run: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        summary = json.loads(res.stdout)
        run_dir = Path(summary["run_dir"])
        transcript = [json.loads(line) for line in (run_dir / "model" / "transcript.jsonl").read_text().splitlines()]
        output = "\n".join(
            r["content"] if isinstance(r["content"], str) else json.dumps(r["content"])
            for entry in transcript
            for r in entry.get("tool_results", [])
        )
        sample = parse(output, f"sandbox run {summary['id']}")
        events = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
        egress = [e["payload"] for e in events if e["source"] == "proxy" and e["type"] == "egress"]
        # A connection the policy refuses means the benchmark is set up wrong. One the proxy could not resolve
        # or connect upstream is part of what is measured: the client retried it, and waited for it.
        failed = [e for e in egress if e["decision"] != "allow"]
        wrong = [e for e in failed if e.get("decision_detail") not in ("unresolvable", "upstream unreachable")]
        if wrong:
            raise RuntimeError(f"sandbox run {summary['id']}: the proxy refused connections: {wrong}")
        sample.extra = {
            "run_wall": wall,
            "connections": len(egress),
            "failed": len(failed),
            "failed_why": sorted({f"{e['reason']} ({e['duration_ms'] / 1000:.0f}s)" for e in failed}),
            "hosts": sorted({f"{e['host']}:{e['port']}" for e in egress}),
            "bytes_down": sum(e["bytes_down"] for e in egress),
        }
        return sample

    def leftovers(self) -> tuple[list[str], list[str]]:
        """Containers and networks of this benchmark (its own, and its runs') still on the engine."""
        return leftovers(self.state, BENCH_LABEL)

    def cleanup(self) -> list[str]:
        """Remove what is left; returns what had to be removed (a run's own teardown should leave nothing)."""
        return cleanup(self.state, BENCH_LABEL, self.containers)


def run_sandbox(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """`sandbox run`, given the time to tear down on Ctrl-C or a timeout (subprocess.run would SIGKILL it)."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.send_signal(signal.SIGINT)  # the run tears down what it made, then exits 130
            try:
                proc.communicate(timeout=120)
            except BaseException:
                proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(results: dict[str, list[Sample]], pip: tuple[str, ...], npm: tuple[str, ...]) -> str:
    head = "| median seconds | " + " | ".join(SETTINGS.values()) + " | proxied / host | proxied / direct |"
    lines = [head, "|" + " --- |" * (len(SETTINGS) + 3)]
    for tool, n in (("pip", len(pip)), ("npm", len(npm))):
        med = {s: median([getattr(x, tool) for x in results[s]]) for s in SETTINGS}
        cells = [f"{med[s]:.2f}" for s in SETTINGS]
        lines.append(
            f"| `{tool} install` ({n} packages) | "
            + " | ".join(cells)
            + f" | {med['proxied'] / med['host']:.2f}x | {med['proxied'] / med['direct']:.2f}x |"
        )
    return "\n".join(lines)


def rounds(n: int) -> Iterator[tuple[int, list[str]]]:
    order = list(SETTINGS)
    for i in range(n):
        yield i, order[i % len(order) :] + order[: i % len(order)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every setting once (default 3)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="uncounted rounds first: DNS, connections and upstream caches warm for every setting",
    )
    ap.add_argument(
        "--static-hosts",
        action="store_true",
        help="give the sidecar the registries' addresses as egress.hosts, so the proxy resolves nothing",
    )
    ap.add_argument(
        "--large",
        action="store_true",
        help=f"also install {LARGE_PIP[-1]} and "
        f"{', '.join(LARGE_NPM[len(NPM_PACKAGES) :])} (many more connections, bigger files)",
    )
    ap.add_argument("--pip", nargs="+", metavar="REQ", help="what pip installs, instead of the built-in set")
    ap.add_argument("--npm", nargs="+", metavar="SPEC", help="what npm installs, instead of the built-in set")
    args = ap.parse_args()
    pip = tuple(args.pip or (LARGE_PIP if args.large else PIP_PACKAGES))
    npm = tuple(args.npm or (LARGE_NPM if args.large else NPM_PACKAGES))
    info = machine()
    started = datetime.datetime.now(datetime.UTC)
    used: dict[str, set[str]] = {"agent": set(), "sidecar": set()}
    results: dict[str, list[Sample]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-install-") as tmp:
        bench = Bench(Path(tmp), pip, npm, args.static_hosts)
        try:
            for i, order in rounds(args.warmup + args.rounds):
                warm = i < args.warmup
                for setting in order:
                    if setting == "host":
                        sample = bench.host()
                    elif setting == "direct":
                        image = images()["agent"]
                        used["agent"].add(image)
                        sample = bench.direct(image)
                    else:
                        tags = images()
                        used["agent"].add(tags["agent"])
                        used["sidecar"].add(tags["sidecar"])
                        sample = bench.proxied()
                    if not warm:
                        results[setting].append(sample)
                    extra = ""
                    if sample.extra:
                        e = sample.extra
                        extra = (
                            f"  (sandbox run {e['run_wall']:.1f}s in all; {e['connections']} proxied "
                            f"connections, {e['bytes_down'] / 1e6:.1f} MB down: {', '.join(e['hosts'])})"
                        )
                        if e["failed"]:
                            extra += f"; {e['failed']} FAILED: {', '.join(e['failed_why'])}"
                    where = "warm-up" if warm else f"round {i + 1 - args.warmup}/{args.rounds}"
                    print(
                        f"{where:<11} {setting:<8} pip {sample.pip:6.2f}s  npm {sample.npm:6.2f}s{extra}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            removed = bench.cleanup()
            left = [*bench.leftovers()]
            if removed:
                print(f"LEFT BEHIND by a run, removed by this script: {removed}", file=sys.stderr)
            if left[0] or left[1]:
                print(f"LEFT BEHIND on the engine (containers, networks): {left}", file=sys.stderr)
    print(
        f"## Package installs: host, container (direct), sandbox (through the egress proxy)\n\n"
        f"{table(results, pip, npm)}\n"
    )
    print(
        f"- pip: {' '.join(pip)}; npm: {' '.join(npm)}; empty caches, median of {args.rounds} interleaved "
        f"rounds after {args.warmup} warm-up"
    )
    print(f"- command: `{shlex.join(['.venv/bin/python', 'bench/install.py', *sys.argv[1:]])}`")
    if args.static_hosts:
        print(
            "- --static-hosts: the registries' addresses were given to the sidecar as `egress.hosts`: "
            "the proxy made no DNS queries"
        )
    print(
        f"- machine: {info['cores']} cores ({info['cpu']}), {info['memory']} memory, kernel {info['kernel']}, "
        f"Docker {info['docker']}"
    )
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC; images: {', '.join(sorted(used['agent'] | used['sidecar']))}")
    for s, label in SETTINGS.items():
        print(
            f"- {label}: {results[s][0].versions}; pip "
            + ", ".join(f"{x.pip:.2f}" for x in results[s])
            + "; npm "
            + ", ".join(f"{x.npm:.2f}" for x in results[s])
        )
    if failed := sum(x.extra["failed"] for x in results["proxied"]):
        why = sorted({w for x in results["proxied"] for w in x.extra["failed_why"]})
        print(f"- **{failed} proxied connections failed** over the rounds (the clients retried): {'; '.join(why)}")
    conns = median([x.extra["connections"] for x in results["proxied"]])
    print(f"- proxied connections per run: {conns:.0f} (median), to {', '.join(results['proxied'][0].extra['hosts'])}")
    walls = [x.extra["run_wall"] for x in results["proxied"]]
    print(
        f"- a whole `sandbox run` (containers, the scripted model, teardown) took {median(walls):.1f}s "
        f"(median); the table counts only the installs, timed inside the container"
    )
    return 1 if removed or left[0] or left[1] else 0


if __name__ == "__main__":
    sys.exit(main())
