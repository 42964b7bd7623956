"""The hostile-scenario suite: one file per class of attack from the threat model (docs/threat-model.md).

Each test makes the real agent (real Claude Code, driven by the scripted model) or a hostile repository try
one way out of the sandbox, around the budget or into the host, and shows that it fails. Traffic goes only
to this machine's own test hosts and containers, or to TEST-NET addresses (192.0.2.0/24) that must fail.
"""
