"""Progress for people: timestamped phase and tool lines on stderr (plain when not a terminal)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape


class ConsoleReporter:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.monotonic()

    def _stamp(self) -> str:
        return f"[dim]{time.monotonic() - self.t0:6.1f}s[/dim]"

    def phase(self, name: str, detail: str = "") -> None:
        self.console.print(f"{self._stamp()} [bold cyan]{name:<8}[/bold cyan] {escape(detail)}")

    def event(self, kind: str, text: str) -> None:
        style = "yellow" if kind == "limit" else "white"
        self.console.print(f"{self._stamp()}   [{style}]{kind}[/{style}] {escape(text)}")
