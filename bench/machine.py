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
