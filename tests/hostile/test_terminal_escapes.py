"""Issue 11, class 9 (terminal part): control characters from the agent (ESC sequences, OSC 52 clipboard
writes, CR and backspace overwrites, BEL, C1 controls, bidi overrides) never reach the operator's terminal or
the report raw: every command shows them escaped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ..conftest import audit_events

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")

SCRIPT = json.dumps(
    {
        "turns": [
            {
                "bash": "printf 'hi\\033]52;c;ZXZpbA==\\007 \\033[2J\\r\\b\\302\\233 \\342\\200\\256gnp.exe\\n'; "
                "echo '\x1b[31mred\x07'"
            },
            {"write": {"path": "notes\x1b[2J\u202e.md", "content": "x\x1b]52;c;aGk=\x07\n"}},
            {"text": "done \x1b]52;c;aGk=\x07 \x1b[1A\r\b\u202eevil \x9b"},
        ]
    }
)


def test_escape_sequences_reach_no_terminal_and_no_report(make_repo, sandbox, write_script) -> None:
    res = sandbox(
        "run", "--repo", str(make_repo()), "--task", "escape \x1b[2J task", "--model-script", str(write_script(SCRIPT))
    )
    assert res.code == 0, res.stdout + res.stderr
    run_id = re.search(r"run dir\s+\S+/runs/(\S+)", res.stdout).group(1)  # type: ignore[union-attr]
    run_dir = Path(res.stdout.split("run dir")[1].split()[0])
    events = audit_events(run_dir)
    # The agent did send the raw bytes: they are in the trail (JSON-escaped), as evidence.
    said = [str(e["payload"].get(k)) for e in events if e["source"] == "agent" for k in ("text", "result", "input")]
    assert any("\x1b]52;" in text for text in said)
    outputs = {"run": res.stdout + res.stderr}
    for cmd in (["logs", run_id], ["show", run_id], ["report", run_id], ["audit", run_id]):
        r = sandbox(*cmd)
        assert r.code == 0, (cmd, r.stderr)
        outputs[" ".join(cmd[:1])] = r.stdout + r.stderr
    outputs["report.md"] = (run_dir / "report.md").read_text()
    for name, text in outputs.items():
        bad = RAW.findall(text.replace("\n", "").replace("\t", ""))
        assert not bad, (name, bad[:5])
    # Shown, escaped, not silently dropped.
    assert "\\x1b]52;c;" in outputs["logs"] and "\\u202e" in outputs["logs"] and "\\r\\x08" in outputs["logs"]
    assert "\\x1b" in outputs["report.md"]
