"""Files between the supervisor's machine and a pod, as tar streams through the API server's `exec`: the inputs
a workload mounts go in before it runs, its outputs come back when it ends. No host path reaches a node.

What comes back was written inside the sandbox, so it is unpacked as untrusted: regular files and directories
only (no links, devices or fifos), every path inside the destination, and no more than a set number of bytes.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shlex
import shutil
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


def touch_command(*paths: str, notes: dict[str, str] | None = None) -> list[str]:
    """Create marker files (the go-ahead, STAGED, FETCHED); one named in `notes` holds that text (a go-ahead's
    note), written whole under another name first."""
    notes = notes or {}
    steps = []
    for p in paths:
        q = shlex.quote(p)
        if notes.get(p):
            steps.append(f"printf %s {shlex.quote(notes[p])} >{q}.part && mv -f {q}.part {q}")
        else:
            steps.append(f": >{q}")
    return ["sh", "-c", " && ".join(steps)]


def staged_marker() -> str:
    return f"{TRANSFER}/{STAGED}"


def fetched_marker() -> str:
    return f"{TRANSFER}/{FETCHED}"


class TooLarge(Exception):
    """A download exceeded the bytes allowed."""


def unpack_outputs(stream: IO[bytes], vols: Iterable[Volume], limit: int, tree: bool = False) -> list[str]:
    """Unpack a download into the volumes' host sources, as untrusted content; returns the files written. With
    `tree` (a working tree), symbolic links are made too, as links (never followed: a path through one that
    leads outside is not written), and a file's executable bits are kept, as git records them."""
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
            if tree and member.issym() and rel:
                parent = (dest_root / rel).parent.resolve()
                if parent != dest_root.resolve() and dest_root.resolve() not in parent.parents:
                    continue  # a link placed through another link, outside its volume
                link = parent / Path(rel).name
                if link.is_dir() and not link.is_symlink():
                    continue
                link.unlink(missing_ok=True)
                os.symlink(member.linkname, link)
                continue
            dest = (dest_root / rel).resolve() if rel else dest_root.resolve()
            if dest != dest_root.resolve() and dest_root.resolve() not in dest.parents:
                continue  # a path that climbs out of its volume
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                continue  # links (but a tree's), devices, fifos: never unpacked
            total += member.size
            if total > limit:
                raise TooLarge(f"the outputs exceed {limit} bytes")
            src = tar.extractfile(member)
            if src is None:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink():
                dest.unlink()
            mode = 0o755 if tree and member.mode & 0o111 else 0o644
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                os.fchmod(out.fileno(), mode)
            written.append(str(dest))
    return written


def replace_tree(stream: IO[bytes], v: Volume, dest: Path, limit: int) -> list[str]:
    """Unpack a download of one volume holding a working tree (`unpack_outputs` with `tree`) beside dest, then,
    once all of it is there, put it in place of dest's content (dest itself stays: it may be a mount point).
    Whatever fails before the swap leaves dest as it was. Returns the files written."""
    staging = dest.parent / f".{dest.name}.fetched"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700)
    try:
        written = unpack_outputs(stream, [dataclasses.replace(v, source=str(staging))], limit, tree=True)
        dest.mkdir(parents=True, exist_ok=True)
        # .git last: a swap cut short leaves the host's checkout (not a tree mistaken for imported work), and the
        # caller still has the volume.
        for child in dest.iterdir():
            if child.name != ".git":
                _remove(child)
        for child in sorted(staging.iterdir()):
            if child.name != ".git":
                shutil.move(str(child), str(dest / child.name))
        if (staging / ".git").exists() or (staging / ".git").is_symlink():
            _remove(dest / ".git")
            shutil.move(str(staging / ".git"), str(dest / ".git"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [str(dest / Path(w).relative_to(staging.resolve())) for w in written]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def spooled() -> IO[bytes]:
    """Where a tar stream waits on this machine (memory first, a temporary file past 8 MiB)."""
    return tempfile.SpooledTemporaryFile(max_size=8 * 1024**2)
