"""A small client of GitHub's REST API for what the sandbox posts: pull requests, their labels and reviewers,
and comments it keeps up to date. Runs on the host with the host's token; nothing here enters a container.

Every request is retried on what GitHub means as "later" (5xx, 429, a 403 rate limit), honouring its
`retry-after` and `x-ratelimit-reset` headers, within a bounded total wait: a sweep or the service must not hang
for an hour on an exhausted quota, it fails the hand-off with the time to retry instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent_sandbox.git.handoff import HandoffError

log = logging.getLogger(__name__)

GITHUB_API_ENV = "SANDBOX_GITHUB_API"
# The name this override had before; still read so existing set-ups keep posting where they did.
LEGACY_GITHUB_API_ENV = "SANDBOX_GITHUB_API_URL"
DEFAULT_GITHUB_API = "https://api.github.com"
BODY_LIMIT = 65_536  # GitHub refuses a pull request or comment body longer than this (characters)
_GITHUB_HOSTS = {"github.com", "www.github.com", "ssh.github.com"}
_PER_PAGE = 100
_MAX_PAGES = 50  # 5,000 comments: past that, a marker we wrote is not worth the requests
_BACKOFF_FIRST_S = 1.0
_SECONDARY_LIMIT_WAIT_S = 60.0  # GitHub's advice for a secondary rate limit that names no time


class GitHubError(HandoffError):
    """A GitHub API request failed (after the retries it was worth); `status` is the HTTP status, None when
    GitHub was not reached."""

    def __init__(self, message: str, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


@dataclass(frozen=True)
class PullRequestResult:
    """What `GitHub.open_or_update_pr` did."""

    url: str
    """The pull request's web address."""
    number: int
    """Its number in the repository."""
    created: bool
    """True when this call opened it; False when an open one for the branch was updated."""
    problems: tuple[str, ...] = field(default=())
    """What could not be set on it (a label, a reviewer), one line each; the pull request itself is fine."""


def api_base_for(remote_url: str | None, override: str | None = None) -> str:
    """The REST API base for a remote: the override (or $SANDBOX_GITHUB_API) wins; github.com (https or ssh)
    is https://api.github.com; any other host is taken for GitHub Enterprise, https://HOST/api/v3."""
    explicit = override or os.environ.get(GITHUB_API_ENV) or os.environ.get(LEGACY_GITHUB_API_ENV)
    if explicit:
        return explicit.rstrip("/")
    host, scheme = _remote_host(remote_url)
    if host is None or host.split(":")[0].lower() in _GITHUB_HOSTS:
        return DEFAULT_GITHUB_API
    return f"{scheme}://{host}/api/v3"


def _remote_host(url: str | None) -> tuple[str | None, str]:
    """(host, scheme for its API) of a remote URL; host None for a local path or something unrecognised."""
    if not url:
        return None, "https"
    m = re.match(r"^(https?)://(?:[^@/]+@)?([^/]+)/", url)
    if m:  # an https remote's port is the web server's, so the API is there too
        return m.group(2), m.group(1)
    m = re.match(r"^ssh://(?:[^@/]+@)?([^/:]+)(?::\d+)?/", url)
    if m:  # an ssh port is sshd's, not the web server's
        return m.group(1), "https"
    m = re.match(r"^[^@/:]+@([^:/]+):", url)
    if m:
        return m.group(1), "https"
    return None, "https"


def fit_body(body: str, full_report: str | None, limit: int = BODY_LIMIT) -> str:
    """The body as is when GitHub accepts its length, else cut at a line end with a last line saying it was
    cut and where the whole report is (`full_report`: the run's report.md path or `sandbox show RUN`)."""
    if len(body) <= limit:
        return body
    where = f"the full report is {full_report}" if full_report else "the full report is with the run"
    tail = f"\n\n---\n*This report was cut to fit GitHub's {limit:,}-character limit; {where}.*\n"
    room = max(0, limit - len(tail))
    cut = body[:room]
    # A cut mid-line could leave an open code fence or table row; the last whole line reads better.
    nl = cut.rfind("\n")
    if nl > room // 2:
        cut = cut[:nl]
    if cut.count("```") % 2:  # an unclosed fence would swallow the note
        fence = "\n```"
        cut = cut[: max(0, room - len(fence))] + fence
    return cut + tail


def marker_comment(marker: str) -> str:
    """The hidden line by which `upsert_comment` finds its comment again."""
    return f"<!-- sandbox:{marker} -->"


class GitHub:
    """GitHub's REST API with a token. Every request retries on 5xx, 429 and rate-limit 403s, honouring
    `retry-after` and `x-ratelimit-reset`, and waits at most `max_wait_s` in total per request."""

    def __init__(
        self,
        token: str,
        api_base: str = DEFAULT_GITHUB_API,
        *,
        max_wait_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 30.0,
    ) -> None:
        self.token = token
        self.api_base = api_base.rstrip("/")
        self.max_wait_s = max_wait_s
        self.sleep = sleep
        self.clock = clock
        self.timeout_s = timeout_s

    # ---- the operations ----

    def upsert_comment(self, slug: str, number: int, marker: str, body: str) -> str:
        """Edit the comment on issue/PR `number` carrying the hidden marker, else create it; its web URL.

        The marker is written into the body here, so one comment per (issue, marker) is kept up to date
        instead of a new one per event."""
        tag = marker_comment(marker)
        text = fit_body(body, None, BODY_LIMIT - len(tag) - 1) + "\n" + tag
        found = self._find_comment(slug, number, tag)
        if found is not None:
            data = self.request("PATCH", f"/repos/{slug}/issues/comments/{found['id']}", {"body": text})
            log.info("comment_updated slug=%s number=%s marker=%s id=%s", slug, number, marker, found["id"])
        else:
            data = self.request("POST", f"/repos/{slug}/issues/{number}/comments", {"body": text})
            log.info("comment_created slug=%s number=%s marker=%s id=%s", slug, number, marker, _get(data, "id"))
        return str(_get(data, "html_url"))

    def comment(self, slug: str, number: int, body: str) -> str:
        """Post a new comment on issue/PR `number`; its web URL."""
        data = self.request("POST", f"/repos/{slug}/issues/{number}/comments", {"body": fit_body(body, None)})
        return str(_get(data, "html_url"))

    def find_open_pr(self, slug: str, head: str) -> dict[str, Any] | None:
        """The open pull request from branch `head` of the repository itself, if there is one."""
        owner = slug.split("/", 1)[0]
        query = urllib.parse.urlencode({"state": "open", "head": f"{owner}:{head}"})
        data = self.request("GET", f"/repos/{slug}/pulls?{query}")
        if not isinstance(data, list):
            raise GitHubError(f"listing the pull requests of {slug}: unexpected answer {str(data)[:200]}")
        for pr in data:
            if isinstance(pr, dict):
                return pr
        return None

    def open_or_update_pr(
        self,
        slug: str,
        head: str,
        base: str,
        title: str,
        body: str,
        *,
        draft: bool = False,
        labels: Sequence[str] = (),
        reviewers: Sequence[str] = (),
        note: str | None = None,
    ) -> PullRequestResult:
        """Open a pull request from `head` into `base`, or update the open one the branch already has.

        An update replaces the body (the title is left: people edit it) and posts `note`, a summary of the
        new run, as a comment so the reviewers are told; labels are added either way (adding is idempotent),
        reviewers requested only on a new pull request (asking again after every run would be noise)."""
        body = fit_body(body, None)
        existing = self.find_open_pr(slug, head)
        if existing is None:
            try:
                pr = self.request(
                    "POST",
                    f"/repos/{slug}/pulls",
                    {"title": title, "head": head, "base": base, "body": body, "draft": draft},
                )
            except GitHubError as exc:
                # Someone (another run, a person) opened it between our look and our POST.
                if exc.status != 422 or "already exists" not in exc.message:
                    raise
                existing = self.find_open_pr(slug, head)
                if existing is None:
                    raise
            else:
                number = int(_get(pr, "number"))
                log.info("pr_created slug=%s number=%s head=%s draft=%s", slug, number, head, draft)
                problems = self._add_labels(slug, number, labels) + self._request_reviewers(slug, number, reviewers)
                return PullRequestResult(url=str(_get(pr, "html_url")), number=number, created=True, problems=problems)
        number = int(_get(existing, "number"))
        pr = self.request("PATCH", f"/repos/{slug}/pulls/{number}", {"body": body})
        log.info("pr_updated slug=%s number=%s head=%s", slug, number, head)
        problems = self._add_labels(slug, number, labels)
        if note:
            try:
                self.comment(slug, number, note)
            except GitHubError as exc:
                problems += (f"the comment on the new run was not posted: {exc.message}",)
                log.warning("pr_note_failed slug=%s number=%s error=%s", slug, number, exc.message)
        url = str(pr.get("html_url") if isinstance(pr, dict) and pr.get("html_url") else _get(existing, "html_url"))
        return PullRequestResult(url=url, number=number, created=False, problems=problems)

    # ---- the parts ----

    def _find_comment(self, slug: str, number: int, tag: str) -> dict[str, Any] | None:
        for page in range(1, _MAX_PAGES + 1):
            data = self.request("GET", f"/repos/{slug}/issues/{number}/comments?per_page={_PER_PAGE}&page={page}")
            if not isinstance(data, list):
                raise GitHubError(f"listing the comments of {slug}#{number}: unexpected answer {str(data)[:200]}")
            for c in data:
                if isinstance(c, dict) and tag in str(c.get("body") or ""):
                    return c
            if len(data) < _PER_PAGE:
                return None
        return None

    def _add_labels(self, slug: str, number: int, labels: Sequence[str]) -> tuple[str, ...]:
        if not labels:
            return ()
        try:
            self.request("POST", f"/repos/{slug}/issues/{number}/labels", {"labels": list(labels)})
        except GitHubError as exc:
            # The pull request is there and is what matters; a label the token may not set is reported.
            log.warning("pr_labels_failed slug=%s number=%s error=%s", slug, number, exc.message)
            return (f"labels {', '.join(labels)} not added: {exc.message}",)
        log.info("pr_labelled slug=%s number=%s labels=%s", slug, number, ",".join(labels))
        return ()

    def _request_reviewers(self, slug: str, number: int, reviewers: Sequence[str]) -> tuple[str, ...]:
        if not reviewers:
            return ()
        users = [r for r in reviewers if "/" not in r]
        # "org/team" names a team; GitHub takes its slug alone.
        teams = [r.split("/", 1)[1] for r in reviewers if "/" in r]
        payload: dict[str, Any] = {"reviewers": users}
        if teams:
            payload["team_reviewers"] = teams
        try:
            self.request("POST", f"/repos/{slug}/pulls/{number}/requested_reviewers", payload)
        except GitHubError as exc:
            # Commonly the author asked to review their own PR, or someone without access: report, go on.
            log.warning("pr_reviewers_failed slug=%s number=%s error=%s", slug, number, exc.message)
            return (f"reviewers {', '.join(reviewers)} not requested: {exc.message}",)
        log.info("pr_reviewers_requested slug=%s number=%s reviewers=%s", slug, number, ",".join(reviewers))
        return ()

    # ---- HTTP with retries ----

    def request(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        """One API request, retried while GitHub says "later" and the total wait stays within `max_wait_s`;
        the decoded JSON answer (None for an empty one)."""
        waited = 0.0
        attempt = 0
        what = f"{method} {path.split('?', 1)[0]}"
        while True:
            attempt += 1
            status, headers, text = self._send(method, path, payload)
            if status is not None and 200 <= status < 300:
                try:
                    return json.loads(text) if text.strip() else None
                except ValueError:
                    raise GitHubError(f"GitHub answered {what} with something not JSON: {text[:200]}", status) from None
            wait, why = self._retry_wait(status, headers, text, attempt)
            if wait is None:
                raise GitHubError(f"GitHub refused {what}: HTTP {status}: {_message(text)}", status)
            if waited + wait > self.max_wait_s:
                at = datetime.fromtimestamp(self.clock() + wait, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                log.warning("github_gave_up request=%r status=%s waited_s=%.1f retry_at=%s", what, status, waited, at)
                raise GitHubError(
                    f"GitHub {why} on {what} (HTTP {status}); gave up after waiting {waited:.0f}s, retry after {at}",
                    status,
                    hint="`sandbox push RUN` pushes again and opens or updates the pull request",
                )
            log.info(
                "github_retry request=%r status=%s reason=%r wait_s=%.1f attempt=%d", what, status, why, wait, attempt
            )
            self.sleep(wait)
            waited += wait

    def _send(
        self, method: str, path: str, payload: Mapping[str, Any] | None
    ) -> tuple[int | None, Mapping[str, str], str]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(
            self.api_base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
                "User-Agent": "agent-sandbox",
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return int(resp.status), _lower(resp.headers), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            try:
                text = exc.read().decode(errors="replace")
            except OSError:
                text = ""
            return int(exc.code), _lower(exc.headers), text
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return None, {}, f"{type(exc).__name__}: {reason}"

    def _retry_wait(
        self, status: int | None, headers: Mapping[str, str], text: str, attempt: int
    ) -> tuple[float | None, str]:
        """(seconds to wait, why) for an answer worth retrying; (None, "") for one that is final."""
        backoff = _BACKOFF_FIRST_S * 2 ** (attempt - 1)
        retry_after = _number(headers.get("retry-after"))
        if status is None:
            return backoff, "was not reachable"
        rate_limited = headers.get("x-ratelimit-remaining") == "0"
        if status == 429 or (
            status == 403 and (rate_limited or retry_after is not None or "rate limit" in text.lower())
        ):
            if retry_after is not None:
                return max(0.0, retry_after), "asked to retry later"
            reset = _number(headers.get("x-ratelimit-reset"))
            if rate_limited and reset is not None:
                # +1: the reset time is whole seconds, and a request on the second may still be refused.
                return max(0.0, reset - self.clock()) + 1.0, "rate limit exhausted"
            return max(backoff, _SECONDARY_LIMIT_WAIT_S), "rate limited"
        if status >= 500:
            return (retry_after if retry_after is not None else backoff), f"server error {status}"
        return None, ""


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (headers.items() if headers is not None else [])}


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _message(text: str) -> str:
    """GitHub's error message and its details, short, from an error answer."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300] or "(no body)"
    if not isinstance(data, dict):
        return text.strip()[:300]
    msg = str(data.get("message") or "")
    errors = data.get("errors")
    if isinstance(errors, list):
        details = [str(e.get("message") or e.get("code") or e) if isinstance(e, dict) else str(e) for e in errors]
        msg = "; ".join([msg, *details]) if msg else "; ".join(details)
    return msg[:500] or text.strip()[:300]


def _get(data: Any, key: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise GitHubError(f"GitHub's answer has no {key}: {str(data)[:200]}")
    return data[key]
