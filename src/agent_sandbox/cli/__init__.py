"""The `sandbox` command line: the entry point (launch.py), the commands (main.py), the warm daemon (daemon.py),
the live progress view (ui.py), the demo's repository.

Nothing is imported here: the entry point hands `sandbox run` to a daemon before importing the CLI's libraries.
"""
