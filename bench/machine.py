"""What the benchmarks say about the machine they ran on, how they run a command, and the images they use."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SANDBOX = str(Path(sys.executable).parent / "sandbox")


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def machine() -> dict[str, str]:
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    docker = run(["docker", "version", "--format", "{{.Server.Version}}"]).stdout.strip() or "unknown"
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kb / 1024**2:.1f} GiB",
        "kernel": platform.release(),
        "docker": docker,
    }


def images() -> dict[str, str]:
    """The image set the current inputs call for, built first if missing."""
    from agent_sandbox.backend.docker import connect_client
    from agent_sandbox.backend.images import require_images
    from agent_sandbox.errors import EnvironmentNotReady

    try:
        tags = require_images(connect_client())
    except EnvironmentNotReady:
        print("building the images (sandbox images build) ...", file=sys.stderr, flush=True)
        subprocess.run([SANDBOX, "images", "build"], check=True, cwd=REPO_ROOT, stdout=sys.stderr)
        tags = require_images(connect_client())
    return {"agent": tags.agent, "sidecar": tags.sidecar}


def leftovers(state: Path, label: str) -> tuple[list[str], list[str]]:
    """Containers and networks of a benchmark still on the engine: its runs' (the run directories under
    `state`) and its own (labelled `label`)."""
    runs = state / "runs"
    run_ids = sorted(d.name for d in runs.iterdir() if d.is_dir()) if runs.is_dir() else []
    containers: list[str] = []
    networks: list[str] = []
    for flt in [f"label=sandbox.run-id={rid}" for rid in run_ids] + [f"label={label}"]:
        containers += run(["docker", "ps", "-aq", "--filter", flt]).stdout.split()
        networks += run(["docker", "network", "ls", "-q", "--filter", flt]).stdout.split()
    return containers, networks


def cleanup(state: Path, label: str, own: list[str]) -> list[str]:
    """Remove the benchmark's own containers (`own`), then whatever `leftovers` still finds; returns the latter
    (nothing, when every run tore down)."""
    for name in own:
        run(["docker", "rm", "-f", name])
    containers, networks = leftovers(state, label)
    if containers:
        run(["docker", "rm", "-f", *containers])
    if networks:
        run(["docker", "network", "rm", *networks])
    return containers + networks
