from pathlib import Path

import pytest

from agent_sandbox.sidecar.script import ScriptError, load_script, parse_script
from agent_sandbox.sidecar.scripted_model import expand


def test_issue_format_parses_and_expands() -> None:
    s = parse_script(
        {
            "turns": [
                {"bash": "echo hi > hello.txt"},
                {"write": {"path": "notes.md", "content": "text\n"}},
                {"edit": {"path": "a.py", "old": "x = 1", "new": "x = 2"}},
                {"text": "Done.", "usage": {"input_tokens": 1000, "output_tokens": 200}},
            ],
            "usage": {"input_tokens": 100, "output_tokens": 50},
        }
    )
    steps = expand(s)
    assert [st.tool for st in steps] == ["Bash", "Write", "Read", "Edit", None]
    assert steps[1].tool_input == {"file_path": "/workspace/notes.md", "content": "text\n"}
    assert steps[3].tool_input["old_string"] == "x = 1"
    assert steps[0].usage.input_tokens == 100
    assert steps[4].usage.output_tokens == 200 and steps[4].text == "Done."


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"turns": [{"bash": "ls"}, {"bash": "ls", "text": "x"}]}, "turns[1] (entry 2): needs exactly one of"),
        (
            {"turns": [{"bash": "ls"}, {}]},
            "turns[1] (entry 2): needs exactly one of bash, write, edit, read, text; got none",
        ),
        ({"turns": [{"write": {"path": "a"}}]}, "turns[0] (entry 1).write.content"),
        ({"turns": [{"shell": "ls"}]}, "turns[0] (entry 1).shell: Extra inputs are not permitted"),
        ({"turns": [{"text": "x", "usage": {"input_tokens": -1}}]}, "turns[0] (entry 1).usage.input_tokens"),
        ({"tunrs": []}, "tunrs: Extra inputs are not permitted"),
        (["bash"], "expected a mapping"),
    ],
)
def test_malformed_script_names_the_bad_entry(data: object, fragment: str) -> None:
    with pytest.raises(ScriptError) as exc:
        parse_script(data, "s.yaml")
    assert fragment in str(exc.value)


def test_load_script_reports_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("turns: [bash: 'unterminated\n")
    with pytest.raises(ScriptError, match="not valid YAML"):
        load_script(bad)
    with pytest.raises(ScriptError, match="cannot read model script"):
        load_script(tmp_path / "missing.yaml")
