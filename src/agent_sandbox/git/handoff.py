"""Handing the work over for review: pushing the branch with the host's credentials, and opening a pull
request. Both run on the host; neither credential ever enters a container."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import git

from agent_sandbox.errors import SandboxError
from agent_sandbox.git.checkout import HostRepo

if TYPE_CHECKING:
    from agent_sandbox.git.github import PullRequestResult

log = logging.getLogger(__name__)

GITHUB_REPO_ENV = "SANDBOX_GITHUB_REPO"


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
    *,
    slug: str,
    head: str,
    base: str,
    title: str,
    body: str,
    token: str,
    api_url: str | None = None,
    remote: str | None = None,
    draft: bool = False,
    labels: Sequence[str] = (),
    reviewers: Sequence[str] = (),
    note: str | None = None,
    full_report: str | None = None,
) -> PullRequestResult:
    """Open the pull request from `head` into `base`, or update the one the branch already has open (its body,
    and `note` as a comment), through GitHub's REST API with retries on rate limits.

    The API base is `api_url`, else $SANDBOX_GITHUB_API, else derived from the remote's URL `remote` (a GitHub
    Enterprise host is https://HOST/api/v3). A body over GitHub's limit is cut, saying where `full_report` is.
    Raises HandoffError (a GitHubError) when GitHub refuses or stays unavailable."""
    # github.py builds on this module's HandoffError, so it is imported here rather than at the top.
    from agent_sandbox.git.github import GitHub, api_base_for, fit_body

    client = GitHub(token, api_base_for(remote, api_url))
    return client.open_or_update_pr(
        slug,
        head,
        base,
        title,
        fit_body(body, full_report),
        draft=draft,
        labels=labels,
        reviewers=reviewers,
        note=note,
    )


def run_note(*, run_id: str, status: str, message: str, cost_usd: float, files_changed: int, branch: str) -> str:
    """The comment posted on an open pull request that a new run of its branch updated: what changed and
    where the full record is, so its reviewers notice that the branch moved."""
    lines = [
        f"**sandbox run `{run_id}`** updated `{branch}`: {status}"
        + (f", {message}" if message and message != status else ""),
        "",
        f"- files changed: {files_changed}",
        f"- cost: ${cost_usd:.2f}",
        "",
        f"The description above is this run's report; the full record is `sandbox show {run_id}` on the host.",
    ]
    return "\n".join(lines)
