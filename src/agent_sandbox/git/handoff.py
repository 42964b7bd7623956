"""Handing the work over for review: pushing the branch with the host's credentials, and opening a pull
request. Both run on the host; neither credential ever enters a container."""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request

import git

from agent_sandbox.errors import SandboxError
from agent_sandbox.git.checkout import HostRepo

log = logging.getLogger(__name__)

GITHUB_API_ENV = "SANDBOX_GITHUB_API_URL"
GITHUB_REPO_ENV = "SANDBOX_GITHUB_REPO"
DEFAULT_GITHUB_API = "https://api.github.com"


class HandoffError(SandboxError):
    """The push or the pull request failed; the branch is still there locally."""


def push_branch(repo: HostRepo, remote: str, branch: str, force: bool = False) -> None:
    """Push refs/heads/<branch> to the remote, with the host's credentials and without running hooks.

    The host's own pre-push hook is disabled too: hooks commonly run the test suite, which would run the
    agent's code on the host.
    """
    ref = f"refs/heads/{branch}"
    try:
        git.Git(repo.path).execute(
            [
                "git",
                "-c",
                "core.hooksPath=/dev/null",
                "push",
                "--no-verify",
                "--porcelain",
                remote,
                f"{'+' if force else ''}{ref}:{ref}",
            ]
        )
    except git.GitCommandError as exc:
        raise HandoffError(f"pushing {branch} to {remote} failed: {(exc.stderr or str(exc)).strip()[-600:]}") from None
    log.info("pushed branch=%s remote=%s", branch, remote)


def remote_url(repo: HostRepo, remote: str) -> str | None:
    try:
        return git.Git(repo.path).remote("get-url", remote)
    except git.GitCommandError:
        return None


def github_slug(url: str | None) -> str | None:
    """owner/name from a GitHub-style remote URL (https, ssh or scp-like), else None."""
    if not url:
        return None
    m = re.match(r"^(?:https?://[^/]+/|ssh://(?:[^@/]+@)?[^/]+/|[^@/:]+@[^:/]+:)([^/]+)/([^/]+?)(?:\.git)?/?$", url)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def open_pull_request(
    *, slug: str, head: str, base: str, title: str, body: str, token: str, api_url: str | None = None
) -> str:
    """Open a pull request through GitHub's REST API; returns its web URL."""
    api = (api_url or os.environ.get(GITHUB_API_ENV) or DEFAULT_GITHUB_API).rstrip("/")
    data = json.dumps({"title": title, "head": head, "base": base, "body": body, "draft": False}).encode()
    req = urllib.request.Request(
        f"{api}/repos/{slug}/pulls",
        data=data,
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "Content-Type": "application/json",
            "User-Agent": "agent-sandbox",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return str(json.loads(resp.read())["html_url"])
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise HandoffError(f"opening the pull request failed: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise HandoffError(f"opening the pull request failed: {exc}") from None
