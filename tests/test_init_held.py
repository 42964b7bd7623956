"""The agent container's PID 1 (sandbox/init.py) held for its run, as the warm pool's agent containers are:
it runs nothing before the run's start file, takes the run's arguments, environment, directory and deadline
from it, refuses a start whose mounts did not arrive, and ends by itself when nobody starts it.

Each runs as PID 1 of a PID namespace of its own, as in its container: at its deadline it signals every process
it can (kill -1), which anywhere else would be every process of the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

INIT = Path(__file__).resolve().parents[1] / "sandbox" / "init.py"
UNSHARE = shutil.which("unshare")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or UNSHARE is None, reason="needs root and unshare(1) for a PID namespace of its own"
)


def held(tmp: Path, hold_s: float, *command: str) -> subprocess.Popen[str]:
    assert UNSHARE is not None
    return subprocess.Popen(
        [
            UNSHARE,
            "--pid",
            "--fork",
            "--kill-child",
            sys.executable,
            "-I",
            str(INIT),
            "--held",
            str(hold_s),
            str(tmp / "start"),
            *command,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
    )


def give(tmp: Path, start: dict[str, object]) -> None:
    (tmp / "start.part").write_text(json.dumps(start))
    (tmp / "start.part").rename(tmp / "start")


def started_marker(tmp: Path) -> list[str]:
    return [
        "sh",
        "-c",
        f'echo ran > {tmp / "ran"}; echo "$@"; echo "$GIT_AUTHOR_NAME $SANDBOX_DEADLINE_SECONDS"; pwd',
        "sh",
    ]


def test_nothing_runs_before_the_start_and_the_start_brings_the_run(tmp_path: Path) -> None:
    workdir = tmp_path / "workspace"
    workdir.mkdir()
    proc = held(tmp_path, 30, *started_marker(tmp_path))
    time.sleep(0.5)
    assert proc.poll() is None and not (tmp_path / "ran").exists()
    give(
        tmp_path,
        {
            "deadline_s": 60,
            "args": ["-p", "two words"],
            "env": {"GIT_AUTHOR_NAME": "Bot"},
            "cwd": str(workdir),
            "require": [str(workdir)],
        },
    )
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["-p two words", "Bot 60", str(workdir)]


def test_a_start_whose_mounts_did_not_arrive_runs_nothing(tmp_path: Path) -> None:
    proc = held(tmp_path, 30, *started_marker(tmp_path))
    give(tmp_path, {"deadline_s": 60, "args": [], "env": {}, "require": [str(tmp_path / "workspace" / ".git")]})
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 65 and "did not reach the container" in err, err
    assert not (tmp_path / "ran").exists()


def test_bad_starts_are_refused(tmp_path: Path) -> None:
    for start in (
        '["not", "an", "object"]',
        '{"deadline_s": 0}',
        '{"deadline_s": 5, "env": {"A=B": "x"}}',
        '{"deadline_s": 5, "args": [1]}',
        "{not json",
    ):
        (tmp_path / "ran").unlink(missing_ok=True)
        (tmp_path / "start").unlink(missing_ok=True)
        proc = held(tmp_path, 30, *started_marker(tmp_path))
        (tmp_path / "start.part").write_text(start)
        (tmp_path / "start.part").rename(tmp_path / "start")
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 65 and "unusable" in err, (start, err)
        assert not (tmp_path / "ran").exists(), start


def test_the_deadline_counts_from_the_start_not_from_the_hold(tmp_path: Path) -> None:
    proc = held(tmp_path, 30, "sh", "-c", 'echo started; exec python3 -c "import time; time.sleep(60)"')
    time.sleep(2.5)  # held longer than the run's deadline below
    give(tmp_path, {"deadline_s": 1})
    out, err = proc.communicate(timeout=30)
    # It ran (its deadline had not passed at its start), then the deadline ended it.
    assert out.splitlines() == ["started"] and proc.returncode == 124, (out, err)
    assert "deadline of 1s has passed" in err


def test_unclaimed_it_ends_by_itself_and_a_signal_ends_the_hold(tmp_path: Path) -> None:
    proc = held(tmp_path, 1, *started_marker(tmp_path))
    assert proc.wait(timeout=20) == 75
    proc = held(tmp_path, 60, *started_marker(tmp_path))
    time.sleep(0.5)
    # To init itself (the namespace's PID 1, unshare's child), as `docker stop` sends it.
    (child,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(child), signal.SIGTERM)
    assert proc.wait(timeout=20) == 75
    assert not (tmp_path / "ran").exists()
