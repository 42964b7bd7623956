"""A container's resource figures read from its cgroup's own files (backend/docker.py, cgroup_figures): cgroup
v2's and v1's, a missing peak, and a cgroup that is gone. The files are written here as the kernel lays them
out; that the live path reads a real container's cgroup is what every run's `resource_usage` shows
(tests/test_audit_e2e.py)."""

from __future__ import annotations

from pathlib import Path

from agent_sandbox.backend.docker import cgroup_figures


def write(root: Path, files: dict[str, str]) -> list[Path]:
    out = []
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if text:
            p.write_text(text)
        out.append(p)
    return out


def test_cgroup_v2_figures(tmp_path: Path) -> None:
    files = write(
        tmp_path,
        {
            "memory.current": "1048576\n",
            "memory.peak": "8388608\n",
            "cpu.stat": "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
            "pids.current": "7\n",
        },
    )
    assert cgroup_figures(files) == {"memory": 1048576, "peak_memory": 8388608, "cpu_ns": 2_500_000, "pids": 7}


def test_cgroup_v1_figures_and_a_missing_peak(tmp_path: Path) -> None:
    files = write(
        tmp_path,
        {
            "memory/memory.usage_in_bytes": "4096\n",
            "memory/memory.max_usage_in_bytes": "",  # not there: the current figure stands for the peak
            "cpuacct/cpuacct.usage": "123456789\n",
            "pids/pids.current": "3\n",
        },
    )
    assert cgroup_figures(files) == {"memory": 4096, "peak_memory": 4096, "cpu_ns": 123456789, "pids": 3}


def test_a_cgroup_that_is_gone_ends_the_samples(tmp_path: Path) -> None:
    files = write(
        tmp_path, {"memory.current": "1\n", "memory.peak": "1\n", "cpu.stat": "usage_usec 1\n", "pids.current": "1\n"}
    )
    files[0].unlink()
    assert cgroup_figures(files) is None
    (tmp_path / "memory.current").write_text("1\n")
    files[2].write_text("user_usec 1\n")  # no usage line: not a figure to trust
    assert cgroup_figures(files) is None
