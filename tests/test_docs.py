"""The docs say what the code does: every audit event type is documented, with each of its fields."""

from __future__ import annotations

import re
from pathlib import Path

from agent_sandbox.audit.events import EVENT_MODELS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_event_type_is_documented_with_its_fields() -> None:
    text = (DOCS / "audit.md").read_text()
    sections = dict(re.findall(r"^### `([a-z_]+)`\n(.*?)(?=^### |\Z)", text, re.M | re.S))
    assert set(sections) == set(EVENT_MODELS), "regenerate with scripts/gen-audit-doc"
    for name, model in EVENT_MODELS.items():
        body = sections[name]
        assert "```json\n{" in body, f"{name}: no example line"
        for field in model.model_fields:
            assert f"| `{field}` |" in body, f"{name}.{field} is not documented: regenerate docs/audit.md"


def test_readme_links_resolve() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (DOCS.parent / link).is_file(), link
