"""A run's side of the warm pool (fleet/pool.py keeps it): a slot made ahead, claimed, and its sidecar configured.

A slot is a run begun ahead of its task: a run id, its directory (whose lock the keeper holds, so `sandbox gc`
leaves it be), its two networks and its sidecar, started with its imports done and waiting for a configuration
(sidecar/contract.py, HELD_*). A run claims one over the keeper's socket in the state directory and gets, with
the slot, the descriptor that holds the run's lock: from then on it is the run's supervisor, exactly as if it had
made all of it, and it tears everything down at its end as usual. Any failure to claim leaves the run to make
its own: the pool only ever saves time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from agent_sandbox import wire
from agent_sandbox.paths import state_dir
from agent_sandbox.run.workloads import HELD_INPUTS
from agent_sandbox.sidecar.contract import HELD_CONFIG, HELD_KEY

log = logging.getLogger(__name__)

POOL_SOCKET = "pool.sock"
CLAIM_TIMEOUT = 2.0
SCRIPT_NAME = "script.yaml"  # the model script, copied into the held sidecar's inputs


class Slot(BaseModel):
    """A run begun ahead of its task: what the run that claims it takes over."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    run_id: str
    """The run's id, chosen when the slot was made: its directory, networks and sidecar carry it."""
    run_dir: str
    """The run's directory (under the state directory's runs/)."""
    sidecar_image: str
    """The sidecar image it was started from."""
    hosts: dict[str, str]
    """The extra host names the sidecar was made with (a policy's egress.hosts)."""
    engine: str
    """The engine it was made on (Backend.engine_id): a run through another engine cannot take it over."""
    networks: list[dict[str, Any]]
    """What the backend's `prepare` made, as the run's trail records it."""
    agent: dict[str, Any] | None = None
    """The agent's and the finaliser's containers made ahead, held, as workloads.held_shape describes them
    (None: none made; the run starts its own)."""
    agent_started: dict[str, Any] | None = None
    """What the held agent's start put on record (backend Started: its security settings and confinement)."""
    finaliser_started: dict[str, Any] | None = None
    """What the held finaliser's start put on record."""


@dataclass
class Claimed:
    """A slot and the descriptor holding its run's lock, now the claiming run's."""

    slot: Slot
    lock_fd: int


def socket_path() -> Path:
    return state_dir() / POOL_SOCKET


def available() -> bool:
    """Whether a keeper may be there to ask (its socket exists) and this process may take a slot."""
    return os.environ.get(wire.DAEMON_ENV) != "off" and socket_path().exists()


def claim(sidecar_image: str, hosts: dict[str, str], engine: str, agent: dict[str, Any] | None) -> Claimed | None:
    """A slot made on this engine for this sidecar image and these host names, with a held agent of this shape
    (or none), or None (no keeper, none ready, any failure)."""
    if not available():
        return None
    fds: list[int] = []
    try:
        want = {"claim": {"sidecar_image": sidecar_image, "hosts": hosts, "engine": engine, "agent": agent}}
        answer, fds = wire.request(socket_path(), want, CLAIM_TIMEOUT, max_fds=1)
        if answer is None or "slot" not in answer or len(fds) != 1:
            log.info("pool_claim_none reason=%s", (answer or {}).get("why", "no answer"))
            for fd in fds:
                os.close(fd)
            return None
        slot = Slot.model_validate(answer["slot"])
    except Exception as exc:  # the pool saves time, nothing more: the run makes its own
        log.info("pool_claim_failed error=%r", exc)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None
    log.info("pool_claimed run_id=%s", slot.run_id)
    return Claimed(slot, fds[0])


def configure(run_dir: Path, config_json: str, api_key: str | None, owner: tuple[int, int] | None) -> None:
    """Give the held sidecar its key, then its configuration (renamed into place whole: it starts on that)."""
    inputs = run_dir / HELD_INPUTS
    key = inputs / HELD_KEY
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, (api_key or "").encode())
    finally:
        os.close(fd)
    part = inputs / f"{HELD_CONFIG}.part"
    part.write_text(config_json)
    os.chmod(part, 0o644)  # whatever the supervisor's umask: the sidecar's user reads it
    os.replace(part, inputs / HELD_CONFIG)


def copy_script(run_dir: Path, script: str) -> str:
    """The model script, copied where the held sidecar reads its inputs; its name there."""
    dest = run_dir / HELD_INPUTS / SCRIPT_NAME
    shutil.copyfile(script, dest)
    os.chmod(dest, 0o644)
    return SCRIPT_NAME


def start_held(run_dir: Path, name: str, start: dict[str, Any]) -> None:
    """A held container's start (workloads.Recipes.agent_start, finaliser_start) in the run's inputs, renamed
    into place whole: it starts on it (the agent's init.py), or reads it at its go-ahead (finalize.sh)."""
    part = run_dir / "in" / f"{name}.part"
    part.write_text(json.dumps(start))
    os.chmod(part, 0o644)  # the workload's user reads it, whatever the supervisor's umask
    os.replace(part, run_dir / "in" / name)


def forget_key(run_dir: Path) -> None:
    """The key's file goes with the run: the run's directory stays, for its records."""
    (run_dir / HELD_INPUTS / HELD_KEY).unlink(missing_ok=True)
