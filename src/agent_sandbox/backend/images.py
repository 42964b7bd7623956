"""Building the base, agent and sidecar images, each tagged by a hash of its inputs.

A tag names exactly one set of inputs, so "is the image built?" is a lookup, and a second build with
nothing changed costs a few hashes and lookups.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import docker
import docker.errors

from agent_sandbox.backend.plan import ImageSet, Progress
from agent_sandbox.config.policy import ImageExtension, Policy, ca_bundle
from agent_sandbox.errors import EnvironmentNotReady, SandboxError
from agent_sandbox.paths import cache_dir, package_dir, resource
from agent_sandbox.versions import BASE_IMAGE, BASE_SUITE, CLAUDE_AGENT_SDK_VERSION, CLAUDE_CODE_VERSION

log = logging.getLogger(__name__)


NAMESPACE_ENV = "SANDBOX_IMAGE_NAMESPACE"
LABEL_INPUTS = "sandbox.inputs-hash"
LABEL_CLAUDE = "sandbox.claude-code.version"
# The sidecar image copies one package (and the top-level __init__ it needs): less to rebuild when host-side
# code changes, and nothing of the host side inside it.
SIDECAR_MODULES = ("__init__.py", "sidecar/*.py")
SIDECAR_PYTHON = "3.11"  # Debian bookworm's python3, which the sidecar image runs on
BUILD_HINT = "build them with `sandbox images build` (or `make images`)"


def namespace() -> str:
    """Image repository prefix: `SANDBOX_IMAGE_NAMESPACE`, default agent-sandbox."""
    return os.environ.get(NAMESPACE_ENV) or "agent-sandbox"


def base_tag() -> str:
    return f"{namespace()}/base:{BASE_SUITE}"


def _nothing(_: str) -> None:
    pass


def _files(root: Path, patterns: Iterable[str]) -> list[Path]:
    out: set[Path] = set()
    for pat in patterns:
        out.update(p for p in root.glob(pat) if p.is_file() and "__pycache__" not in p.parts)
    return sorted(out)


def _hash(parts: Iterable[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def _agent_inputs() -> list[tuple[str, Path]]:
    images, sandbox = resource("images"), resource("sandbox")
    files = [("Dockerfile", images / "agent" / "Dockerfile")]
    files += [(f"sandbox/{p.relative_to(sandbox)}", p) for p in _files(sandbox, ["**/*"])]
    return files


def _sidecar_inputs() -> list[tuple[str, Path]]:
    images, pkg = resource("images"), package_dir()
    # The wheels are not hashed: they follow from requirements.txt, which is.
    files = [
        ("Dockerfile", images / "sidecar" / "Dockerfile"),
        ("requirements.txt", images / "sidecar" / "requirements.txt"),
    ]
    files += [(f"agent_sandbox/{p.relative_to(pkg)}", p) for p in _files(pkg, SIDECAR_MODULES)]
    return files


def _tag(repo: str, base_id: str, inputs: list[tuple[str, Path]], extra: str = "") -> str:
    digest = _hash(
        [("base", base_id.encode()), ("extra", extra.encode())] + [(name, p.read_bytes()) for name, p in inputs]
    )
    return f"{repo}:{digest[:16]}"


def _base_id(client: docker.DockerClient) -> str:
    """The id of the local base image; raises ImageNotFound when it is not there."""
    image_id = client.images.get(base_tag()).id
    if image_id is None:  # the engine gives every image an Id; the SDK's model just does not promise one
        raise docker.errors.ImageNotFound(f"{base_tag()} has no id")
    return image_id


def expected_tags(client: docker.DockerClient) -> ImageSet:
    """The tags that match the current inputs; raises EnvironmentNotReady if the base is missing."""
    try:
        base_id = _base_id(client)
    except docker.errors.ImageNotFound:
        raise EnvironmentNotReady(f"the base image {base_tag()} is not built", hint=BUILD_HINT) from None
    return ImageSet(
        agent=_tag(f"{namespace()}/agent", base_id, _agent_inputs(), CLAUDE_CODE_VERSION),
        sidecar=_tag(f"{namespace()}/sidecar", base_id, _sidecar_inputs()),
    )


def require_images(client: docker.DockerClient) -> ImageSet:
    """The run's images, or a clear error naming the missing ones and the command that builds them."""
    tags = expected_tags(client)
    missing = [tag for tag in (tags.agent, tags.sidecar) if not image_exists(client, tag)]
    if missing:
        raise EnvironmentNotReady("images not built: " + ", ".join(missing), hint=BUILD_HINT)
    return tags


# --- base image -------------------------------------------------------------------------------------------


def debian_mirror() -> str:
    """`SANDBOX_DEBIAN_MIRROR`, else the first Debian archive this host's apt is configured with."""
    if env := os.environ.get("SANDBOX_DEBIAN_MIRROR"):
        return env
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file() or path.suffix not in ("", ".list", ".sources"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", line)
            if m and "security" not in m.group(1) and m.group(1).rstrip("/").endswith("/debian"):
                return m.group(1)
    raise EnvironmentNotReady(
        "no registry answers and no Debian mirror is known for building a base image",
        hint="set SANDBOX_DEBIAN_MIRROR to a Debian archive URL",
    )


def ensure_base(client: docker.DockerClient, progress: Progress = _nothing) -> str:
    """The base image's id: already there, pulled, or bootstrapped with debootstrap when no registry answers."""
    try:
        return _base_id(client)
    except docker.errors.ImageNotFound:
        pass
    repo, _, tag = BASE_IMAGE.partition(":")
    try:
        progress(f"pulling {BASE_IMAGE}")
        image = client.images.pull(repo, tag=tag)
        image.tag(base_tag())
        log.info("base_image source=pull image=%s", BASE_IMAGE)
        return _base_id(client)
    except docker.errors.APIError as exc:
        log.info("base_image source=debootstrap reason=%r", str(exc).splitlines()[0][:200])
        progress(f"no registry answered ({_short(exc)}); building the base with debootstrap")
    mirror = debian_mirror()
    script = resource("images") / "base" / "bootstrap.sh"
    proc = subprocess.run(
        ["bash", str(script), base_tag(), BASE_SUITE, mirror, "sandbox.base.source=debootstrap"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise EnvironmentNotReady("debootstrap of the base image failed:\n" + proc.stderr[-2000:])
    return _base_id(client)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120]


# --- Claude Code binary -----------------------------------------------------------------------------------


def _wheel_platform(arch: str) -> str:
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    if arch not in ("x86_64", "aarch64"):
        raise EnvironmentNotReady(f"no Claude Code build for architecture {arch}")
    return f"manylinux_2_17_{arch}"


def claude_binary(arch: str | None = None, progress: Progress = _nothing) -> Path:
    """The pinned Claude Code CLI for `arch`, from the claude-agent-sdk wheel, cached per version."""
    plat = _wheel_platform(arch or platform.machine())
    dest = cache_dir() / "claude-code" / CLAUDE_CODE_VERSION / plat / "claude"
    if dest.is_file():
        return dest
    progress(f"fetching Claude Code {CLAUDE_CODE_VERSION} (claude-agent-sdk {CLAUDE_AGENT_SDK_VERSION})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            plat,
            f"claude-agent-sdk=={CLAUDE_AGENT_SDK_VERSION}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("claude_agent_sdk-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise EnvironmentNotReady("could not download claude-agent-sdk:\n" + proc.stderr[-1500:])
        with zipfile.ZipFile(wheels[0]) as zf:
            bundled = zf.read("claude_agent_sdk/_cli_version.py").decode()
            if f'"{CLAUDE_CODE_VERSION}"' not in bundled:
                raise SandboxError(
                    f"claude-agent-sdk {CLAUDE_AGENT_SDK_VERSION} does not bundle Claude Code "
                    f"{CLAUDE_CODE_VERSION}: {bundled.strip()}"
                )
            part = Path(tmp) / "claude.part"
            with zf.open("claude_agent_sdk/_bundled/claude") as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        part.chmod(0o755)
        part.replace(dest)
    return dest


def sidecar_wheels(arch: str | None = None, progress: Progress = _nothing) -> Path:
    """Wheels for the sidecar's requirements, for the image's Python, downloaded on the host and cached."""
    plat = _wheel_platform(arch or platform.machine()).replace("manylinux_2_17", "manylinux2014")
    req = resource("images") / "sidecar" / "requirements.txt"
    key = hashlib.sha256(req.read_bytes() + plat.encode() + SIDECAR_PYTHON.encode()).hexdigest()[:16]
    dest = cache_dir() / "wheels" / key
    if (dest / ".complete").is_file():
        return dest
    progress("fetching the sidecar's Python wheels")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{key}."))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--platform",
        plat,
        "--python-version",
        SIDECAR_PYTHON,
        "--implementation",
        "cp",
        "-r",
        str(req),
        "-d",
        str(tmp),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EnvironmentNotReady("could not download the sidecar's wheels:\n" + proc.stderr[-1500:])
    (tmp / ".complete").touch()
    try:
        tmp.rename(dest)
    except OSError:  # another build got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --- building ---------------------------------------------------------------------------------------------


def _build(
    client: docker.DockerClient,
    ctx: Path,
    tag: str,
    base: str,
    labels: dict[str, str],
    progress: Progress,
    buildargs: dict[str, str] | None = None,
) -> None:
    args = {"BASE": base, **(buildargs or {})}
    stream = client.api.build(
        path=str(ctx), tag=tag, buildargs=args, labels=labels, rm=True, forcerm=True, decode=True, pull=False
    )
    tail: list[str] = []
    for chunk in stream:
        if "error" in chunk:
            raise EnvironmentNotReady(
                f"building {tag} failed: {chunk['error'].strip()}\n" + "".join(tail[-15:]),
                hint="the build's output is above; for a policy's image, check its `image:` "
                "section (package names, setup commands)",
            )
        line = chunk.get("stream", "")
        if line.strip():
            tail.append(line)
            if line.startswith("Step "):
                progress(f"  {tag.split(':')[0]}: {line.strip()}")


def image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def build_all(client: docker.DockerClient, progress: Progress = _nothing, force: bool = False) -> ImageSet:
    """Build whatever is missing (or everything with force) and return the image set."""
    base_id = ensure_base(client, progress)
    tags = expected_tags(client)
    arch = client.info().get("Architecture", platform.machine())

    if force or not image_exists(client, tags.agent):
        progress(f"building {tags.agent}")
        binary = claude_binary(arch, progress)
        with tempfile.TemporaryDirectory(prefix="sandbox-agent-ctx-") as tmp:
            ctx = Path(tmp)
            for name, src in _agent_inputs():
                (ctx / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, ctx / name)
            try:
                os.link(binary, ctx / "claude")
            except OSError:
                shutil.copy2(binary, ctx / "claude")
            labels = {
                LABEL_INPUTS: tags.agent.split(":")[1],
                LABEL_CLAUDE: CLAUDE_CODE_VERSION,
                "sandbox.base-image": base_id,
            }
            _build(client, ctx, tags.agent, base_tag(), labels, progress)
        log.info("image_built role=agent tag=%s", tags.agent)
    else:
        progress(f"{tags.agent} is up to date")

    if force or not image_exists(client, tags.sidecar):
        progress(f"building {tags.sidecar}")
        with tempfile.TemporaryDirectory(prefix="sandbox-sidecar-ctx-") as tmp:
            ctx = Path(tmp)
            for name, src in _sidecar_inputs():
                (ctx / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, ctx / name)
            shutil.copytree(sidecar_wheels(arch, progress), ctx / "wheels")
            labels = {LABEL_INPUTS: tags.sidecar.split(":")[1], "sandbox.base-image": base_id}
            _build(client, ctx, tags.sidecar, base_tag(), labels, progress)
        log.info("image_built role=sidecar tag=%s", tags.sidecar)
    else:
        progress(f"{tags.sidecar} is up to date")
    return tags


# --- a policy's extension of the agent image --------------------------------------------------------------


def _extension_dockerfile(ext: ImageExtension, with_ca: bool) -> str:
    lines = ["ARG BASE", "FROM ${BASE}", "USER root", "ENV HOME=/root"]
    if with_ca:
        # Trusted system-wide, so that setup commands (pip, curl, npm) get through a TLS-inspecting proxy.
        lines += ["COPY ca/ /usr/local/share/ca-certificates/sandbox-policy/", "RUN update-ca-certificates >/dev/null"]
    if ext.packages:
        lines.append(
            "RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
            "--no-install-recommends " + " ".join(ext.packages) + " && rm -rf /var/lib/apt/lists/*"
        )
    # One RUN per command: a failing build names the command, and each is its own cached layer.
    lines += [f"RUN {json.dumps(['/bin/bash', '-euo', 'pipefail', '-c', cmd])}" for cmd in ext.setup]
    lines += ["ENV HOME=/home/agent", "USER agent", ""]
    return "\n".join(lines)


def extended_tag(agent_tag: str, ext: ImageExtension, ca_pem: str) -> str:
    digest = _hash(
        [
            ("agent", agent_tag.encode()),
            ("dockerfile", _extension_dockerfile(ext, bool(ca_pem)).encode()),
            ("ca", ca_pem.encode()),
        ]
    )
    return f"{namespace()}/agent-custom:{digest[:16]}"


def ensure_policy_image(
    client: docker.DockerClient, images: ImageSet, policy: Policy, progress: Progress = _nothing
) -> ImageSet:
    """The image set for a policy: the agent image itself, or the policy's extension of it, built on first
    use and cached by a hash of its inputs. Concurrent runs of one policy build it once (a file lock)."""
    ext = policy.image
    if ext.empty:
        return images
    ca_pem = ca_bundle(policy)
    tag = extended_tag(images.agent, ext, ca_pem)
    lock_path = cache_dir() / "locks" / (tag.replace("/", "_").replace(":", "_") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not image_exists(client, tag):
            progress(
                f"building {tag}: the policy's image ({len(ext.packages)} package(s), "
                f"{len(ext.setup)} setup command(s))"
            )
            with tempfile.TemporaryDirectory(prefix="sandbox-custom-ctx-") as tmp:
                ctx = Path(tmp)
                (ctx / "Dockerfile").write_text(_extension_dockerfile(ext, bool(ca_pem)))
                if ca_pem:
                    (ctx / "ca").mkdir()
                    (ctx / "ca" / "policy.crt").write_text(ca_pem)
                labels = {LABEL_INPUTS: tag.split(":")[1], "sandbox.extends": images.agent}
                _build(client, ctx, tag, images.agent, labels, progress)
            log.info("image_built role=agent-custom tag=%s extends=%s", tag, images.agent)
    return ImageSet(agent=tag, sidecar=images.sidecar, claude_code_version=images.claude_code_version)
