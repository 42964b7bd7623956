"""Shared fixtures. Docker-bound tests use the real engine, real git and the real Claude Code CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SANDBOX = [sys.executable, "-m", "agent_sandbox.cli"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(d))
    return d


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """A fresh git repository with a few committed files."""

    def make(name: str = "repo", files: dict[str, str] | None = None) -> Path:
        repo = tmp_path / name
        repo.mkdir()
        git(repo, "init", "-q", "--initial-branch", "main")
        git(repo, "config", "user.name", "test user")
        git(repo, "config", "user.email", "test@example.invalid")
        for rel, content in (files or {"a.py": "x = 1\n", "README.md": "# test repo\n"}).items():
            p = repo / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "initial")
        return repo

    return make


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
def sandbox(state_dir: Path) -> Callable[..., CliResult]:
    """Run the real `sandbox` CLI in a subprocess (no terminal, like CI)."""

    def run(
        *args: str, env: dict[str, str] | None = None, timeout: float = 300, drop: tuple[str, ...] = ()
    ) -> CliResult:
        e = {**os.environ, "SANDBOX_STATE_DIR": str(state_dir), **(env or {})}
        for k in drop:
            e.pop(k, None)
        p = subprocess.run([*SANDBOX, *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=REPO_ROOT)
        return CliResult(p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "script.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


@pytest.fixture(scope="session")
def docker_ready() -> Iterator[None]:
    """The engine answers and the images are built; a test that needs them fails loudly otherwise."""
    from agent_sandbox.backend.docker import connect_client
    from agent_sandbox.backend.images import require_images

    require_images(connect_client())
    yield


def labelled(run_id: str) -> list[str]:
    """Containers and networks still labelled with this run id."""
    out = []
    for kind in ("ps -a", "network ls"):
        res = subprocess.run(
            ["docker", *kind.split(), "-q", "--filter", f"label=sandbox.run-id={run_id}"],
            capture_output=True,
            text=True,
            check=True,
        )
        out += res.stdout.split()
    return out


def transcript(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "model" / "transcript.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()]


def tool_results(run_dir: str | Path) -> list[str]:
    return [r["content"] for entry in transcript(run_dir) for r in entry.get("tool_results", [])]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole suite (on the xdist controller), nothing labelled may be left on the engine."""
    if hasattr(session.config, "workerinput"):
        return
    if "not docker" in (session.config.getoption("markexpr") or ""):
        return  # `make unit`: no test touched the engine, and other work on it is none of this run's business
    try:
        res = subprocess.run(
            ["docker", "ps", "-a", "--filter", "label=sandbox.run-id", "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        nets = subprocess.run(
            ["docker", "network", "ls", "--filter", "label=sandbox.run-id", "--format", "{{.Name}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    left = res.stdout.split() + nets.stdout.split()
    if res.returncode == 0 and left:
        sys.stderr.write(f"\nLEFT BEHIND by the test suite: {left}\n")
        session.exitstatus = 1


def start_run(state_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `sandbox` in the background (for tests that signal or kill it mid-run)."""
    e = {**os.environ, "SANDBOX_STATE_DIR": str(state_dir), **(env or {})}
    return subprocess.Popen(
        [*SANDBOX, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO_ROOT
    )


def wait_for_event(state_dir: Path, type_: str, timeout: float = 90) -> tuple[str, dict[str, Any]]:
    """Wait until the only run in state_dir has an audit event of this type; returns (run_id, event)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for audit in (state_dir / "runs").glob("*/audit.jsonl") if (state_dir / "runs").exists() else []:
            for line in audit.read_text().splitlines():
                event = json.loads(line)
                if event["type"] == type_:
                    return audit.parent.name, event
        time.sleep(0.1)
    raise AssertionError(f"no {type_} event within {timeout}s")


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, exited and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def audit_events(run_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "audit.jsonl").read_text().splitlines()]
