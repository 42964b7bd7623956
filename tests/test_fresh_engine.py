"""The test helpers work on a brand-new Docker engine (issue 10).

A Docker engine started when its bridge interface does not exist yet (a machine's first start, as on CI)
reports only the Subnet of its default bridge, no Gateway; an engine started again reports both. These tests
start a second dockerd just for themselves, with its own data root, exec root, socket and bridge, and check
that `testhosts.bridge_gateway` finds the address `host-gateway` maps to in both states, and on the main
engine too. The second engine changes no firewall rules or sysctls (--iptables=false, --ip-forward=false),
uses a private /24 that no route of this machine overlaps, and is always torn down. Traffic goes only to
addresses of this machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from . import testhosts

pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("fresh-engine")]


def _run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 route (all tables) and interface network of this machine, the default route excepted."""
    taken = []
    for route in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        with contextlib.suppress(ValueError):
            if route.get("dst", "default") != "default":
                taken.append(ipaddress.IPv4Network(route["dst"], strict=False))
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.netmask:
                taken.append(ipaddress.IPv4Network(f"{a.address}/{a.netmask}", strict=False))
    return taken


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.100.0.0-10.254.255.255 (none of Docker's default pools) that nothing here overlaps."""
    taken = _taken_networks()
    rng = random.Random(secrets.randbits(64))
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randint(100, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise AssertionError(f"no free private /24 in 10.100-254.x.x: routes and addresses {taken}")


class FreshEngine:
    """A second dockerd with its own everything, on its own bridge, which it addresses itself."""

    def __init__(self, root: Path, bridge: str, subnet: ipaddress.IPv4Network) -> None:
        self.root, self.bridge, self.subnet = root, bridge, subnet
        self.sock = root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.log = root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "daemon.json").write_text("{}\n")  # not the main engine's /etc/docker/daemon.json

    def docker(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(*testhosts.docker_cli(self.host), *args, timeout=timeout, check=check)

    def start(self, timeout: float = 60) -> None:
        data = self.root / "data"
        cmd = [
            "dockerd",
            "--config-file",
            str(self.root / "daemon.json"),
            "--data-root",
            str(data),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "dockerd.pid"),
            "--host",
            self.host,
            "--bridge",
            self.bridge,
            # Leave the host's firewall and sysctls, which the main engine owns, alone.
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--storage-driver",
            "vfs",
        ]
        if not data.exists():
            # First start: the bridge has no address yet, so dockerd picks its subnet from this pool, as it
            # does for a docker0 it creates, and leaves the IPAM Gateway out, as on a fresh machine.
            # Never on a restart: a dockerd that finds its old default bridge network and has address pools
            # deletes the interface named docker0 (moby's removeDefaultBridgeInterface), the MAIN engine's.
            # Started again without pools, it reads the subnet and gateway from the bridge's address.
            cmd += ["--default-address-pool", f"base={self.subnet},size={self.subnet.prefixlen}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.docker("version", timeout=10, check=False).returncode != 0:
            if self.proc.poll() is not None:
                raise AssertionError(f"the fresh dockerd exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the fresh dockerd did not answer within {timeout}s:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop dockerd (SIGTERM, then SIGKILL), then whatever it started that is still there (its containerd,
        shims): the processes whose command line names this engine's directory. Every wait is bounded."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        left = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(self.root) in " ".join(p.info["cmdline"] or []):
                    p.kill()
                    left.append(p)
        psutil.wait_procs(left, timeout=10)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        return "(no log)"

    def bridge_network(self) -> dict[str, Any]:
        return testhosts.inspect_bridge(self.host)


def _mounts_under(root: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")  # octal escapes such as \040
        if point == str(root) or point.startswith(f"{root}/"):
            out.append(point)
    return sorted(out, key=len, reverse=True)


@pytest.fixture
def fresh_engine() -> Iterator[FreshEngine]:
    if os.geteuid() != 0:
        pytest.skip("starting a second dockerd and creating a bridge interface need root")
    for tool in ("dockerd", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"no `{tool}` on this machine: the Docker engine in use is not a local dockerd")
    main_bridge = _main_bridge()
    main_before = _ifindex(main_bridge)
    bridge = f"sbxfe{secrets.token_hex(4)}"  # at most 15 characters
    # Short paths: unix socket paths (dockerd's and its containerd's) are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="sbx-fe-", dir="/tmp" if Path("/tmp").is_dir() else None))
    engine: FreshEngine | None = None
    created = False
    try:
        engine = FreshEngine(root, bridge, free_subnet())
        _run("ip", "link", "add", bridge, "type", "bridge")
        created = True
        _run("ip", "link", "set", bridge, "up")
        engine.start()
        yield engine
    finally:
        try:
            if engine is not None:
                engine.stop()
        finally:
            for point in _mounts_under(root):  # dockerd makes its data root a shared bind mount
                _run("umount", "-l", point, timeout=30, check=False)
            if created:
                _run("ip", "link", "del", bridge, timeout=30, check=False)
            shutil.rmtree(root, ignore_errors=True)
    assert bridge not in psutil.net_if_addrs(), f"bridge {bridge} is still there"
    assert _ifindex(main_bridge) == main_before, f"the main engine's bridge {main_bridge} was removed or replaced"


def _main_bridge() -> str:
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        return testhosts.inspect_bridge()["Options"].get(testhosts.BRIDGE_NAME_OPTION) or "docker0"
    return "docker0"


def _ifindex(name: str) -> int | None:
    with contextlib.suppress(OSError):
        return socket.if_nametoindex(name)
    return None


def _connect(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=5):
        pass


def _no_proxy_get(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight there, whatever the env
    with opener.open(url, timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def base_image() -> str:
    """The project's base image on the main engine (the only image these tests use); missing is a failure."""
    from agent_sandbox.backend.images import BUILD_HINT, base_tag

    tag = base_tag()
    res = _run(*testhosts.docker_cli(), "image", "inspect", "--format", "{{.Id}}", tag, check=False)
    assert res.returncode == 0, f"{tag} is not built: {BUILD_HINT}"
    return tag


def _host_gateway_in_a_container(docker_cli: list[str], image: str) -> str:
    """What a container of this engine gets for `--add-host probe:host-gateway` (with no network at all)."""
    res = _run(
        *docker_cli,
        "run",
        "--rm",
        "--network",
        "none",
        "--add-host",
        "probe:host-gateway",
        image,
        "getent",
        "hosts",
        "probe",
        timeout=180,
    )
    return res.stdout.split()[0]


def test_fresh_engine_reports_no_gateway_and_the_helper_finds_it(fresh_engine: FreshEngine, tmp_path: Path) -> None:
    e = fresh_engine
    net = e.bridge_network()
    assert net["Options"][testhosts.BRIDGE_NAME_OPTION] == e.bridge
    # The state of issue 10: a Subnet and no Gateway.
    assert net["IPAM"]["Config"] == [{"Subnet": str(e.subnet)}], net["IPAM"]
    # dockerd gave the bridge the first address of the subnet: that is what host-gateway maps to.
    expected = str(next(e.subnet.hosts()))
    assert [str(a) for a in testhosts.interface_ipv4(e.bridge)] == [expected]
    assert testhosts.bridge_gateway(e.host) == expected

    # The test hosts listen on that address, and on no other (not on all interfaces).
    with contextlib.contextmanager(testhosts.start)(tmp_path, e.host) as hosts:
        assert hosts.address == expected
        assert _no_proxy_get(f"http://{expected}:{hosts.http_port}/fresh").startswith("hello from the test host")
        assert ("GET", f"{expected}:{hosts.http_port}", "/fresh") in hosts.requests
        with pytest.raises(ConnectionRefusedError):
            _connect("127.0.0.1", hosts.http_port)

    # Started again, the same engine reports the Gateway too; the helper's answer does not change.
    e.stop()
    e.start()
    net = e.bridge_network()
    assert net["IPAM"]["Config"] == [{"Subnet": str(e.subnet), "Gateway": expected}], net["IPAM"]
    assert testhosts.bridge_gateway(e.host) == expected


def test_helper_matches_host_gateway_in_a_container_on_a_fresh_engine(
    fresh_engine: FreshEngine, base_image: str
) -> None:
    image = base_image
    assert fresh_engine.bridge_network()["IPAM"]["Config"] == [{"Subnet": str(fresh_engine.subnet)}]
    # The fresh engine has no images: give it the base image from the main engine (no registry involved).
    save = subprocess.Popen([*testhosts.docker_cli(), "save", image], stdout=subprocess.PIPE)
    try:
        load = subprocess.run(
            [*testhosts.docker_cli(fresh_engine.host), "load"],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        assert save.stdout is not None
        save.stdout.close()
        try:
            save.wait(timeout=60)
        except subprocess.TimeoutExpired:
            save.kill()
            save.wait(timeout=10)
    assert save.returncode == 0 and load.returncode == 0, load.stderr
    got = _host_gateway_in_a_container(testhosts.docker_cli(fresh_engine.host), image)
    assert got == str(next(fresh_engine.subnet.hosts()))
    assert testhosts.bridge_gateway(fresh_engine.host) == got


def test_helper_matches_host_gateway_in_a_container_on_the_main_engine(base_image: str) -> None:
    got = _host_gateway_in_a_container(testhosts.docker_cli(), base_image)
    assert testhosts.bridge_gateway() == got
    assert got in testhosts.local_ipv4()
