"""Where things live: the state directory, the cache, and the project's bundled resources."""

from __future__ import annotations

import os
import re
from pathlib import Path


def state_dir() -> Path:
    """`SANDBOX_STATE_DIR`, else `$XDG_STATE_HOME/agent-sandbox`, else `~/.local/state/agent-sandbox`."""
    if env := os.environ.get("SANDBOX_STATE_DIR"):
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser().resolve() / "agent-sandbox"


def cache_dir() -> Path:
    """`SANDBOX_CACHE_DIR`, else `$XDG_CACHE_HOME/agent-sandbox`, else `~/.cache/agent-sandbox`."""
    if env := os.environ.get("SANDBOX_CACHE_DIR"):
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "agent-sandbox"


def runs_dir() -> Path:
    return state_dir() / "runs"


def resource(name: str) -> Path:
    """A top-level project folder (`policies`, `images`, `sandbox`), in a wheel or in a source checkout.

    A wheel carries them inside the package (see pyproject's force-include); an editable install finds
    them at the repository root.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / name, here.parents[1] / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"bundled resource {name!r} not found next to {here}")


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def mountinfo_path(path: str) -> str:
    """A path as /proc/*/mountinfo writes it: space, tab, newline and backslash as octal escapes."""
    return re.sub(r"[ \t\n\\]", lambda c: f"\\{ord(c.group()):03o}", path)
