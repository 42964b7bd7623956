"""Red team of issue 12's recovery: the agent makes its run's trail as large as it likes, and `sandbox gc`
needs memory in proportion to it.

Nothing bounds the lines the sidecar writes for the agent: every connection to the proxy is one decision line,
and its host name (the CONNECT target, up to h11's 16 kB head) appears in it twice. Supervised, the agent
makes ~10 MB/s of trail this way (the supervisor records every line, and keeps each line's host and reason in
_Watch.egress_lines: ~2x the trail in RSS). Recovery then reads the whole trail into memory several times
over (AuditLog.resume: read_bytes and splitlines; AuditLog.events() in _replay and in _recorded; _replay
rebuilds egress_lines). A gc that runs out of memory either fails (MemoryError: the run is marked failed,
its objects and workspace stay, and every later gc fails the same way) or is OOM-killed (the run stays
`running`, and every `sandbox run` recovers it first, and dies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from ..conftest import REPO_ROOT, SANDBOX, git, labelled
from ..test_faults_e2e import bash_started, no_leftovers, only_run_id, wait_for
from .test_supervisor_loss import gc

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

LINES = 12000  # ~32 kB each: a ~390 MB trail
LIMIT_MB = 512

FLOOD = r'''
import socket, threading
def worker(k, n):
    for i in range(n):
        # A distinct host name each time: no two decision lines alike.
        req = ("CONNECT " + "a" * 15980 + f"{k}-{i:08d}:443 HTTP/1.0\r\n\r\n").encode()
        try:
            s = socket.create_connection(("sidecar", 3128), timeout=30)
            s.sendall(req)
            while s.recv(65536):
                pass
            s.close()
        except OSError:
            pass
threads = [threading.Thread(target=worker, args=(k, LINES // 8)) for k in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("flooded")
'''

PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, file=sys.stderr)")


def test_recovery_memory_does_not_grow_with_the_trail(make_repo, state_dir, write_script) -> None:
    # FAILS TODAY: see the module's docstring. Measured at b9c61e4 on a 355 MiB trail: gc peaked at 2.2 GiB of
    # RSS (1.5 GiB when every host name is the same); the supervisor that made a 656 MB trail had 1.27 GB.
    script = yaml.safe_dump({"turns": [
        {"write": {"path": "partial.txt", "content": "work before the kill\n"}},
        {"write": {"path": "/tmp/flood.py", "content": FLOOD.replace("LINES", str(LINES))}},
        {"bash": "python3 /tmp/flood.py; sleep 600", "timeout_ms": 600000},
        {"text": "never reached"},
    ]})
    repo = make_repo()
    # stderr to a file: a pipe nobody reads would block the supervisor on its progress lines (each denied
    # line carries the 16 kB host name) and it would record nothing more.
    with (state_dir.parent / "run.stderr").open("w") as errf:
        proc = subprocess.Popen([*SANDBOX, "run", "--repo", str(repo), "--task", "t", "--model-script",
                                 str(write_script(script)), "--json"], stdout=subprocess.PIPE, stderr=errf,
                                text=True, env={**os.environ, "SANDBOX_STATE_DIR": str(state_dir)}, cwd=REPO_ROOT)
    wait_for(lambda: bash_started(state_dir), 120, "the Bash call")
    run_id = only_run_id(state_dir)
    audit = state_dir / "runs" / run_id / "audit.jsonl"
    wait_for(lambda: audit.stat().st_size > LINES * 31_000, 400, "the supervisor to record the flood")
    trail_mb = audit.stat().st_size // 2**20
    os.kill(proc.pid, 9)
    proc.wait(30)
    try:
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-c", PEAK, *SANDBOX, "gc", "--json"], capture_output=True,
                             text=True, timeout=900, env={**os.environ, "SANDBOX_STATE_DIR": str(state_dir)},
                             cwd=REPO_ROOT)
        took = time.monotonic() - t0
        peak_kb, rc = map(int, res.stderr.strip().splitlines()[-1].split())
    finally:
        if labelled(run_id):
            gc(state_dir)
    assert rc == 0, res.stderr[-3000:]
    (mine,) = [r for r in json.loads(res.stdout) if r["run_id"] == run_id]
    assert mine["action"] == "recovered", mine
    assert git(repo, "show", f"sandbox/{run_id}:partial.txt") == "work before the kill"
    assert peak_kb // 1024 < LIMIT_MB, (f"gc peaked at {peak_kb // 1024} MiB of RSS recovering a {trail_mb} MiB "
                                        f"trail (took {took:.0f} s)")
    no_leftovers(state_dir, run_id)
