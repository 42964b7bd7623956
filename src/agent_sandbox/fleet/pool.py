"""The warm pool's keeper: runs begun ahead of their tasks, so that a run starts with its networks and its
sidecar up (run/pool.py is the run's side).

A slot is a run id, its directory under the state directory's runs/ (with its lock, which the keeper holds:
`sandbox gc` takes a run whose lock is free for abandoned), the run's two networks and its sidecar, started
with its imports done and held for a configuration. Everything carries the run's labels, as a run's own
objects do. A run claims a slot over the keeper's socket (POOL_SOCKET, mode 0600, peers of the keeper's user
alone) and receives, with the slot, the descriptor holding its lock; the keeper then makes the next.

It runs as a process of its own under the warm daemon (cli/daemon.py), which restarts it should it die. On
SIGTERM it removes the slots nobody claimed. Killed, it leaves them to `sandbox gc` (their locks are free once
it is gone), and a held sidecar nobody configures ends by itself after HOLD_SECONDS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_sandbox import wire
from agent_sandbox.backend import Backend, RunHandle, connect
from agent_sandbox.backend.plan import ImageSet, Owner, Role, RunPlan, Workload
from agent_sandbox.config.policy import Policy, load_policy
from agent_sandbox.config.settings import load_settings
from agent_sandbox.paths import runs_dir, state_dir
from agent_sandbox.run import held_mounts
from agent_sandbox.run.liveness import HEARTBEAT_DIR, RunLock, state_id, supervisor_identity
from agent_sandbox.run.pool import POOL_SOCKET, Slot
from agent_sandbox.run.runner import new_run_id
from agent_sandbox.run.workloads import (
    HELD_INPUTS,
    SIDECAR_UID,
    Users,
    held_agent,
    held_finaliser,
    held_shape,
    held_sidecar,
)
from agent_sandbox.run.workspace import overlay_unavailable, release_run
from agent_sandbox.sidecar.contract import HELD_MARKER

log = logging.getLogger("agent_sandbox.pool")

HELD_WAIT = 60.0  # seconds a new sidecar has to finish its imports
HEALTH_EVERY = 10.0  # seconds between looks at the ready slots' sidecars
RETRY_AFTER = (1.0, 60.0)  # backoff after a slot could not be made: first, most
# Seconds after a claim before the next slot is made: its networks and sidecar would otherwise start alongside
# the claiming run's agent, on the same cores, just when that run's start is on its user's clock.
REFILL_AFTER = 3.0
AGENT_ATTEMPTS = 2  # slots in a row whose agent container failed before the keeper makes slots without one


@dataclass
class Ready:
    slot: Slot
    handle: RunHandle
    lock: RunLock


class Keeper:
    """Keeps `size` slots ready for runs with the default policy's sidecar host names."""

    def __init__(self, backend: Backend, images: ImageSet, size: int, policy: Policy | None = None) -> None:
        self.backend = backend
        self.images = images
        self.size = size
        self.policy = policy or Policy()
        self.hosts = self.policy.egress.hosts
        # The agent's container too, where a run's workspace can reach it after its start (an overlay, mounted
        # on a shared mount point: held_mounts.py).
        self.agents = overlay_unavailable() is None
        self.agent_failures = 0
        self.users = Users.here()
        self.engine = backend.engine_id()
        self.ready: list[Ready] = []
        self.made = 0
        self.claimed = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._last_claim = 0.0
        self.stop = threading.Event()
        self.parent: int | None = None  # the daemon's pid: the keeper stops once it is gone

    # Making and removing slots.

    def make(self) -> Ready:
        run_id = new_run_id()
        run_dir = runs_dir() / run_id
        run_dir.mkdir(parents=True)
        lock = RunLock(run_dir)
        lock.acquire()
        handle: RunHandle | None = None
        agent: dict[str, Any] = {}
        try:
            for sub in ("model", HEARTBEAT_DIR, HELD_INPUTS, "in"):
                (run_dir / sub).mkdir()
            for sub in (HELD_INPUTS, "in"):
                os.chmod(run_dir / sub, 0o755)  # their workloads' users read them, whatever the umask
            if self.users.chown:
                os.chown(run_dir / "model", SIDECAR_UID, SIDECAR_UID)
            handle = self.backend.open_run(
                RunPlan(
                    run_id=run_id, owner=Owner(state=state_id(run_dir.parent.parent), supervisor=supervisor_identity())
                )
            )
            networks = handle.prepare()
            starting = None
            if self.agents:
                (run_dir / "out").mkdir()
                if self.users.chown:
                    os.chown(run_dir / "out", *self.users.chown)
                # Their output is the claiming run's to follow (it attaches at adopt): streams attached here would
                # stay open in this long-lived process, two sockets a slot, never read.
                workloads = [
                    w.model_copy(update={"follow": False})
                    for w in (
                        held_agent(self.images, self.users, self.policy, run_id, run_dir),
                        held_finaliser(self.images, self.users, self.policy, run_id, run_dir),
                    )
                ]
                starting = threading.Thread(
                    target=self._start_held, args=(handle, run_dir, workloads, agent), daemon=True
                )
                starting.start()
            try:
                handle.start(held_sidecar(self.images.sidecar, self.users, run_dir, self.hosts))
            finally:
                if starting is not None:
                    starting.join()
            if "error" in agent:
                self._agent_failed(agent["error"])
                raise agent["error"]
            self.agent_failures = 0
            deadline = time.monotonic() + HELD_WAIT
            while not (run_dir / "model" / HELD_MARKER).exists():
                if time.monotonic() > deadline or not handle.status("sidecar").running:
                    raise RuntimeError("the held sidecar did not finish its start")
                time.sleep(0.05)
        except BaseException:
            self._remove(run_id, run_dir, handle, lock)
            raise
        slot = Slot(
            run_id=run_id,
            run_dir=str(run_dir),
            sidecar_image=self.images.sidecar,
            hosts=self.hosts,
            engine=self.engine,
            networks=networks,
            agent=held_shape(self.images, self.users, self.policy) if "agent" in agent else None,
            agent_started=agent["agent"].model_dump(mode="json") if "agent" in agent else None,
            finaliser_started=agent["finaliser"].model_dump(mode="json") if "finaliser" in agent else None,
        )
        self.made += 1
        log.info("pool_slot_ready run_id=%s", run_id)
        return Ready(slot, handle, lock)

    @staticmethod
    def _start_held(handle: RunHandle, run_dir: Path, workloads: list[Workload], box: dict[str, Any]) -> None:
        """The agent's container, started alongside the sidecar's (it waits for the sidecar's address), then
        confined, and the finaliser's; both held for their run."""
        try:
            held_mounts.make(run_dir)
            for workload in workloads:
                box[workload.role] = handle.start(workload, hold=True)
        except BaseException as exc:  # raised in make's thread
            box["error"] = exc

    def _agent_failed(self, error: BaseException) -> None:
        """A slot's agent container could not be made: twice in a row (mounts refused here, an engine whose
        containers do not receive this machine's mounts), and the slots go on without one (the runs start
        their own agent's container, as they did before)."""
        self.agent_failures += 1
        if self.agent_failures >= AGENT_ATTEMPTS:
            self.agents = False
            log.warning("pool_agents_off error=%r", error)

    def _remove(self, run_id: str, run_dir: Path, handle: RunHandle | None, lock: RunLock) -> None:
        try:
            # Its mount points first: they are this machine's, and must not wait on the engine.
            release_run(run_dir)
            (handle or self.backend.attach_run(run_id)).teardown()
            shutil.rmtree(run_dir, ignore_errors=True)
        except Exception as exc:  # gc's, once the lock below is free
            log.warning("pool_slot_not_removed run_id=%s error=%r", run_id, exc)
        finally:
            lock.release()

    def remove(self, ready: Ready) -> None:
        self._remove(ready.slot.run_id, Path(ready.slot.run_dir), ready.handle, ready.lock)
        log.info("pool_slot_removed run_id=%s", ready.slot.run_id)

    def fill(self) -> None:
        """Keeps the pool full (and its sidecars alive) until stopped: in its own thread."""
        backoff = RETRY_AFTER[0]
        last_health = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - last_health > HEALTH_EVERY:
                last_health = time.monotonic()
                self._drop_dead()
            with self._lock:
                missing = self.size - len(self.ready)
            if missing <= 0:
                self._wake.wait(HEALTH_EVERY)
                self._wake.clear()
                continue
            wait = self._last_claim + REFILL_AFTER - time.monotonic()
            if wait > 0:
                self.stop.wait(wait)
                continue
            try:
                made = self.make()
            except Exception as exc:
                log.warning("pool_slot_failed error=%r retry_s=%.0f", exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_AFTER[1])
                continue
            backoff = RETRY_AFTER[0]
            with self._lock:
                self.ready.append(made)
            if self.stop.is_set():
                break

    def _drop_dead(self) -> None:
        """Removes the ready slots whose sidecar ended (the engine restarted, say) or whose image is no longer the
        one runs ask for (the images were rebuilt): a slot nobody can claim is a slot too few."""
        try:
            current = self.backend.images()
        except Exception as exc:  # the engine away: the containers' own status below says more
            log.info("pool_images_unknown error=%r", exc)
            current = self.images
        if current != self.images:
            log.info("pool_image_changed old=%s new=%s", self.images, current)
            self.images = current
        shape = held_shape(current, self.users, self.policy)
        with self._lock:
            slots = list(self.ready)
        for ready in slots:
            try:
                alive = ready.slot.sidecar_image == current.sidecar and self._alive(ready)
                if ready.slot.agent is not None:
                    alive = alive and ready.slot.agent == shape
            except Exception:
                alive = False
            if not alive:
                with self._lock:
                    if ready in self.ready:
                        self.ready.remove(ready)
                log.info("pool_slot_dead run_id=%s", ready.slot.run_id)
                self.remove(ready)

    @staticmethod
    def _alive(ready: Ready) -> bool:
        """Whether its containers still hold (an engine restart, a hold that ran out, ends them)."""
        roles: tuple[Role, ...] = ("sidecar", "agent", "finaliser") if ready.slot.agent is not None else ("sidecar",)
        return all(ready.handle.status(role).running for role in roles)

    # Claims.

    def take(self, want: dict[str, Any]) -> Ready | None:
        """A ready slot that fits (same engine, sidecar image and host names) and whose sidecar still holds."""
        while True:
            with self._lock:
                fits = [
                    r
                    for r in self.ready
                    if r.slot.sidecar_image == want.get("sidecar_image")
                    and r.slot.hosts == want.get("hosts")
                    and r.slot.engine == want.get("engine")
                    and r.slot.agent == want.get("agent")
                ]
                if not fits:
                    return None
                ready = fits[0]
                self.ready.remove(ready)
                self._last_claim = time.monotonic()
            self._wake.set()
            try:
                if self._alive(ready):
                    return ready
            except Exception as exc:
                log.info("pool_slot_unusable run_id=%s error=%r", ready.slot.run_id, exc)
            self.remove(ready)

    def answer(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        if wire.peer_uid(conn) != os.getuid():
            log.warning("pool_refused reason=peer of another user")
            return
        request, fds = wire.receive(conn)
        for fd in fds:
            os.close(fd)
        if request is None:
            return
        if request.get("status"):
            with self._lock:
                count = len(self.ready)
            wire.send(conn, {"ready": count, "size": self.size, "made": self.made, "claimed": self.claimed})
            return
        want = request.get("claim")
        if not isinstance(want, dict):
            wire.send(conn, {"why": "not a claim"})
            return
        ready = self.take(want)
        if ready is None:
            wire.send(conn, {"why": "no ready slot fits"})
            return
        assert ready.lock._fd is not None
        try:
            wire.send(conn, {"slot": ready.slot.model_dump(mode="json")}, [ready.lock._fd])
        except OSError:
            self.remove(ready)  # whoever asked is gone: nobody took it
            raise
        # The run holds the lock now (the descriptor it received); this copy goes.
        ready.lock.release()
        self.claimed += 1
        log.info("pool_slot_claimed run_id=%s", ready.slot.run_id)

    def serve(self, path: Path) -> None:
        listener = wire.listen(path)
        listener.settimeout(0.5)
        filler = threading.Thread(target=self.fill, name="pool-fill", daemon=True)
        filler.start()
        try:
            while not self.stop.is_set():
                if self.parent is not None and os.getppid() != self.parent:
                    log.warning("pool_parent_gone parent=%d", self.parent)
                    break
                try:
                    conn, _ = listener.accept()
                except (TimeoutError, InterruptedError):
                    continue
                with conn:
                    try:
                        self.answer(conn)
                    except Exception as exc:  # whatever a request does, the keeper goes on serving
                        log.warning("pool_request_failed error=%r", exc)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            listener.close()
            self.stop.set()
            self._wake.set()
            filler.join(HELD_WAIT + 30)
            with self._lock:
                left, self.ready = self.ready, []
            for ready in left:
                self.remove(ready)
            log.info("pool_stopped made=%d claimed=%d", self.made, self.claimed)


def status(timeout: float = 1.0) -> dict[str, Any] | None:
    """The keeper's counts, or None when none answers."""
    try:
        return wire.request(state_dir() / POOL_SOCKET, {"status": True}, timeout)[0]
    except (OSError, ValueError):
        return None


def main(size: int, parent: int | None = None) -> int:
    """The keeper's process: until SIGTERM, or until `parent` (the daemon) is gone."""
    if parent is not None and os.getppid() != parent:
        return 0  # the daemon died before its death signal was asked for
    backend = connect(load_settings().backend)
    if backend.name != "docker":
        log.info("pool_off reason=backend %s keeps no pool", backend.name)
        return 0
    keeper = Keeper(backend, backend.images(), size, load_policy("default")[0])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: keeper.stop.set())
    log.info("pool_started pid=%d size=%d", os.getpid(), size)
    keeper.parent = parent
    keeper.serve(state_dir() / POOL_SOCKET)
    return 0
