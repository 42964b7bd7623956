"""The `sandbox` command line: the commands (main.py), the live progress view (ui.py), the demo's repository."""

from agent_sandbox.cli.main import entry, main

__all__ = ["entry", "main"]
