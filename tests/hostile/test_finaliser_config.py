"""Class 5 of issue 11: the finaliser runs nothing the agent configured, and writes no more than the disk limit.

The agent controls its workspace's .git: config, includes, extensions, hooks, attributes. The finaliser used
to run `git add -A` there, so a clean filter the agent defined ran in the finaliser and wrote 1.5 GB into the
run directory on the host. Here the agent plants every kind of git configuration that runs a program; each
program leaves a marker naming where it ran (the finaliser is the only container where /sandbox/out is
writable) and the clean filter also tries to write 200 MB into the run directory. None may run in the
finaliser, and the real change must still be packed as written."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from agent_sandbox.git.checkout import open_repo, prepare_checkout

from ..conftest import git

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

MARK = """#!/bin/sh
ctx=agent; [ -w /sandbox/out ] && ctx=finaliser
touch "/workspace/MARK-$(basename "$0" .sh)-$ctx" "/sandbox/out/MARK-$(basename "$0" .sh)" 2>/dev/null
"""
CLEAN = (
    MARK
    + """if [ "$ctx" = finaliser ]; then
  head -c 200000000 /dev/zero >/sandbox/out/big 2>/dev/null
  head -c 200000000 /dev/zero >/workspace/big 2>/dev/null
fi
cat >/dev/null; echo FILTERED
"""
)
HOOKS = (
    "pre-commit",
    "post-commit",
    "commit-msg",
    "prepare-commit-msg",
    "post-index-change",
    "reference-transaction",
    "fsmonitor-watchman",
    "pre-auto-gc",
    "post-rewrite",
)
PROGRAMS = (
    "smudge",
    "process",
    "textconv",
    "diffcmd",
    "mergedrv",
    "fsmonitor",
    "pager",
    "ssh",
    "editor",
    "gpg",
    "askpass",
    "include-fsmonitor",
    "includeif-pager",
    "worktree-fsmonitor",
    "alternate-refs",
    *(f"hookspath-{h}" for h in HOOKS),
    *(f"hook-{h}" for h in HOOKS),
)
ATTRS = "* filter=pwn diff=pwn merge=pwn\na.py filter=pwnp\n"


def plant() -> str:
    """One bash command, run by the agent in /workspace, that plants it all."""
    p = "/workspace/.pwn"
    files = {f"{p}/{name}.sh": MARK for name in PROGRAMS} | {f"{p}/clean.sh": CLEAN}
    files |= {f"{p}/hooks/{h}": f"#!/bin/sh\nexec {p}/hookspath-{h}.sh\n" for h in HOOKS}
    files |= {f".git/hooks/{h}": f"#!/bin/sh\nexec {p}/hook-{h}.sh\n" for h in HOOKS}
    files |= {
        f"{p}/inc.cfg": f"[core]\n\tfsmonitor = {p}/include-fsmonitor.sh\n",
        f"{p}/incif.cfg": f"[core]\n\tpager = {p}/includeif-pager.sh\n",
        ".git/config.worktree": f"[core]\n\tfsmonitor = {p}/worktree-fsmonitor.sh\n",
        f"{p}/attributes": ATTRS,
        ".git/info/attributes": ATTRS,
        ".gitattributes": ATTRS,
    }
    cmds = [f"mkdir -p {p}/hooks .git/hooks .git/info"]
    cmds += [f"echo {base64.b64encode(body.encode()).decode()} | base64 -d > {path}" for path, body in files.items()]
    cmds += [f"chmod +x {p}/*.sh {p}/hooks/* .git/hooks/*"]
    config = {
        "core.repositoryformatversion": "1",
        "extensions.worktreeConfig": "true",
        "filter.pwn.clean": f"{p}/clean.sh",
        "filter.pwn.smudge": f"{p}/smudge.sh",
        "filter.pwn.required": "true",
        "filter.pwnp.process": f"{p}/process.sh",
        "filter.pwnp.required": "true",
        "diff.pwn.textconv": f"{p}/textconv.sh",
        "diff.pwn.command": f"{p}/diffcmd.sh",
        "merge.pwn.driver": f"{p}/mergedrv.sh",
        "core.fsmonitor": f"{p}/fsmonitor.sh",
        "core.hooksPath": f"{p}/hooks",
        "core.pager": f"{p}/pager.sh",
        "core.sshCommand": f"{p}/ssh.sh",
        "core.editor": f"{p}/editor.sh",
        "core.askPass": f"{p}/askpass.sh",
        "gpg.program": f"{p}/gpg.sh",
        "commit.gpgSign": "true",
        "core.alternateRefsCommand": f"{p}/alternate-refs.sh",
        "core.attributesFile": f"{p}/attributes",
        "include.path": f"{p}/inc.cfg",
        "includeIf.gitdir:/.path": f"{p}/incif.cfg",
        "core.untrackedCache": "true",
    }
    cmds += [f"git config {k} {json.dumps(v)}" for k, v in config.items()]
    cmds += ["echo planted"]
    return " && ".join(cmds)


def tree_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(root) for f in fs)


def test_nothing_the_agent_configured_runs_in_the_finaliser(make_repo, sandbox, write_script, tmp_path) -> None:
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")
    pol = tmp_path / "disk.yaml"
    pol.write_text("limits: {disk: 64m}\n")
    script = write_script(
        "turns:\n"
        + "".join(
            f"  - bash: {json.dumps(c)}\n"
            for c in (
                plant(),
                "sed -i 's/x = 1/x = 2/' a.py && cat a.py",
            )
        )
        + "  - text: done\n"
    )
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "plant git config",
        "--model-script",
        str(script),
        "--policy",
        str(pol),
        "--keep",
        "--json",
    )
    assert res.code == 0, res.stderr + res.stdout
    s = res.json()
    run_dir = Path(s["run_dir"])
    ws = run_dir / "workspace"
    # Nothing ran in the finaliser: no marker from it in the workspace, none in the run directory at all.
    ran = sorted(p.name for p in ws.glob("MARK-*-finaliser"))
    outside = sorted(
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if (p.name.startswith("MARK-") or p.name == "big") and ws not in p.parents
    )
    assert ran == [] and outside == [], (ran, outside)
    assert not (ws / "big").exists()
    assert tree_bytes(run_dir) < 16 * 1024**2, "the run directory stays small"
    # The real change is packed as written: content passed through, no filter touched it.
    branch = s["branch"]
    assert git(repo, "show", f"{branch}:a.py") == "x = 2"
    assert git(repo, "show", f"{branch}:.gitattributes") == ATTRS.strip()
    assert git(repo, "show", f"{branch}:.pwn/clean.sh") == CLEAN.strip()
    names = git(repo, "ls-tree", "-r", "--name-only", branch).splitlines()
    assert not [n for n in names if n.endswith("-finaliser")], names
    assert s["id"] in git(repo, "log", "-1", "--format=%s", branch)
    assert git(repo, "rev-parse", f"{branch}~1") == base
    # The agent's configuration is still there for inspection (--keep): the finaliser did not rewrite it.
    assert "clean.sh" in (ws / ".git" / "config").read_text()


def _finalise(image: str, ws: Path, objects: Path, out: Path, base: str, limit: int) -> dict:
    uid = "1000:1000" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "--tmpfs",
            "/tmp:rw,nosuid,nodev,size=256m",
            "--user",
            uid,
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges:true",
            "-v",
            f"{ws}:/workspace",
            "-v",
            f"{objects}:/sandbox/host-objects:ro",
            "-v",
            f"{out}:/sandbox/out",
            "-e",
            "SANDBOX_RUN_ID=cap",
            "-e",
            f"SANDBOX_BASE_COMMIT={base}",
            "-e",
            "SANDBOX_BRANCH=sandbox/cap",
            "-e",
            f"SANDBOX_DISK_LIMIT={limit}",
            "-e",
            "HOME=/tmp",
            "-e",
            "GIT_AUTHOR_NAME=a",
            "-e",
            "GIT_AUTHOR_EMAIL=a@example.invalid",
            "-e",
            "GIT_COMMITTER_NAME=a",
            "-e",
            "GIT_COMMITTER_EMAIL=a@example.invalid",
            "-w",
            "/workspace",
            "--entrypoint",
            "/opt/sandbox/finalize.sh",
            image,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return json.loads((out / "result.json").read_text())


def test_the_finaliser_writes_no_file_past_the_disk_limit(make_repo, tmp_path) -> None:
    from agent_sandbox.backend.docker import connect_client
    from agent_sandbox.backend.images import require_images

    image = require_images(connect_client()).agent
    repo = make_repo()
    host = open_repo(repo)
    base = git(repo, "rev-parse", "HEAD")
    owner = (1000, 1000) if os.geteuid() == 0 else None
    results = {}
    for name, size in (("small", 4096), ("large", 3 * 1024**2)):
        ws, out = tmp_path / f"ws-{name}", tmp_path / f"out-{name}"
        prepare_checkout(host, base, ws, "sandbox/cap", owner)
        (ws / "data.bin").write_bytes(os.urandom(size))  # incompressible
        out.mkdir()
        if owner:
            os.chown(ws / "data.bin", *owner)
            os.chown(out, *owner)
        results[name] = (_finalise(image, ws, host.objects, out, base, 1024**2), out)
    small, out = results["small"]
    assert small["status"] == "packed" and (out / "work.bundle").stat().st_size < 1024**2
    large, out = results["large"]
    said = large["detail"] + (out / "finalize.err").read_text()
    assert large["status"] == "error" and "too large" in said.lower(), large
    assert not (out / "work.bundle").exists() and not (out / "work.bundle.lock").exists()
    assert tree_bytes(out) < 1024**2 + 128 * 1024, sorted(p.name for p in out.iterdir())
