"""Entry point of the sidecar container: `python -m agent_sandbox.sidecar`.

Its ports open first, before the heavy imports (aiohttp, pydantic: a fifth of a second on a small machine),
and a `listening` line says so: the supervisor gives the agent its go-ahead on that, so Claude Code's start
overlaps the rest of the sidecar's. Connections that come early wait in the ports' backlogs until the gateway
and the proxy serve them, under the run's rules; `ready` follows once they do.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent_sandbox.sidecar.contract import (
    CONFIG_ENV,
    EXIT_UNCLAIMED,
    GATEWAY_PORT,
    HELD_CONFIG,
    HELD_DIR_ENV,
    HELD_KEY,
    HELD_MARKER,
    HELD_OUT_ENV,
    HOLD_SECONDS,
    KEY_ENV,
    KEY_FILE_ENV,
    PROXY_PORT,
)

if TYPE_CHECKING:
    import asyncio

    from agent_sandbox.sidecar.gateway import Gateway

LISTEN_BACKLOG = 512  # connections the ports hold before the servers take them (Claude Code opens a handful)
EVENTS_EGRESS_LIMIT = 64 * 1024**2  # bytes of egress decision lines the events file keeps; model calls: all


def make_emitter(run_id: str, events_path: str | None = None) -> Callable[[dict[str, Any]], None]:
    """Each event as one numbered JSON line on stdout (the supervisor reads it live) and, with events_path, in
    a file only the sidecar writes: should the supervisor die, its recovery reads that file for the lines past
    the last it recorded, by number. Docker's log of stdout rotates, and a flood of connections could push
    the model calls out of it; the file keeps every model call, and egress lines up to EVENTS_EGRESS_LIMIT."""
    count = itertools.count(1)
    sink = open(events_path, "a", encoding="utf-8") if events_path else None  # noqa: SIM115 - lives as long as the sidecar
    egress_bytes = 0

    def emit(event: dict[str, Any]) -> None:
        nonlocal egress_bytes
        text = (
            json.dumps({"time": time.time(), "run_id": run_id, "n": next(count), **event}, separators=(",", ":")) + "\n"
        )
        sys.stdout.write(text)
        sys.stdout.flush()
        if sink is not None:
            if event.get("event") == "egress":
                egress_bytes += len(text)
                if egress_bytes > EVENTS_EGRESS_LIMIT:
                    return  # its number is skipped: recovery counts the gap
            try:
                sink.write(text)
                sink.flush()
            except OSError:
                pass  # a full disk: stdout still has it, and the supervisor, if alive, records it

    return emit


SETTLE_WAIT = 2.0  # seconds a settle request waits for the model calls in flight to end


async def settle_on_request(
    gateway: Gateway, emit: Callable[[dict[str, Any]], None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The supervisor's request to settle (one line: its token), once the agent has ended: wait for the calls in
    flight, then emit `settled` with the token. On stdout that line comes after every model call line before
    it, so the supervisor, reading up to it, has the gateway's whole record without waiting for silence."""
    import asyncio

    from agent_sandbox.sidecar.events import GatewaySettled, to_line

    try:
        raw = await asyncio.wait_for(reader.readline(), 5)
        token = raw.decode("ascii", errors="replace").strip()[:64]
        if token:
            inflight = await gateway.quiet(SETTLE_WAIT)
            emit(to_line(GatewaySettled(token=token, inflight=inflight, calls=gateway.calls)))
            writer.write(b"ok\n")
            await writer.drain()
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


def upstream_key(environ: dict[str, str] | None = None) -> str | None:
    """The model key: from KEY_ENV (removed from the environment once read), else from the file KEY_FILE_ENV
    names (a mounted Secret), stripped of surrounding whitespace. None without either; a named file that cannot
    be read stops the sidecar (a run without its key would fail every call, later and less clearly)."""
    env = os.environ if environ is None else environ
    key = env.pop(KEY_ENV, None) or None
    if key:
        return key
    path = env.get(KEY_FILE_ENV)
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read(64 * 1024).strip() or None


def listen(port: int) -> socket.socket:
    """A listening TCP socket on every IPv4 address of the container."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def open_ports(raw: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> tuple[socket.socket, socket.socket]:
    """Listen on the gateway's and the proxy's ports and say so (the `listening` line: SidecarListening in
    events.py, written by hand here because pydantic is not imported yet)."""
    gateway_port, proxy_port = int(raw.get("gateway_port", GATEWAY_PORT)), int(raw.get("proxy_port", PROXY_PORT))
    socks = listen(gateway_port), listen(proxy_port)
    emit({"event": "listening", "gateway_port": gateway_port, "proxy_port": proxy_port})
    return socks


HELD_POLL = 0.005  # seconds between looks for the configuration of a held sidecar: on the run's critical path


def hold(directory: str, out: str | None, seconds: float = HOLD_SECONDS) -> None:
    """A sidecar made ahead (contract.py): its imports now, then its configuration and key when they come, into
    the environment where the rest reads them. Exits EXIT_UNCLAIMED when none comes in `seconds`."""
    import aiohttp.web  # noqa: F401 - imported ahead: the point of holding

    import agent_sandbox.sidecar.gateway
    import agent_sandbox.sidecar.proxy
    import agent_sandbox.sidecar.scripted_model
    import agent_sandbox.sidecar.watchdog  # noqa: F401

    if out:
        with open(os.path.join(out, HELD_MARKER), "w") as f:
            f.write(f"{os.getpid()}\n")
    config = os.path.join(directory, HELD_CONFIG)
    end = time.monotonic() + seconds
    while not os.path.exists(config):
        if time.monotonic() > end:
            sys.stderr.write(f"sidecar: held for {seconds:g}s and never given a run; ending\n")
            sys.exit(EXIT_UNCLAIMED)
        time.sleep(HELD_POLL)
    with open(config, encoding="utf-8") as f:
        os.environ[CONFIG_ENV] = f.read()
    os.environ[KEY_FILE_ENV] = os.path.join(directory, HELD_KEY)


def main() -> None:
    if held := os.environ.get(HELD_DIR_ENV):
        hold(held, os.environ.get(HELD_OUT_ENV))
    raw = json.loads(os.environ[CONFIG_ENV])
    emit = make_emitter(str(raw["run_id"]), raw.get("events_path"))
    gateway_sock, proxy_sock = open_ports(raw, emit)

    import asyncio

    asyncio.run(serve(emit, gateway_sock, proxy_sock))


async def serve(emit: Callable[[dict[str, Any]], None], gateway_sock: socket.socket, proxy_sock: socket.socket) -> None:
    import asyncio
    import signal
    from pathlib import Path

    from aiohttp import web

    from agent_sandbox.sidecar.config import SCRIPTED_MODEL_PORT, SidecarConfig
    from agent_sandbox.sidecar.events import SidecarReady, SidecarStopped, to_line
    from agent_sandbox.sidecar.gateway import Gateway
    from agent_sandbox.sidecar.proxy import RELAY_CHUNK, EgressProxy
    from agent_sandbox.sidecar.watchdog import Watchdog

    config = SidecarConfig.model_validate_json(os.environ[CONFIG_ENV])
    api_key = upstream_key()
    upstream = config.upstream_url
    runners: list[web.AppRunner] = []
    watchdog = Watchdog(emit, config.heartbeat_path, config.heartbeat_timeout_s, config.deadline_s)

    if config.script_path:
        from agent_sandbox.sidecar.script import load_script
        from agent_sandbox.sidecar.scripted_model import ScriptedModel
        from agent_sandbox.sidecar.scripted_model import serve as serve_model

        model = ScriptedModel(
            load_script(config.script_path), Path(config.transcript_path) if config.transcript_path else None
        )
        runners.append(await serve_model(model, "127.0.0.1", SCRIPTED_MODEL_PORT))
        upstream = f"http://127.0.0.1:{SCRIPTED_MODEL_PORT}"

    gateway = Gateway(
        config.run_id,
        upstream,
        api_key,
        config.budget_usd,
        config.prices,
        emit,
        extra_ca_pem=config.extra_ca_pem,
        server_tools=config.server_tools,
        egress_allow=config.egress.allow,
        egress_deny=config.egress.deny,
        broker_socket=config.broker_socket,
        watchdog=watchdog,
    )
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    await web.SockSite(runner, gateway_sock).start()
    runners.append(runner)
    eg = config.egress
    proxy = EgressProxy(
        config.run_id,
        eg.allow,
        eg.deny,
        eg.mode,
        eg.allow_private,
        config.own_addresses,
        (config.gateway_name, config.gateway_port),
        emit,
        allow_addresses=eg.allow_addresses,
        watchdog=watchdog,
    )
    proxy_server = await asyncio.start_server(proxy.handle, sock=proxy_sock, limit=RELAY_CHUNK)
    control = None
    if config.control_socket:
        control = await asyncio.start_unix_server(
            lambda reader, writer: settle_on_request(gateway, emit, reader, writer), path=config.control_socket
        )
    emit(
        to_line(
            SidecarReady(
                gateway_port=config.gateway_port,
                proxy_port=config.proxy_port,
                egress_mode=eg.mode,
                allow=eg.allow,
                deny=eg.deny,
                allow_private=eg.allow_private,
                allow_addresses=eg.allow_addresses,
                upstream="scripted" if config.script_path else upstream,
                key_present=bool(api_key),
            )
        )
    )

    watching = asyncio.create_task(watchdog.run())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watching.cancel()
    proxy_server.close()
    if control is not None:
        control.close()
    for r in reversed(runners):
        await r.cleanup()
    emit(to_line(SidecarStopped(spent_usd=round(gateway.spent_usd, 6), calls=gateway.calls)))


if __name__ == "__main__":
    main()
