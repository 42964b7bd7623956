"""The audit trail, the run store and the operator's commands, on real runs."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from agent_sandbox.audit.events import EVENT_MODELS
from agent_sandbox.audit.log import AuditEvent
from agent_sandbox.fleet.views import RunDetails, RunRow
from agent_sandbox.run.spec import RunSummary

from .conftest import REPO_ROOT, SANDBOX, audit_events, start_run

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

EVERYTHING = """
turns:
  - bash: "curl -sS -o /dev/null -w '%{http_code}' http://not-allowed.sandbox.test/"
  - write: {path: notes.md, content: "notes\\n"}
  - edit: {path: a.py, old: "x = 1", new: "x = 2"}
  - bash: "echo one more"
  - bash: "echo and another"
  - text: never reached
"""


def test_trail_has_every_category_and_verifies(make_repo, sandbox, write_script) -> None:
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "do everything",
        "--max-turns",
        "4",
        "--model-script",
        str(write_script(EVERYTHING)),
        "--json",
    )
    assert res.code == 14, res.stderr
    s = res.json()
    events = audit_events(s["run_dir"])
    for e in events:
        AuditEvent.model_validate(e)
        EVENT_MODELS[e["type"]].model_validate(e["payload"])
    types = {(e["source"], e["type"]) for e in events}
    for expected in [
        ("supervisor", "run_started"),
        ("supervisor", "container_created"),
        ("supervisor", "limit_hit"),
        ("supervisor", "run_ended"),
        ("supervisor", "imported"),
        ("supervisor", "resource_usage"),
        ("agent", "agent_init"),
        ("agent", "tool_call"),
        ("agent", "tool_result"),
        ("agent", "result"),
        ("proxy", "egress"),
        ("gateway", "model_call"),
    ]:
        assert expected in types, expected
    assert "invalid_event" not in {t for _, t in types}
    by_type = {e["type"]: e["payload"] for e in events}
    started = by_type["run_started"]
    assert len(started["policy_hash"]) == 64 and started["spec"]["policy"]["name"] == "default"
    assert started["images"]["agent"]["labels"]["sandbox.claude-code.version"] == started["claude_code_version"]
    assert started["images"]["agent"]["id"].startswith("sha256:")
    roles = [e["payload"]["role"] for e in events if e["type"] == "container_created"]
    assert roles == ["sidecar", "agent", "finaliser"]
    calls = [e["payload"] for e in events if e["type"] == "tool_call"]
    assert calls[0]["name"] == "Bash" and "not-allowed.sandbox.test" in calls[0]["input"]["command"]
    assert [c["name"] for c in calls[1:4]] == ["Write", "Read", "Edit"]
    assert calls[1]["input"]["file_path"] == "/workspace/notes.md"
    assert by_type["egress"]["decision"] == "deny" and by_type["egress"]["host"] == "not-allowed.sandbox.test"
    assert by_type["limit_hit"]["limit"] == "turns"
    ended = by_type["run_ended"]
    assert (ended["reason"], ended["exit_code"], ended["oom_killed"]) == ("turns", 14, False)
    imported = by_type["imported"]
    assert {f["path"] for f in imported["files"]} == {"notes.md", "a.py"} and imported["commits"]
    usage = by_type["resource_usage"]
    assert usage["samples"] >= 1 and usage["peak_memory_bytes"] > 2**20 and usage["peak_pids"] >= 1
    # The raw stream is kept beside the trail.
    stream = Path(s["run_dir"], "agent-stream.jsonl").read_text().splitlines()
    assert json.loads(stream[0])["type"] == "system"
    v = sandbox("audit", "verify", s["id"], "--json")
    assert v.code == 0 and v.json()["ok"] and v.json()["head_checked"]


def test_editing_a_line_breaks_the_chain_at_that_line(make_repo, sandbox, write_script) -> None:
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "t",
        "--model-script",
        str(write_script("turns:\n  - bash: 'echo hello'\n  - text: done\n")),
        "--json",
    )
    assert res.code == 0, res.stderr
    s = res.json()
    path = Path(s["run_dir"], "audit.jsonl")
    lines = path.read_text().splitlines()
    k = len(lines) // 2
    event = json.loads(lines[k - 1])
    event["payload"]["edited"] = True
    lines[k - 1] = json.dumps(event, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    v = sandbox("audit", "verify", s["id"])
    assert v.code == 4
    assert f"line {k} was changed" in v.stderr
    # The last line alone: only the head recorded at the end can tell.
    lines = path.read_text().splitlines()
    lines[k - 1] = json.dumps(
        {**event, "payload": {k2: v2 for k2, v2 in event["payload"].items() if k2 != "edited"}}, separators=(",", ":")
    )
    original_last = lines[-1]
    lines[-1] = original_last.replace('"status":"succeeded"', '"status":"failed"')
    assert lines[-1] != original_last
    path.write_text("\n".join(lines) + "\n")
    v = sandbox("audit", "verify", s["id"], "--json")
    assert v.code == 4 and "does not match the chain head" in v.json()["message"]


def test_secrets_echoed_by_the_agent_appear_nowhere(make_repo, sandbox, write_script, state_dir) -> None:
    key = "sk-ant-api03-ECHOED" + "x" * 20
    token = "ghp_" + "Z9" * 18
    script = write_script(f"""
turns:
  - bash: "echo the key is {key} and the token is {token}"
  - write: {{path: leak.txt, content: "{token}\\n"}}
  - text: "I found {key}"
""")
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--task",
        "echo secrets",
        "--model-script",
        str(script),
        "--json",
        env={"ANTHROPIC_API_KEY": key},
    )
    assert res.code == 0, res.stderr
    s = res.json()
    checked = 0
    for p in [*Path(s["run_dir"]).rglob("*"), *state_dir.glob("runs.sqlite*")]:
        if p.is_file():
            data = p.read_bytes()
            assert key.encode() not in data and token.encode() not in data, p
            checked += 1
    assert checked >= 8
    assert "[REDACTED]" in Path(s["run_dir"], "audit.jsonl").read_text()
    assert "[REDACTED]" in Path(s["run_dir"], "agent-stream.jsonl").read_text()
    assert res.stdout.count(key) == 0


def test_operator_commands_text_and_json(make_repo, sandbox, write_script, state_dir) -> None:
    repo = make_repo()
    script = write_script(
        "turns:\n  - bash: 'echo listing'\n  - write: {path: n.md, content: \"n\\n\"}\n  - text: done\n"
    )
    # Follow a live run with `logs -f` while it goes.
    proc = start_run(
        state_dir, "run", "--repo", str(repo), "--task", "first task\nmore", "--model-script", str(script), "--json"
    )
    deadline = time.monotonic() + 60
    while not list((state_dir / "runs").glob("*/audit.jsonl")) if (state_dir / "runs").exists() else True:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    run_id = next((state_dir / "runs").iterdir()).name
    follow = subprocess.run(
        [*SANDBOX, "logs", "-f", run_id],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SANDBOX_STATE_DIR": str(state_dir)},
        cwd=REPO_ROOT,
    )
    _out, errs = proc.communicate(timeout=120)
    assert proc.returncode == 0, errs
    assert follow.returncode == 0
    assert "run_started" in follow.stdout and "tool_call          Bash: echo listing" in follow.stdout
    assert follow.stdout.rstrip().splitlines()[-1].split()[3] == "run_ended"

    ls = sandbox("ls")
    assert ls.code == 0 and run_id in ls.stdout and "succeeded" in ls.stdout and "first task" in ls.stdout
    rows = [RunRow.model_validate(r) for r in sandbox("ls", "--json").json()]
    assert [r.id for r in rows] == [run_id] and rows[0].task == "first task" and rows[0].cost_usd > 0
    assert sandbox("ls", "--json", "--status", "failed").json() == []
    assert sandbox("ls", "--json", "--repo", str(repo), "--since", "1h").json()[0]["id"] == run_id
    assert sandbox("ls", "--json", "--since", "2099-01-01").json() == []
    assert sandbox("ls", "--since", "yesterday-ish").code == 2

    show = sandbox("show", run_id)
    assert show.code == 0
    for part in (f"run {run_id}", "succeeded (completed)", "wall 1800s", "tools     Bash 1, Write 1", "n.md"):
        assert part in show.stdout, part
    d = RunDetails.model_validate(sandbox("show", run_id[:-2], "--json").json())
    assert d.run.id == run_id and d.summary is not None and d.summary.files_changed == ["n.md"]
    assert d.spec.policy.limits.wall_seconds == 1800 and d.tool_calls == {"Bash": 1, "Write": 1}

    logs = sandbox("logs", run_id)
    assert logs.code == 0 and "model_call" in logs.stdout
    raw = sandbox("logs", run_id, "--raw").stdout.splitlines()
    assert all(AuditEvent.model_validate(json.loads(line)) for line in raw)
    only = sandbox("audit", run_id, "--source", "gateway", "--type", "model_call", "--json").stdout.splitlines()
    assert only and all(json.loads(x)["type"] == "model_call" for x in only)
    assert len(only) == RunSummary.model_validate_json(Path(d.run.run_dir, "summary.json").read_text()).model_calls
    rep = sandbox("report", run_id)
    assert rep.code == 0 and "## Commands run" in rep.stdout and "echo listing" in rep.stdout
    assert sandbox("report", run_id, "--json").json() == {"id": run_id, "markdown": rep.stdout[:-1]}
    for cmd in (["show", "nope"], ["logs", "nope"], ["audit", "nope"], ["audit", "verify", "nope"]):
        r = sandbox(*cmd)
        assert r.code == 2 and "no run 'nope'" in r.stderr, cmd


def test_two_concurrent_runs_are_both_recorded(make_repo, state_dir, write_script) -> None:
    procs = []
    for i, usage in enumerate((1000, 2000)):
        script = write_script(
            f"turns:\n  - bash: 'echo run {i}'\n  - text: done\nusage: {{input_tokens: {usage}, output_tokens: 0}}\n",
            name=f"s{i}.yaml",
        )
        procs.append(
            start_run(
                state_dir,
                "run",
                "--repo",
                str(make_repo(f"repo{i}")),
                "--task",
                f"task {i}",
                "--model-script",
                str(script),
                "--json",
            )
        )
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        summaries.append(json.loads(out))
    from agent_sandbox.store import RunStore

    store = RunStore(state_dir / "runs.sqlite")
    for i, s in enumerate(summaries):
        row = store.get(s["id"])
        assert row is not None
        assert (row["status"], row["task"], row["cost_usd"]) == ("succeeded", f"task {i}", s["cost_usd"])
        assert row["input_tokens"] == s["tokens"]["input"] == (i + 1) * 1000 * s["model_calls"]
        assert row["audit_head"] == s["audit_head"]
    total = store.spent_on()
    assert abs(total - sum(s["cost_usd"] for s in summaries)) < 1e-9


def test_live_view_in_a_pseudo_terminal_and_plain_lines_without_one(make_repo, write_script, state_dir) -> None:
    script = write_script("turns:\n  - bash: 'echo live'\n  - text: done\n")
    args = [*SANDBOX, "run", "--repo", str(make_repo()), "--task", "t", "--model-script", str(script)]
    env = {**os.environ, "SANDBOX_STATE_DIR": str(state_dir), "TERM": "xterm-256color", "COLUMNS": "120"}
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO_ROOT, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    os.close(master)
    assert proc.returncode == 0
    screen = b"".join(chunks).decode(errors="replace")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    assert "\x1b[" in screen, "a terminal gets colour and cursor control"
    for part in (
        "╭",
        "sandbox run ",
        "phase",
        "elapsed",
        "of 1800s",
        "spend",
        "of $5.00",
        "turns",
        "of 50",
        "last tool",
        "Bash: echo live",
        "denied",
        "0 connection(s)",
    ):
        assert part in plain, part
    # Without a terminal the same run prints plain lines, one per phase and tool call, with no escapes.
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=180)
    assert res.returncode == 0
    assert "\x1b[" not in res.stderr and "╭" not in res.stderr
    assert re.search(r"^\s+[\d.]+s\s+tool Bash: echo live$", res.stderr, re.M)
    assert re.search(r"^\s+[\d.]+s agent\s+Claude Code", res.stderr, re.M)
