"""agent-sandbox: run coding agents unattended inside locked-down containers.

This package is also installed into the sidecar image, so importing it must stay cheap and must not pull
in host-only dependencies (docker, git, click): those are imported by the modules that need them.
"""

__version__ = "0.1.0"
