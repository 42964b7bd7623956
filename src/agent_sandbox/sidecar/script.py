"""The scripted model's YAML script: a list of turns that stand in for the model's answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ScriptError(ValueError):
    """A script that cannot be played; the message names the bad entry."""


class Usage(BaseModel):
    """Token counts reported for one model response."""

    model_config = ConfigDict(extra="forbid")

    input_tokens: int = Field(default=100, ge=0)
    """Uncached input tokens."""
    output_tokens: int = Field(default=50, ge=0)
    """Generated tokens."""
    cache_read_input_tokens: int = Field(default=0, ge=0)
    """Input tokens served from the prompt cache."""
    cache_creation_input_tokens: int = Field(default=0, ge=0)
    """Input tokens written to the prompt cache."""


class WriteAction(BaseModel):
    """Create or overwrite a file with the Write tool."""

    model_config = ConfigDict(extra="forbid")

    path: str
    """Path of the file, relative to the workspace unless absolute."""
    content: str
    """The whole new content of the file."""


class EditAction(BaseModel):
    """Replace one exact string in a file with the Edit tool."""

    model_config = ConfigDict(extra="forbid")

    path: str
    """Path of the file, relative to the workspace unless absolute."""
    old: str
    """The exact text to replace; must occur once in the file."""
    new: str
    """The replacement text."""


class ReadAction(BaseModel):
    """Read a file with the Read tool."""

    model_config = ConfigDict(extra="forbid")

    path: str
    """Path of the file, relative to the workspace unless absolute."""


class Turn(BaseModel):
    """One scripted answer: exactly one action, and optionally the usage to report for it."""

    model_config = ConfigDict(extra="forbid")

    bash: str | None = None
    """A shell command for the Bash tool."""
    write: WriteAction | None = None
    """A Write tool call."""
    edit: EditAction | None = None
    """An Edit tool call (preceded by a Read of the same file, which Claude Code insists on)."""
    read: ReadAction | None = None
    """A Read tool call."""
    text: str | None = None
    """A final answer: the model stops with `end_turn`."""
    usage: Usage | None = None
    """Usage reported for this turn's response(s); the script's default when absent."""
    timeout_ms: int | None = Field(default=None, gt=0)
    """For `bash`: the tool's own timeout in milliseconds (Claude Code caps it at 10 minutes)."""

    @model_validator(mode="after")
    def _one_action(self) -> Turn:
        actions = [k for k in ("bash", "write", "edit", "read", "text") if getattr(self, k) is not None]
        if len(actions) != 1:
            raise ValueError(
                "needs exactly one of bash, write, edit, read, text; got " + (", ".join(actions) if actions else "none")
            )
        if self.timeout_ms is not None and self.bash is None:
            raise ValueError("timeout_ms only goes with bash")
        return self

    @property
    def action(self) -> str:
        return next(k for k in ("bash", "write", "edit", "read", "text") if getattr(self, k) is not None)


class Script(BaseModel):
    """A whole script: the turns in order, and the usage reported where a turn names none."""

    model_config = ConfigDict(extra="forbid")

    turns: list[Turn] = Field(default_factory=list)
    """One entry answers one model request that offers tools, in order."""
    usage: Usage = Field(default_factory=Usage)
    """Default usage reported per response."""
    final_text: str = "Done."
    """The answer once the script is used up."""
    workspace: str = "/workspace"
    """Directory that relative paths in write/edit/read are joined to."""


def _describe(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if loc[:1] == ("turns",) and i == 1 and isinstance(item, int):
            parts[-1] = f"turns[{item}] (entry {item + 1})"
        else:
            parts.append(str(item))
    return ".".join(parts) or "script"


def parse_script(data: Any, source: str = "script") -> Script:
    """Validate already-loaded YAML data; raise ScriptError naming the first bad entry."""
    if not isinstance(data, dict):
        raise ScriptError(f"{source}: expected a mapping with a 'turns' list, got {type(data).__name__}")
    try:
        return Script.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _describe(tuple(first["loc"]))
        msg = first["msg"].removeprefix("Value error, ")
        raise ScriptError(f"{source}: {loc}: {msg}") from None


def load_script(path: str | Path) -> Script:
    """Read and validate a script file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ScriptError(f"cannot read model script {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScriptError(f"{p}: not valid YAML: {exc}") from None
    return parse_script(data, str(p))
