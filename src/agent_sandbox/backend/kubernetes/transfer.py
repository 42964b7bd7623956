"""Files between the supervisor's machine and a pod, as tar streams through the API server's `exec`: the inputs
a workload mounts go in before it runs, its outputs come back when it ends. No host path reaches a node.

What comes back was written inside the sandbox, so it is unpacked as untrusted: regular files and directories
only (no links, devices or fifos), every path inside the destination, and no more than a set number of bytes.
"""

from __future__ import annotations

import io
import os
import shlex
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from agent_sandbox.backend.kubernetes.manifests import CLAIM_VOLUME, FETCHED, STAGED, TRANSFER, Volume, transfer_path

UPLOADED = ".uploaded-"
"""Beside a volume's directory on the run's claim, `<UPLOADED><key>` says its upload completed: it comes last in
the tar stream. A run taken over (recovery) keeps only what is complete (claim_resume_command)."""


def _relative(v: Volume) -> str:
    return transfer_path(v)[len(TRANSFER) + 1 :]


def pack_inputs(vols: Iterable[Volume], into: IO[bytes]) -> int:
    """Write a tar of the volumes' host content into `into`, each under its path below TRANSFER, and after all
    of it the markers of the volumes on the claim (UPLOADED); returns the number of bytes written. Sockets (a
    Unix socket cannot cross machines) are left out."""
    start = into.tell()
    vols = list(vols)
    with tarfile.open(fileobj=into, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for v in vols:
            arc = _relative(v)
            if v.on_claim:
                # A directory on the claim is made here, by the workload's user; an emptyDir exists already, and
                # is not this user's to change the mode of.
                tar.addfile(_dir_entry(arc))
            if v.file:
                tar.add(v.source, arcname=f"{arc}/{Path(v.source).name}", recursive=False)
                continue
            for child in sorted(Path(v.source).iterdir()):
                tar.add(str(child), arcname=f"{arc}/{child.name}", filter=_no_sockets)
        for v in vols:
            if v.on_claim:
                marker = tarfile.TarInfo(f"{CLAIM_VOLUME}/{UPLOADED}{v.key}")
                marker.mode = 0o644
                tar.addfile(marker, io.BytesIO(b""))
    into.flush()
    return into.tell() - start


def _dir_entry(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _no_sockets(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return info if info.isfile() or info.isdir() or info.issym() else None


def upload_command(size: int) -> list[str]:
    """Unpack exactly `size` bytes of stdin below TRANSFER (the exec protocol cannot always close stdin)."""
    return ["sh", "-c", f"head -c {int(size)} | tar -x -m -o --no-same-permissions -f - -C {TRANSFER}"]


def download_command(vols: Iterable[Volume]) -> list[str]:
    """A tar of the volumes' content on stdout, each under its path below TRANSFER."""
    paths = " ".join(shlex.quote(_relative(v)) for v in vols)
    return ["sh", "-c", f"cd {TRANSFER} && tar -c -f - {paths}"]


def claim_resume_command(keep: Iterable[str], replace: Iterable[str]) -> list[str]:
    """On a run's claim that an earlier process's workloads used (recovery): print each volume of `keep` whose
    upload completed, remove the rest of `keep` (half uploaded: its upload starts again) and every volume of
    `replace` with its marker (what the supervisor's copy replaces)."""
    script = [f"cd {TRANSFER}/{CLAIM_VOLUME}"]
    for key in keep:
        k = shlex.quote(key)
        marker = shlex.quote(UPLOADED + key)
        script.append(f"if [ -e {marker} ]; then echo {k}; else rm -rf -- {k}; fi")
    for key in replace:
        script.append(f"rm -rf -- {shlex.quote(key)} {shlex.quote(UPLOADED + key)}")
    return ["sh", "-c", " && ".join(script)]


def touch_command(*paths: str) -> list[str]:
    """Create marker files (the go-ahead, STAGED, FETCHED)."""
    return ["sh", "-c", " && ".join(f": >{shlex.quote(p)}" for p in paths)]


def staged_marker() -> str:
    return f"{TRANSFER}/{STAGED}"


def fetched_marker() -> str:
    return f"{TRANSFER}/{FETCHED}"


class TooLarge(Exception):
    """A download exceeded the bytes allowed."""


def unpack_outputs(stream: IO[bytes], vols: Iterable[Volume], limit: int) -> list[str]:
    """Unpack a download into the volumes' host sources, as untrusted content; returns the files written."""
    by_arc = {_relative(v): Path(v.source) for v in vols}
    written: list[str] = []
    total = 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            root = next((arc for arc in by_arc if name == arc or name.startswith(arc + "/")), None)
            if root is None:
                continue
            rel = name[len(root) :].lstrip("/")
            dest_root = by_arc[root]
            dest = (dest_root / rel).resolve() if rel else dest_root.resolve()
            if dest != dest_root.resolve() and dest_root.resolve() not in dest.parents:
                continue  # a path that climbs out of its volume
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                continue  # links, devices, fifos: never unpacked
            total += member.size
            if total > limit:
                raise TooLarge(f"the outputs exceed {limit} bytes")
            src = tar.extractfile(member)
            if src is None:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                dest.unlink()
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            written.append(str(dest))
    return written


def spooled() -> IO[bytes]:
    """Where a tar stream waits on this machine (memory first, a temporary file past 8 MiB)."""
    return tempfile.SpooledTemporaryFile(max_size=8 * 1024**2)
