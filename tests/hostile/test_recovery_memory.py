"""Red team of issue 12: the agent grows its run's trail (and so the supervisor's memory, and recovery's)
with a flood of connections, each one a decision line.

Found at first: nothing bounded the sidecar's lines. Every connection to the proxy was one decision line with
its host name (up to h11's 16 kB head) in it twice; the supervisor recorded every line and kept each one's
host in memory (~2x the trail in RSS: 1.27 GB for a 656 MB trail), and recovery read the whole trail into
memory several times over (2.2 GiB for 355 MiB). Now host names past 253 characters are refused, a run ends
once its sidecar has written 64 MiB of lines (`egress_flood`, egress decisions past that are counted, not
recorded), the summary keeps at most 10,000 distinct decision lines, and the trail is read in bounded memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO_ROOT, SANDBOX, git, labelled

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

LIMIT_MB = 400

FLOOD = r"""
import socket, threading
def worker(k):
    for i in range(1_000_000):
        # A distinct host name each time, as long as the proxy lets one be: no two decision lines alike.
        req = ("CONNECT " + "a" * 230 + f"{k}-{i:08d}.invalid:443 HTTP/1.0\r\n\r\n").encode()
        try:
            s = socket.create_connection(("sidecar", 3128), timeout=30)
            s.sendall(req)
            while s.recv(65536):
                pass
            s.close()
        except OSError:
            return  # the run was stopped
threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

PEAK = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, file=sys.stderr)"
)


def test_a_connection_flood_ends_the_run_with_bounded_trail_and_memory(make_repo, state_dir, write_script) -> None:
    script = yaml.safe_dump(
        {
            "turns": [
                {"write": {"path": "partial.txt", "content": "work before the flood\n"}},
                {"write": {"path": "/tmp/flood.py", "content": FLOOD}},
                {"bash": "python3 /tmp/flood.py; sleep 600", "timeout_ms": 600000},
                {"text": "never reached"},
            ]
        }
    )
    repo = make_repo()
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK,
            *SANDBOX,
            "run",
            "--repo",
            str(repo),
            "--task",
            "t",
            "--model-script",
            str(write_script(script)),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "SANDBOX_STATE_DIR": str(state_dir)},
        cwd=REPO_ROOT,
    )
    peak_kb, rc = map(int, res.stderr.strip().splitlines()[-1].split())
    s = json.loads(res.stdout)
    assert (rc, s["reason"]) == (10, "error") and "egress_flood" in s["message"], s["message"]
    assert git(repo, "show", f"{s['branch']}:partial.txt") == "work before the flood"
    trail = state_dir / "runs" / s["id"] / "audit.jsonl"
    assert trail.stat().st_size < 100 * 2**20, f"the trail grew to {trail.stat().st_size // 2**20} MiB"
    assert peak_kb // 1024 < LIMIT_MB, f"the supervisor peaked at {peak_kb // 1024} MiB of RSS"
    assert len(s["egress_hosts_denied"]) <= 10_001
    assert labelled(s["id"]) == []
