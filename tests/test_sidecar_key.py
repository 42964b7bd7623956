"""Where the sidecar takes the model key from (sidecar/__main__.py upstream_key): the variable Docker sets (read
once and removed from its environment), else the file a Kubernetes Secret mounts (docs/kubernetes.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_sandbox.sidecar.__main__ import upstream_key
from agent_sandbox.sidecar.config import KEY_ENV, KEY_FILE_ENV


def test_the_variable_wins_and_is_removed_once_read(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file")
    env = {KEY_ENV: "sk-from-env", KEY_FILE_ENV: str(key_file), "OTHER": "x"}
    assert upstream_key(env) == "sk-from-env"
    # Gone from the environment: nothing the sidecar starts later inherits it.
    assert env == {KEY_FILE_ENV: str(key_file), "OTHER": "x"}


def test_an_empty_variable_is_no_key_and_the_file_is_read_instead(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file")
    env = {KEY_ENV: "", KEY_FILE_ENV: str(key_file)}
    assert upstream_key(env) == "sk-from-file"
    assert KEY_ENV not in env


def test_the_mounted_file_is_read_and_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "SANDBOX_UPSTREAM_API_KEY"
    key_file.write_text("  sk-ant-secret\n\n")
    assert upstream_key({KEY_FILE_ENV: str(key_file)}) == "sk-ant-secret"
    key_file.write_text("\n")
    assert upstream_key({KEY_FILE_ENV: str(key_file)}) is None  # an empty Secret is no key


def test_without_either_there_is_no_key() -> None:
    assert upstream_key({}) is None
    assert upstream_key({KEY_FILE_ENV: ""}) is None


def test_a_named_file_that_cannot_be_read_stops_the_sidecar(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        upstream_key({KEY_FILE_ENV: str(tmp_path / "missing")})
    with pytest.raises(IsADirectoryError):
        upstream_key({KEY_FILE_ENV: str(tmp_path)})


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv(KEY_ENV, "sk-process")
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert upstream_key() == "sk-process"
    assert KEY_ENV not in os.environ
