"""Class 12: the workspace is an overlay over a cached tree shared by every run on the commit.

A hostile agent tries to change what the next run starts from, or to reach the host through the overlay:
it writes through hard links and symbolic links to the tree's files, reads /proc/self/mountinfo for the
cached tree's path and tries that path and the mount's own directories, tries to unmount or remount its
workspace, fills the disk, and leaves its workspace unreadable with read-only directories. The cached tree
stays byte for byte as it was (the next run sees it pristine), nothing outside the workspace is reached, the
disk limit holds, and teardown removes every mount, loop device and file of the run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent_sandbox.run import quota, workspace

from ..conftest import audit_events, git, labelled, tool_results

pytestmark = [
    pytest.mark.docker,
    pytest.mark.usefixtures("docker_ready"),
    pytest.mark.skipif(
        workspace.overlay_unavailable() is not None or quota.unavailable() is not None,
        reason=f"no overlay workspace here: {workspace.overlay_unavailable() or quota.unavailable()}",
    ),
]

FILES = {"a.py": "x = 1\n", "pkg/b.py": "b = 1\n", "big.txt": "y" * 200_000}


def snapshot(top: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    out = {}
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            p = Path(root, n)
            st = p.lstat()
            body = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p.relative_to(top))] = (st.st_mode, st.st_uid, st.st_ino, st.st_mtime_ns, body)
    return out


def leftovers(state_dir: Path) -> list[str]:
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(f"{state_dir}/")
    ]
    loops = [
        line
        for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
        if str(state_dir) in line
    ]
    return mounts + loops


def run(sandbox, repo: Path, script: Path, *extra: str) -> dict:
    res = sandbox("run", "--repo", str(repo), "--task", "attack", "--model-script", str(script), *extra, "--json")
    assert res.stdout, res.stderr
    return res.json()


def bash_script(commands: list[str]) -> str:
    return "turns:\n" + "".join(f"  - bash: {json.dumps(c)}\n" for c in commands) + "  - text: done\n"


def test_the_agent_cannot_change_the_shared_tree_or_reach_it(make_repo, sandbox, write_script, state_dir) -> None:
    repo = make_repo(files=FILES)
    base = git(repo, "rev-parse", "HEAD")
    # A first, harmless run puts the tree in the cache, so that it can be watched during the attack.
    first = run(sandbox, repo, write_script(bash_script(["true"]), "warm.yaml"))
    assert first["status"] == "succeeded", first
    (tree,) = [p for p in (state_dir / "trees").iterdir() if p.is_dir()]
    before = snapshot(tree / "tree"), (tree / "index").read_bytes()
    lower_name = tree.name
    commands = [
        # Hard links and symbolic links to the tree's files: written through, the copy in the run's layer changes.
        "ln a.py hard && echo through-hardlink >> hard && ln -s pkg/b.py soft && echo through-symlink >> soft"
        " && cat a.py pkg/b.py && echo links-done",
        # Where the tree is, by the mount table: the options name it relative to the run directory, and neither
        # that path nor the host's absolute one exists in the container.
        "grep ' /workspace ' /proc/self/mountinfo; lower=$(grep ' /workspace ' /proc/self/mountinfo | grep -o"
        " 'lowerdir=[^,]*' | cut -d= -f2); echo lower=$lower;"
        f' for p in "$lower" "/workspace/$lower" /workspace/../../trees /trees {state_dir}/trees; do'
        ' ls "$p" >/dev/null 2>&1 && echo REACHED $p; done; echo mountinfo-done',
        # No capability to mount: neither unmount the workspace (to see what is under it) nor mount anything.
        "umount /workspace 2>/dev/null && echo BROKE; umount -l /workspace 2>/dev/null && echo BROKE;"
        " mount -t overlay overlay -o lowerdir=/:/workspace /tmp 2>/dev/null && echo BROKE;"
        " mount --bind / /tmp 2>/dev/null && echo BROKE; grep -c ' /workspace ' /proc/self/mountinfo; echo mount-done",
        # Changes of every kind to the tree's files, then left unreadable and read-only for the teardown.
        "rm pkg/b.py && mv pkg pkg2 && chmod 000 pkg2 && chmod 600 big.txt && echo z >> big.txt && touch -d 2001-01-01"
        " a.py && mkdir -p ro/deep && echo x > ro/deep/f && chmod 000 ro/deep && chmod 500 ro && ln -s /etc ro-etc"
        " && echo changes-done",
    ]
    s = run(sandbox, repo, write_script(bash_script(commands)))
    links, mountinfo, mounting, changes = tool_results(s["run_dir"])[:4]
    assert links.splitlines() == ["x = 1", "through-hardlink", "b = 1", "through-symlink", "links-done"], links
    assert "REACHED" not in mountinfo and "mountinfo-done" in mountinfo, mountinfo
    assert f"lower=../../trees/{lower_name}/tree" in mountinfo, mountinfo
    assert str(state_dir) not in mountinfo.split("lower=")[0], "the host's path of the tree shows in mountinfo"
    assert mounting.split() == ["1", "mount-done"], mounting
    assert "changes-done" in changes, changes
    # The tree is exactly as before, and the next run on the commit sees it so.
    assert (snapshot(tree / "tree"), (tree / "index").read_bytes()) == before
    look = run(sandbox, repo, write_script(bash_script(["git status --porcelain; cat a.py pkg/b.py; ls"]), "l.yaml"))
    (seen,) = tool_results(look["run_dir"])[:1]
    assert seen.split() == ["x", "=", "1", "b", "=", "1", "a.py", "big.txt", "pkg"], seen
    # The attack's work is on its branch as any work is; the host's branch and files are untouched.
    assert git(repo, "rev-parse", "HEAD") == base and (repo / "a.py").read_text() == "x = 1\n"
    # Teardown removed everything, unreadable directories and all.
    assert leftovers(state_dir) == []
    for r in (first, s, look):
        assert labelled(r["id"]) == []
        assert not {"workspace", "layer", "layer.img"} & {p.name for p in Path(r["run_dir"]).iterdir()}


def test_filling_the_disk_stops_at_the_limit_in_the_overlay(
    make_repo, sandbox, write_script, tmp_path, state_dir
) -> None:
    limit_mb = 64
    repo = make_repo(files=FILES)
    policy = tmp_path / "small-disk.yaml"
    policy.write_text(json.dumps({"limits": {"disk": f"{limit_mb}m"}, "git": {"allow_binary": True}}))
    commands = [
        "fallocate -l 3G huge.bin; echo rc=$?",
        "dd if=/dev/urandom of=random.bin bs=1M count=200 status=none; echo rc=$?",
        # Full: every file of the tree it changes needs a copy in the layer; the filesystem stays at the limit.
        "for i in 1 2 3 4 5; do cat big.txt >> a.py || echo copy-refused; done; df -m /workspace | tail -n 1",
        "rm -f random.bin huge.bin a.py; df -m /workspace | tail -n 1 | awk '{print $2}'",
    ]
    s = run(sandbox, repo, write_script(bash_script(commands)), "--policy", str(policy))
    out = tool_results(s["run_dir"])
    assert "No space left on device" in out[0] and "rc=1" in out[0], out[0]
    assert "No space left on device" in out[1] and "rc=1" in out[1], out[1]
    assert int(out[3].split()[-1]) <= limit_mb, out[3]
    (q,) = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "disk_quota"]
    (c,) = [e["payload"] for e in audit_events(s["run_dir"]) if e["type"] == "checkout_prepared"]
    assert q["mode"] == "filesystem" and c["mode"] == "overlay"
    (tree,) = [p for p in (state_dir / "trees").iterdir() if p.is_dir()]
    assert (tree / "tree" / "a.py").read_text() == "x = 1\n"
    assert leftovers(state_dir) == [] and labelled(s["id"]) == []
