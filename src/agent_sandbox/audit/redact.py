"""Redaction: known secret values and common token shapes never reach the run directory."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[REDACTED]"
MIN_SECRET_LEN = 8  # shorter values would blank out ordinary words

PATTERNS = [
    re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/\-]{8,}=*"),
]


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, MASK)
        for pat in PATTERNS:
            text = pat.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, text)
        return text


# Terminal control from agent-provided text: C0 controls (ESC starts CSI/OSC sequences such as OSC 52
# clipboard writes; CR and backspace overwrite what is shown; BEL), DEL, C1 controls (0x9b is a one-byte
# CSI), bidi overrides and isolates (which reorder what is shown), and line/paragraph separators.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029\ufeff"
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f" + _BIDI + "]")
_CONTROL_ONELINE = re.compile("[\x00-\x1f\x7f-\x9f" + _BIDI + "]")


def _visible_char(m: re.Match[str]) -> str:
    c = ord(m.group())
    return {9: "\\t", 10: "\\n", 13: "\\r"}.get(c) or (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")


def visible(text: str, oneline: bool = False) -> str:
    """Agent-provided text made safe for a terminal or a report: every control character, bidi override
    and separator is shown escaped (ESC as `\\x1b`, U+202E as `\\u202e`). Newlines and tabs are kept, unless
    oneline, which escapes them too (one event, one line: no forged lines in `sandbox logs`)."""
    return (_CONTROL_ONELINE if oneline else _CONTROL).sub(_visible_char, text)
