"""Progress for people: a live panel on a terminal, plain timestamped lines anywhere else (CI, cron)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from agent_sandbox.audit.redact import visible


def _safe(text: str) -> str:
    """Agent-provided text for the terminal: control characters shown escaped (never sent raw), one line,
    and no rich markup."""
    return escape(visible(str(text), oneline=True))


class ConsoleReporter:
    """Plain lines, one per phase and tool call: what a log file or a CI job wants."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.monotonic()

    def _stamp(self) -> str:
        return f"[dim]{time.monotonic() - self.t0:6.1f}s[/dim]"

    def begin(self, run_id: str, limits: Any, model: str) -> None:
        self.console.print(
            f"{self._stamp()} [bold]run[/bold]      {run_id}: wall {limits.wall_seconds}s, "
            f"budget ${limits.budget_usd:.2f}, {limits.max_turns} turns"
        )

    def phase(self, name: str, detail: str = "") -> None:
        self.console.print(f"{self._stamp()} [bold cyan]{name:<8}[/bold cyan] {_safe(detail)}")

    def event(self, kind: str, text: str) -> None:
        style = "yellow" if kind in ("limit", "denied") else "white"
        self.console.print(f"{self._stamp()}   [{style}]{kind}[/{style}] {_safe(text)}")

    def status(self, **fields: Any) -> None:
        pass

    def end(self) -> None:
        pass


class LiveReporter(ConsoleReporter):
    """A live panel under a scrolling log of phases and tool calls."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.state: dict[str, Any] = {"phase": "resolve", "spent": 0.0, "turns": 0, "denied": 0, "tool": "-"}
        self.limits: Any = None
        self.run_id = ""
        self.live: Live | None = None

    def begin(self, run_id: str, limits: Any, model: str) -> None:
        self.run_id, self.limits, self.model = run_id, limits, model
        self.live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4, transient=True)
        self.live.start()

    def phase(self, name: str, detail: str = "") -> None:
        self.state["phase"] = name
        super().phase(name, detail)

    def event(self, kind: str, text: str) -> None:
        if kind == "tool":
            self.state["tool"] = visible(text, oneline=True)
        super().event(kind, text)

    def status(self, **fields: Any) -> None:
        self.state.update(fields)

    def end(self) -> None:
        if self.live:
            self.live.stop()
            self.live = None

    @staticmethod
    def _bar(frac: float, width: int = 24) -> str:
        frac = max(0.0, min(1.0, frac))
        full = int(frac * width)
        colour = "green" if frac < 0.8 else "yellow" if frac < 0.95 else "red"
        return f"[{colour}]{'█' * full}[/{colour}][dim]{'░' * (width - full)}[/dim]"

    def _render(self) -> Panel:
        lim, st = self.limits, self.state
        elapsed = time.monotonic() - self.t0
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("phase", f"[cyan]{st['phase']}[/cyan]")
        if lim is not None:
            grid.add_row("elapsed", f"{self._bar(elapsed / lim.wall_seconds)} {elapsed:5.0f}s of {lim.wall_seconds}s")
            grid.add_row(
                "spend", f"{self._bar(st['spent'] / lim.budget_usd)} ${st['spent']:.4f} of ${lim.budget_usd:.2f}"
            )
            grid.add_row("turns", f"{self._bar(st['turns'] / lim.max_turns)} {st['turns']} of {lim.max_turns}")
        grid.add_row("last tool", escape(str(st["tool"])[:90]))
        denied = st["denied"]
        grid.add_row("denied", f"[{'red' if denied else 'dim'}]{denied} connection(s)[/]")
        return Panel(
            Group(grid),
            title=f"sandbox run {self.run_id}",
            subtitle=getattr(self, "model", ""),
            border_style="blue",
            expand=False,
        )


def reporter_for(console: Console) -> ConsoleReporter:
    return LiveReporter(console) if console.is_terminal else ConsoleReporter(console)
