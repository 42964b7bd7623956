"""`python -m agent_sandbox.cli`: the same as the `sandbox` command."""

from agent_sandbox.cli.main import entry

entry()
