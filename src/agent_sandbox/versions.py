"""Pinned versions: the one place to bump them. Image tags hash these, so a bump rebuilds what it must."""

CLAUDE_CODE_VERSION = "2.1.330"
"""The Claude Code CLI in the agent image; recorded as the image label sandbox.claude-code.version."""

CLAUDE_AGENT_SDK_VERSION = "0.2.187"
"""The PyPI wheel that carries that CLI as claude_agent_sdk/_bundled/claude."""

BASE_IMAGE = "debian:bookworm-slim"
"""Pulled when a registry answers; otherwise an equivalent base is built with debootstrap."""

BASE_SUITE = "bookworm"
"""Debian suite for the debootstrap fallback."""
