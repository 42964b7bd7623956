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
