"""What the supervisor and the sidecar agree on: where the configuration and the key arrive, and the ports.

Standard library only, and nothing imported: the sidecar reads this first thing, to listen on its ports before
its heavy imports (sidecar/__main__.py).
"""

CONFIG_ENV = "SANDBOX_SIDECAR_CONFIG"
KEY_ENV = "SANDBOX_UPSTREAM_API_KEY"  # kept out of the config so that the config can be logged
# Or the path of a file holding the key (a mounted Secret on Kubernetes): kept out of /proc/<pid>/environ.
KEY_FILE_ENV = "SANDBOX_UPSTREAM_API_KEY_FILE"
GATEWAY_PORT = 8080
SCRIPTED_MODEL_PORT = 8099
PROXY_PORT = 3128

# A sidecar made ahead, for a warm daemon's pool (fleet/pool.py): it does its imports, marks that it holds
# (HELD_MARKER in the directory HELD_OUT_ENV names, its own output), and waits for its configuration: the file
# HELD_CONFIG, renamed whole into the read-only directory HELD_DIR_ENV names, with the key in HELD_KEY (empty:
# none) written before it. Nothing listens before that; unclaimed for HOLD_SECONDS, it ends.
HELD_DIR_ENV = "SANDBOX_SIDECAR_HELD_DIR"
HELD_OUT_ENV = "SANDBOX_SIDECAR_HELD_OUT"
HELD_CONFIG = "config.json"
HELD_KEY = "key"
HELD_MARKER = "held"
HOLD_SECONDS = 6 * 3600
EXIT_UNCLAIMED = 75
