"""Class 7: the disk limit is enforced by the kernel, not sampled.

The agent tries to fill the host's disk through its workspace: a huge fallocate, a stream of random data,
a tree nested deeper than a recursive walk survives. The workspace is a filesystem of the limit's size, so
each write fails with ENOSPC at the limit, the host repository grows by no more than the limit, and
nothing of the run (mounts, image files) is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent_sandbox.run import quota
from agent_sandbox.run.output import tree_size

from ..conftest import audit_events, labelled, tool_results

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

LIMIT_MB = 64


def du(path: Path) -> int:
    return tree_size(path)


@pytest.mark.skipif(quota.unavailable() is not None, reason=f"no filesystem quota here: {quota.unavailable()}")
def test_writes_stop_at_the_limit_and_the_host_stays_safe(make_repo, sandbox, write_script, tmp_path) -> None:
    repo = make_repo()
    git_before = du(repo / ".git")
    policy = tmp_path / "small-disk.yaml"
    policy.write_text(json.dumps({"limits": {"disk": f"{LIMIT_MB}m"}, "git": {"allow_binary": True}}))
    commands = [
        "fallocate -l 3G huge.bin; echo rc=$?",
        "dd if=/dev/urandom of=random.bin bs=1M count=600 status=none; echo rc=$?; du -m random.bin | cut -f1",
        "rm -f random.bin huge.bin; mkdir -p $(python3 -c \"print('/'.join(['d'] * 1100))\") && echo deep ok;"
        " df -m /workspace | tail -n 1 | awk '{print $2}'",
    ]
    script = write_script(
        "turns:\n" + "".join(f"  - bash: {json.dumps(c)}\n" for c in commands) + "  - text: I tried.\n"
    )
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "fill the disk",
        "--policy",
        str(policy),
        "--model-script",
        str(script),
        "--json",
    )
    assert res.stdout, res.stderr
    s = res.json()
    out = tool_results(s["run_dir"])
    # fallocate is refused outright; dd stops at the limit; the deep tree is just a deep tree.
    assert "No space left on device" in out[0] and "rc=1" in out[0], out[0]
    assert "No space left on device" in out[1] and "rc=1" in out[1], out[1]
    assert int(out[1].split()[-1]) <= LIMIT_MB, out[1]
    assert out[2].split()[0:2] == ["deep", "ok"] and int(out[2].split()[-1]) <= LIMIT_MB, out[2]
    (q,) = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "disk_quota"]
    assert q["mode"] == "filesystem" and q["bytes"] == LIMIT_MB * 1024**2
    # What came back is bounded by the limit, and so is what the host repository took in.
    assert du(repo / ".git") - git_before <= LIMIT_MB * 1024**2, "the host repository grew past the limit"
    # No mount, no image, no container is left of the run.
    mounts = Path("/proc/mounts").read_text()
    assert s["run_dir"] not in mounts
    assert not list(Path(s["run_dir"]).glob("*.img")) and not Path(s["run_dir"], "workspace").exists()
    assert labelled(s["id"]) == []
    assert res.code in (0, 10), res.stderr


def test_the_sampler_survives_a_deep_tree(tmp_path) -> None:
    # The fallback (no root, no loop devices) measures the tree; one deeper than a recursive walk survives,
    # and longer than PATH_MAX, must neither switch it off nor hide what lies at the bottom.
    fd = os.open(tmp_path, os.O_RDONLY)
    deep = tmp_path / "d"
    try:
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with os.fdopen(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(os.urandom(4 * 1024**2))
    finally:
        os.close(fd)
    try:
        assert tree_size(tmp_path) >= 4 * 1024**2
    finally:
        subprocess.run(["rm", "-rf", str(deep)], check=True)  # pytest's own cleanup recurses


def test_without_root_the_quota_is_sampled_and_says_why(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    q = quota.plan(tmp_path, 64 * 1024**2)
    assert q.mode == "sampled" and "root" in q.detail


@pytest.mark.skipif(quota.unavailable() is not None, reason=f"no filesystem quota here: {quota.unavailable()}")
def test_the_quota_never_exceeds_what_the_host_can_spare(tmp_path, monkeypatch) -> None:
    free = quota.shutil.disk_usage(tmp_path).free
    q = quota.plan(tmp_path, free * 2)
    assert q.mode == "filesystem" and q.size_bytes <= free - quota.HOST_RESERVE and "capped" in q.detail
    d = tmp_path / "ws"
    small = quota.Quota("filesystem", 64 * 1024**2)
    quota.mount(d, small)
    try:
        assert quota.is_mounted(d) and list(d.iterdir()) == []
        r = subprocess.run(["dd", "if=/dev/zero", f"of={d}/z", "bs=1M", "count=100"], capture_output=True, text=True)
        assert r.returncode != 0 and "No space left" in r.stderr
    finally:
        quota.release(d)
    assert not d.exists() and not quota.image_path(d).exists()
