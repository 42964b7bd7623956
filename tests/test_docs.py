"""The docs say what the code does: every audit event type is documented, with each of its fields, and the
policy reference is the one the policy models generate."""

from __future__ import annotations

import re
import runpy
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


def test_policy_reference_is_generated_from_the_models() -> None:
    gen = runpy.run_path(str(DOCS.parent / "scripts" / "gen-policy-doc"))
    text = (DOCS / "policies.md").read_text()
    assert gen["replace"](text, gen["render"]()) == text, "docs/policies.md is stale: run scripts/gen-policy-doc"


def test_policy_reference_documents_every_key() -> None:
    from agent_sandbox.config.policy import Policy

    text = (DOCS / "policies.md").read_text()
    for section, model in Policy.model_fields.items():
        assert f"| `{section}` |" in text
        inner = model.annotation
        if isinstance(inner, type) and hasattr(inner, "model_fields"):
            for key in inner.model_fields:
                assert f"| `{section}.{key}` |" in text, f"{section}.{key} is not in the policy reference"
