"""The run's contact with the host repository: the checkout it starts from, the gate its change must pass,
and the handoff (push, pull request)."""
