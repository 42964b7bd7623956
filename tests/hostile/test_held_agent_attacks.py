"""The warm pool's held agent container, attacked: a pooled run's agent goes for the repository's objects the run
bound into its container after its start (the mount API as its supervisor used it, namespaces of its own, the
files through every path it has), for its own held init and for the next slot; and the run's process is killed
at awkward moments around the claim and the objects' bind, after which `sandbox gc` must leave no mount behind.
Each test has its own state directory and daemon (tests/test_daemon_e2e.py's `warm` fixture), which fails the
test if a mount is left under it or an object labelled with it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agent_sandbox.run.held_mounts import OBJECTS, POINTS, WORKSPACE
from agent_sandbox.run.workloads import AGENT_START, Users

from ..conftest import git, labelled, tool_results
from ..test_daemon_e2e import WORKER, Warm, finish, held_agent_processes, put_input, run_args, summary, wait_for
from ..test_daemon_e2e import warm as warm  # the fixture, re-exported
from ..test_limits_e2e import SLEEPER

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]


def script(*commands: str) -> str:
    return "turns:\n" + "".join(f"  - bash: {json.dumps(c)}\n" for c in commands) + "  - text: done\n"


def inspect(name: str) -> dict[str, Any]:
    res = subprocess.run(["docker", "inspect", name], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)[0]


def mountinfo(pid: int | str = "self") -> list[list[str]]:
    """The mount table as fields: [3] the mount's root, [4] its mount point, [5] its options, then the optional
    fields (propagation) up to '-'."""
    return [line.split(" ") for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]


def mounts_under(prefix: str) -> list[str]:
    return [f[4] for f in mountinfo() if f[4] == prefix or f[4].startswith(prefix + "/")]


def snapshot(objects: Path) -> dict[str, tuple[Any, ...]]:
    """Every file and directory of the object store, byte for byte and with its metadata."""
    out: dict[str, tuple[Any, ...]] = {}
    for p in [objects, *sorted(objects.rglob("*"))]:
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(objects))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, digest)
    return out


def transcript_has(run_dir: Path, text: str) -> bool:
    try:
        return any(text in out for out in tool_results(run_dir))
    except (OSError, ValueError):
        return False  # not there yet, or a line half written


# --- 1: the repository's objects, the agent's own files, bound read-only into its held container ----------------

ATTACK = r"""
import ctypes, errno, json, os, subprocess

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
O = "/sandbox/host-objects"
ob = O.encode()
out = {}


def name(e):
    return errno.errorcode.get(e, str(e))


def sc(key, *args):
    r = libc.syscall(*args)
    out[key] = "OK" if r >= 0 else name(ctypes.get_errno())
    return r


def py(key, fn):
    try:
        fn()
        out[key] = "OK"
    except OSError as exc:
        out[key] = name(exc.errno)


class Attr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "prop", "userns")]


AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
MS_REMOUNT, MS_BIND, MS_REC, MS_SHARED = 32, 4096, 16384, 1 << 20
# The mount API, as the run's supervisor used it (open_tree 428, move_mount 429, fsopen 430, mount_setattr
# 442): clear the read-only flag, put a tree of its own over the objects.
rw = Attr(0, 1, 0, 0)
sc("open_tree_clone", 428, AT_FDCWD, ob, 1 | os.O_CLOEXEC)
fd = sc("open_tree", 428, AT_FDCWD, ob, os.O_CLOEXEC)
if fd >= 0:
    sc("mount_setattr_fd", 442, fd, b"", AT_EMPTY_PATH, ctypes.byref(rw), ctypes.sizeof(rw))
sc("mount_setattr", 442, AT_FDCWD, ob, AT_RECURSIVE, ctypes.byref(rw), ctypes.sizeof(rw))
sc("move_mount", 429, AT_FDCWD, b"/tmp", AT_FDCWD, ob, 0)
sc("fsopen", 430, b"tmpfs", 0)
# And mount(2): a read-write remount, a bind over them, its own peer group (to propagate back to the host).
for key, src, flags in (
    ("remount_rw", None, MS_REMOUNT | MS_BIND),
    ("bind_over", b"/tmp", MS_BIND),
    ("make_shared", None, MS_SHARED | MS_REC),
):
    out[key] = "OK" if libc.mount(src, ob, None, ctypes.c_ulong(flags), None) == 0 else name(ctypes.get_errno())
out["umount"] = "OK" if libc.umount2(ob, 2) == 0 else name(ctypes.get_errno())
# A user and mount namespace of its own, where it would be root, then the same.
pid = os.fork()
if pid == 0:
    os._exit(0 if libc.unshare(0x10000000 | 0x00020000) == 0 else 10)
out["unshare"] = "OK" if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 else "refused"
cli = subprocess.run(
    ["unshare", "-Urm", "sh", "-c", f"mount -o remount,rw,bind {O} && touch {O}/planted-ns && echo NS-WROTE"],
    capture_output=True,
    text=True,
)
out["unshare_cli"] = [cli.returncode, (cli.stdout + cli.stderr).strip()[-300:]]
# The files themselves (the agent's user owns them here): a new one, an existing one, through /proc/self/fd,
# hard links both ways between the workspace and the objects.
obj = sorted(os.path.join(d, f) for d, _, fs in os.walk(O) for f in fs)[0]
out["object"] = obj
out["owner"] = [os.stat(obj).st_uid, os.getuid()]
py("create", lambda: open(f"{O}/planted", "w").close())
py("chmod_object", lambda: os.chmod(obj, 0o666))
py("chmod_dir", lambda: os.chmod(os.path.dirname(obj), 0o777))
py("utime", lambda: os.utime(obj, (0, 0)))
py("rename", lambda: os.rename(obj, obj + ".moved"))
py("unlink", lambda: os.unlink(obj))
py("mkdir", lambda: os.mkdir(f"{O}/pack2"))
py("setxattr", lambda: os.setxattr(obj, "user.planted", b"1"))
dfd = os.open(O, os.O_RDONLY | os.O_DIRECTORY)
py("openat_create", lambda: os.close(os.open("planted2", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)))
py("procfd_create", lambda: open(f"/proc/self/fd/{dfd}/planted3", "w").close())
rfd = os.open(obj, os.O_RDONLY)
py("procfd_reopen_rw", lambda: os.close(os.open(f"/proc/self/fd/{rfd}", os.O_RDWR)))
py("link_out", lambda: os.link(obj, "/workspace/.git/stolen-object"))
py("link_in", lambda: os.link("/workspace/README.md", f"{O}/planted4"))
py("symlink_in", lambda: os.symlink("/workspace", f"{O}/planted5"))
out["mountinfo"] = [ln for ln in open("/proc/self/mountinfo").read().splitlines() if f" {O} " in ln]
print("ATTACK " + json.dumps(out))
"""

WAIT_PROCEED = (
    "python3 -c 'import os, time; end = time.monotonic() + 120\n"
    'while not os.path.exists("/sandbox/in/proceed") and time.monotonic() < end: time.sleep(0.2)\n'
    'print("proceed", os.path.exists("/sandbox/in/proceed"))\''
)

MOUNT_CALLS = ("open_tree_clone", "open_tree", "mount_setattr", "move_mount", "fsopen")
MOUNT_CALLS += ("remount_rw", "bind_over", "make_shared", "umount")
READ_ONLY = ("create", "chmod_object", "chmod_dir", "utime", "rename", "unlink", "mkdir", "setxattr")
READ_ONLY += ("openat_create", "procfd_create", "link_in", "symlink_in")


def test_agent_cannot_unlock_or_replace_the_objects_it_owns(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    run_dir = warm.state / "runs" / slot
    repo = make_repo(files={"attack.py": ATTACK, "README.md": "# held\n"})
    objects = repo / ".git" / "objects"
    # The objects belong to the agent's user, as they do when the developer runs the sandbox as themselves:
    # the read-only mount is all that stands between the agent and them.
    uid, gid = (int(x) for x in Users.here().agent.split(":"))
    for p in [objects, *objects.rglob("*")]:
        os.chown(p, uid, gid)
    before = snapshot(objects)
    out, err = warm.state.parent / "out.json", warm.state.parent / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(script("python3 attack.py", WAIT_PROCEED))), out=out, err=err)
    try:
        wait_for(lambda: transcript_has(run_dir, "ATTACK "), 120, "the agent's attack")
        # While its container lives: the host's mounts under the state directory and the repository are the
        # run's own (its overlay and layer, and its two points, the objects bound read-only on one) and the next
        # slot's points; nothing the agent tried arrived here.
        root, prefix = str(warm.state.parent), str(run_dir) + "/"
        seen: dict[str, int] = {}
        for f in mountinfo():
            point = f[4]
            if point.startswith(str(repo)):
                raise AssertionError(f"a mount in the host's repository: {f}")
            if point.startswith(prefix):
                seen[point[len(prefix) :]] = seen.get(point[len(prefix) :], 0) + 1
            elif point.startswith(root):
                # Another slot's empty point, a bind of itself.
                assert Path(point).name in POINTS and f[3].endswith(point[len(root) :]), f
        assert seen == {WORKSPACE: 2, "layer": 1, OBJECTS: 2}, seen
        top = [f for f in mountinfo() if f[4] == str(run_dir / OBJECTS)][-1]  # the last mounted there
        assert top[5].split(",")[:4] == ["ro", "nosuid", "nodev", "noexec"], top
        # In the agent's container, the objects' mount is a slave: nothing made there travels to the host.
        pid = inspect(f"sbx-{slot}-agent")["State"]["Pid"]
        theirs = [f for f in mountinfo(pid) if f[4] == "/sandbox/host-objects"]
        assert theirs and all(any(o.startswith("master:") for o in f[6 : f.index("-")]) for f in theirs), theirs
        assert not any(o.startswith("shared:") for f in theirs for o in f[6 : f.index("-")]), theirs
        put_input(run_dir, "proceed", {})
        s = summary(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert s["id"] == slot, s
    attack, proceeded = tool_results(s["run_dir"])
    assert "proceed True" in proceeded, proceeded
    line = next(ln for ln in attack.splitlines() if ln.startswith("ATTACK "))
    res = json.loads(line[len("ATTACK ") :])
    assert res["owner"] == [uid, uid], res
    # No mount of any kind, no namespace to be root in.
    assert all(res[k] in ("EPERM", "ENOSYS", "EACCES") for k in MOUNT_CALLS if k in res), res
    assert "open_tree_clone" in res and "mount_setattr" in res and "move_mount" in res, res
    assert res["unshare"] == "refused", res
    assert res["unshare_cli"][0] != 0 and "NS-WROTE" not in res["unshare_cli"][1], res
    # Every write refused by the mount, though the agent owns the files; the link across mounts too.
    assert {k: res[k] for k in READ_ONLY} == dict.fromkeys(READ_ONLY, "EROFS"), res
    assert res["procfd_reopen_rw"] in ("EROFS", "EACCES"), res
    assert res["link_out"] == "EXDEV", res
    # Its view: the repository's objects on top, read-only, nosuid, nodev, noexec, a slave of the host's point.
    top_in = res["mountinfo"][-1].split(" ")
    assert top_in[5].split(",")[:4] == ["ro", "nosuid", "nodev", "noexec"], res["mountinfo"]
    assert all("shared:" not in ln for ln in res["mountinfo"]), res["mountinfo"]
    # The host's objects, byte for byte, owner, mode and time; nothing planted; the repository sound.
    assert s["status"] == "succeeded" and s["branch"] is None, s
    assert snapshot(objects) == before
    assert git(repo, "fsck", "--strict", "--no-dangling") == ""
    wait_for(lambda: labelled(slot) == [], 20, "the run's containers to go")
    assert mounts_under(str(run_dir)) == []


# --- 2: its held init, before and after the claim, and the next slot --------------------------------------------

PROBE = r"""
import errno, glob, json, os, signal, time

for _ in range(600):
    try:
        t = json.load(open("/sandbox/in/next.json"))
        break
    except (OSError, ValueError):
        time.sleep(0.2)
else:
    raise SystemExit("no next.json")
nxt = t["next"]
out = {"paths": {p: os.path.exists(p) for p in t["paths"]}}
# The next slot's run id, wherever this container can read.
hits = []
files = ["/proc/self/mountinfo", "/proc/self/cgroup", "/proc/net/unix", "/proc/net/tcp", "/etc/hosts"]
files += glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline") + glob.glob("/sandbox/in/*")
for f in files:
    try:
        if nxt.encode() in open(f, "rb").read():
            hits.append(f)
    except OSError:
        pass
out["hits"] = hits
# Its own start file and inputs: read-only. Its init: the kernel drops these signals from inside.
for key, path in (("start", "/sandbox/in/agent-start"), ("start_part", "/sandbox/in/agent-start.part")):
    try:
        open(path, "a").close()
        out[key] = "OK"
    except OSError as exc:
        out[key] = errno.errorcode[exc.errno]
for sig in (signal.SIGSTOP, signal.SIGKILL):
    try:
        os.kill(1, sig)
    except OSError as exc:
        out[f"kill_{sig.name}"] = errno.errorcode[exc.errno]
time.sleep(0.5)
out["init"] = open("/proc/1/cmdline").read().replace("\0", " ")
out["init_state"] = next(ln for ln in open("/proc/1/status") if ln.startswith("State:")).split()[1]
print("PROBE " + json.dumps(out))
"""


def test_held_agent_runs_only_its_init_and_never_reaches_the_next_slot(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    run_dir = warm.state / "runs" / slot
    # Before its claim: its init alone, nothing ever exec'd into it, its workspace and objects empty points, a
    # slave of the host's; no start file.
    assert [p.split()[:4] for p in held_agent_processes(slot)] == [
        ["python3", "-I", "/opt/sandbox/init.py", "--held"]
    ], held_agent_processes(slot)
    info = inspect(f"sbx-{slot}-agent")
    assert info["ExecIDs"] is None and info["Path"] == "/opt/sandbox/entrypoint.sh", info["ExecIDs"]
    pid = info["State"]["Pid"]
    assert list(Path(f"/proc/{pid}/root/workspace").iterdir()) == []
    assert list(Path(f"/proc/{pid}/root/sandbox/host-objects").iterdir()) == []
    assert not (run_dir / "in" / AGENT_START).exists()
    for f in mountinfo(pid):
        if f[4] in ("/workspace", "/sandbox/host-objects"):
            opts = f[6 : f.index("-")]
            assert any(o.startswith("master:") for o in opts) and not any(o.startswith("shared:") for o in opts), f
        if f[4] in ("/sandbox/in", "/sandbox/host-objects"):
            assert f[5].startswith("ro,"), f

    repo = make_repo(files={"probe.py": PROBE, "README.md": "# probe\n"})
    out, err = warm.state.parent / "out.json", warm.state.parent / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(script("python3 probe.py"))), out=out, err=err)
    try:
        wait_for(warm.bash_started, 90, "the agent's Bash call")
        nxt = wait_for(lambda: next(iter(warm.slots() - {slot}), None), 60, "the next slot")
        wait_for(lambda: warm.status()["pool"]["ready"] >= 1, 60, "the next slot to be ready")
        nxt_dir = warm.state / "runs" / nxt
        # The claimed container runs the agent now, still without an exec: its start came through its file.
        assert inspect(f"sbx-{slot}-agent")["ExecIDs"] is None
        paths = [str(nxt_dir / "in"), str(nxt_dir / "in" / AGENT_START), str(warm.state), str(run_dir)]
        put_input(run_dir, "next.json", {"next": nxt, "paths": paths})
        s = summary(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert s["id"] == slot and s["status"] == "succeeded", s
    (probe,) = tool_results(s["run_dir"])
    line = next(ln for ln in probe.splitlines() if ln.startswith("PROBE "))
    res = json.loads(line[len("PROBE ") :])
    assert res["paths"] == dict.fromkeys(paths, False), res
    # The next slot's id was in next.json only (which the probe reads from its inputs).
    assert res["hits"] == ["/sandbox/in/next.json"], res
    # (The start file is the supervisor's, 0644: refused for that before the mount is asked.)
    assert res["start"] in ("EACCES", "EROFS") and res["start_part"] == "EROFS", res
    assert "init.py --held" in res["init"] and res["init_state"] in ("S", "R"), res
    # Sent (or refused), and dropped by the kernel: the run went on to its end.
    assert all(res[k] == "EPERM" for k in res if k.startswith("kill_")), res

    # The next slot: untouched, its init alone, no start; the next run takes it and works as any.
    held = held_agent_processes(nxt)
    assert len(held) == 1 and "init.py --held" in held[0], held
    assert inspect(f"sbx-{nxt}-agent")["ExecIDs"] is None
    assert AGENT_START not in os.listdir(nxt_dir / "in")
    b = warm.cli(*run_args(repo, write_script(WORKER, "b.yaml")))
    assert b.code == 0, b.stderr
    sb = b.json()
    assert sb["id"] == nxt and sb["status"] == "succeeded", sb
    assert git(repo, "show", f"{sb['branch']}:notes.md") == "from a pooled run"


# --- 3 and 4: the run's process killed at its claim, after its objects' bind, while its agent works -------------


def daemon_run(warm: Warm, since: int) -> tuple[int, str]:
    """The pid of the daemon's process for the run begun after `since` in its log, and the slot it claimed, as
    soon as both are there (a millisecond's look, not wait_for's fifth of a second)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = warm.log()[since:]
        pid = re.search(r"daemon_run pid=(\d+)", text)
        claimed = re.search(r"pool_slot_claimed run_id=(\S+)", text)
        if pid and claimed:
            return int(pid.group(1)), claimed.group(1)
        time.sleep(0.001)
    raise AssertionError(f"no run claimed a slot: {warm.log()[since:]}")


def gc_after_kill(warm: Warm, run_id: str) -> dict[str, Any]:
    res = warm.cli("gc", "--json")
    assert res.code == 0, res.stdout + res.stderr
    (entry,) = [r for r in res.json() if r["run_id"] == run_id]
    assert entry["action"] in ("removed", "recovered"), entry
    # Its containers, networks, mount points and the objects bound on one of them: gone.
    assert labelled(run_id) == []
    assert not [f for f in mountinfo() if f"/runs/{run_id}/" in f[4] + "/"], Path("/proc/self/mountinfo").read_text()
    return entry


def test_sigkill_of_the_run_at_its_claim_and_after_its_objects_bound(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    repo = make_repo()
    objects = repo / ".git" / "objects"
    before = snapshot(objects)
    sleeper = write_script(SLEEPER)
    for moment in ("claim", "objects bound"):
        warm.wait_ready(1)
        since = len(warm.log())
        out, err = warm.state.parent / "out.json", warm.state.parent / "err.txt"
        proc = warm.popen(*run_args(repo, sleeper), out=out, err=err)
        try:
            pid, run_id = daemon_run(warm, since)
            if moment == "objects bound":
                point = str(warm.state / "runs" / run_id / OBJECTS)
                deadline = time.monotonic() + 60
                while sum(1 for f in mountinfo() if f[4] == point) < 2:
                    assert time.monotonic() < deadline, "the objects were never bound"
                    time.sleep(0.001)
            os.kill(pid, signal.SIGKILL)
            code = finish(proc, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code != 0, (moment, out.read_text())
        assert "Traceback" not in err.read_text(), err.read_text()
        entry = gc_after_kill(warm, run_id)
        # Whatever it had done, the repository is as it was: the agent never began.
        assert snapshot(objects) == before, (moment, entry)
        assert git(repo, "branch", "--list", f"sandbox/{run_id}") == "", (moment, entry)
    assert git(repo, "fsck", "--strict", "--no-dangling") == ""


def test_sigkill_of_the_run_while_its_held_agent_works(warm: Warm, make_repo, write_script) -> None:
    warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    repo = make_repo()
    objects = repo / ".git" / "objects"
    before = snapshot(objects)
    since = len(warm.log())
    out, err = warm.state.parent / "out.json", warm.state.parent / "err.txt"
    proc = warm.popen(*run_args(repo, write_script(SLEEPER)), out=out, err=err)
    try:
        pid, run_id = daemon_run(warm, since)
        assert run_id == slot
        wait_for(warm.bash_started, 90, "the agent's Bash call")
        os.kill(pid, signal.SIGKILL)
        code = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code != 0, out.read_text()
    # Nobody supervises it now: its held container still runs the agent, its objects still bound.
    assert any("time.sleep(600)" in p for p in held_agent_processes(run_id))
    assert sum(1 for f in mountinfo() if f[4] == str(warm.state / "runs" / run_id / OBJECTS)) == 2
    entry = gc_after_kill(warm, run_id)
    assert entry["action"] == "recovered" and entry["branch"] == f"sandbox/{run_id}", entry
    assert git(repo, "show", f"sandbox/{run_id}:partial.txt") == "work before the stop"
    # The object files that were there are there as they were (the import only added the run's own).
    after = snapshot(objects)
    files = {k: v for k, v in before.items() if v[-1] is not None}
    assert {k: after.get(k) for k in files} == files
    assert git(repo, "fsck", "--strict", "--no-dangling") == ""


# --- 5: a ready slot whose keeper died and whose engine objects went -------------------------------------------


def test_slot_left_without_keeper_or_engine_objects_leaves_no_mounts_after_gc(warm: Warm) -> None:
    status = warm.start(pool=1)
    warm.wait_ready(1)
    (slot,) = warm.slots()
    run_dir = warm.state / "runs" / slot
    assert sorted(Path(p).name for p in mounts_under(str(run_dir))) == sorted(POINTS)
    # The keeper dies (the OOM killer, `daemon stop` past its wait, a SIGKILL in its slot's removal between the
    # engine's objects and the points); the engine's objects of the slot go too (its teardown got that far, or
    # the engine was reset or pruned).
    os.kill(status["keeper"], signal.SIGKILL)
    subprocess.run(
        ["docker", "rm", "-f", *(f"sbx-{slot}-{role}" for role in ("agent", "sidecar", "finalise"))],
        capture_output=True,
    )
    subprocess.run(["docker", "network", "rm", f"sbx-{slot}-int", f"sbx-{slot}-egress"], capture_output=True)
    wait_for(lambda: labelled(slot) == [], 30, "the slot's engine objects to go")
    leaked: list[str] = []
    try:
        res = warm.cli("gc", "--json")
        assert res.code == 0, res.stderr
        # Found by its mount points alone (no store row, nothing on the engine), and removed.
        assert {r["run_id"]: r["action"] for r in res.json()}.get(slot) == "removed", res.stdout
        leaked = mounts_under(str(run_dir))
    finally:
        # Whatever gc left, taken down here: the failure is this test's, not the fixture's.
        for point in sorted(mounts_under(str(run_dir)), reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
    assert leaked == [], f"gc left the slot's mount points: {leaked}"
