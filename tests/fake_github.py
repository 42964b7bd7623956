"""A GitHub-compatible REST API server for tests: in process, on 127.0.0.1 and a free port, holding issues,
comments, pull requests, labels and reviewers in memory and recording every request.

    with FakeGitHub() as gh:                  # or the `fake_github` fixture (fake_github_fixture)
        gh.add_issue("acme/widgets", title="Fix it", labels=["sandbox"])
        client = GitHub("t0ken", gh.url)      # gh.enterprise_url serves the same under /api/v3
        ...
        assert gh.requests_to("POST", "/repos/acme/widgets/pulls")[0].json["draft"] is True

It answers the way GitHub does where the sandbox depends on it: a second open pull request for the same head
is a 422 "A pull request already exists", a body over 65,536 characters is a 422, a review request of the
author is a 422, an unknown issue is a 404. Failures can be injected for the next N requests (a rate-limit 403,
a 429, a 502) to exercise retries. Only what the sandbox uses is implemented; anything else is a 404.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

BODY_LIMIT = 65_536


@dataclass
class Recorded:
    """One request the server received."""

    method: str
    path: str  # without the query and without an Enterprise /api/v3 prefix
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    json: Any
    enterprise: bool  # it came in under /api/v3
    status: int = 0  # what it was answered


@dataclass
class _Failure:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]
    paths: str | None  # a regular expression the path must match, None for any request
    method: str | None  # the method it must have, None for any


@dataclass
class _Repo:
    issues: dict[int, dict[str, Any]] = field(default_factory=dict)  # pull requests are issues too, as on GitHub
    pulls: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_number: int = 1


class FakeGitHub:
    """The server and its state; see the module docstring."""

    def __init__(
        self, *, login: str = "sandbox-bot", token: str | None = None, html_base: str = "https://github.example"
    ) -> None:
        self.login = login  # the token's user: author of what it creates
        self.token = token  # when set, any other Authorization is a 401
        self.html_base = html_base
        self.repos: dict[str, _Repo] = {}
        self.comments: dict[int, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self._failures: list[_Failure] = []
        self._next_comment = 1001
        self._lock = threading.RLock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----

    def start(self) -> FakeGitHub:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                fake._dispatch(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-github", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeGitHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The API base, as https://api.github.com."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def enterprise_url(self) -> str:
        """The API base as GitHub Enterprise has it, https://HOST/api/v3."""
        return f"{self.url}/api/v3"

    # ---- set-up and inspection for tests ----

    def repo(self, slug: str) -> _Repo:
        with self._lock:
            return self.repos.setdefault(slug, _Repo())

    def add_issue(
        self, slug: str, title: str = "An issue", body: str = "", labels: list[str] | None = None, user: str = "alice"
    ) -> dict[str, Any]:
        with self._lock:
            r = self.repo(slug)
            n = r.next_number
            r.next_number += 1
            issue = {
                "number": n,
                "title": title,
                "body": body,
                "state": "open",
                "user": {"login": user},
                "labels": [{"name": x} for x in labels or []],
                "html_url": f"{self.html_base}/{slug}/issues/{n}",
            }
            r.issues[n] = issue
            return issue

    def add_pull(
        self, slug: str, head: str, base: str = "main", title: str = "A PR", body: str = "", user: str = "alice"
    ) -> dict[str, Any]:
        """An open pull request made by someone else, as if opened before the test."""
        with self._lock:
            return self._create_pull(slug, {"title": title, "head": head, "base": base, "body": body}, user)

    def close_pull(self, slug: str, number: int) -> None:
        with self._lock:
            self.repo(slug).pulls[number]["state"] = "closed"
            self.repo(slug).issues[number]["state"] = "closed"

    def pulls(self, slug: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(p) for p in self.repo(slug).pulls.values()]

    def comments_on(self, slug: str, number: int) -> list[dict[str, Any]]:
        with self._lock:
            return [
                self._comment_view(c) for c in self.comments.values() if c["_slug"] == slug and c["_number"] == number
            ]

    def labels_of(self, slug: str, number: int) -> list[str]:
        with self._lock:
            return [x["name"] for x in self.repo(slug).issues[number]["labels"]]

    def requests_to(self, method: str, path: str) -> list[Recorded]:
        """The recorded requests with this method and path (a regular expression matched in full)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]

    def fail_next(
        self,
        n: int = 1,
        status: int = 502,
        headers: dict[str, str] | None = None,
        message: str = "Server Error",
        path: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next `n` requests (those whose path matches `path`, a regular expression, and with this
        `method`, where given) with this error instead of serving them."""
        with self._lock:
            for _ in range(n):
                self._failures.append(_Failure(status, dict(headers or {}), {"message": message}, path, method))

    def rate_limit_next(self, n: int = 1, reset_in: float = 30.0, path: str | None = None) -> int:
        """A primary rate limit: 403 with x-ratelimit-remaining 0 and the reset `reset_in` seconds from now
        (the epoch it returns)."""
        reset = int(time.time() + reset_in)
        self.fail_next(
            n,
            403,
            {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
            "API rate limit exceeded for user ID 1.",
            path,
        )
        return reset

    def too_many_next(self, n: int = 1, retry_after: int = 5, path: str | None = None) -> None:
        """429 with retry-after, as a secondary rate limit."""
        self.fail_next(n, 429, {"retry-after": str(retry_after)}, "You have exceeded a secondary rate limit.", path)

    # ---- serving ----

    def _dispatch(self, h: http.server.BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        path = parsed.path
        enterprise = path.startswith("/api/v3/")
        if enterprise:
            path = path[len("/api/v3") :]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = Recorded(
            method=h.command,
            path=path,
            query={k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()},
            headers={k.lower(): v for k, v in h.headers.items()},
            json=body,
            enterprise=enterprise,
        )
        with self._lock:
            self.requests.append(rec)
            status, headers, answer = self._answer(rec, raw)
            rec.status = status
        data = json.dumps(answer).encode() if answer is not None else b""
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, rec: Recorded, raw: bytes) -> tuple[int, dict[str, str], Any]:
        for i, f in enumerate(self._failures):
            if (f.paths is None or re.fullmatch(f.paths, rec.path)) and f.method in (None, rec.method):
                del self._failures[i]
                return f.status, f.headers, f.body
        if self.token is not None and rec.headers.get("authorization") not in (
            f"Bearer {self.token}",
            f"token {self.token}",
        ):
            return 401, {}, {"message": "Bad credentials"}
        if raw and rec.json is None:
            return 400, {}, {"message": "Problems parsing JSON"}
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)/(.*)", rec.path)
        if not m:
            return 404, {}, {"message": "Not Found"}
        slug, rest = m.group(1), m.group(2)
        body = rec.json if isinstance(rec.json, dict) else {}
        routes: list[tuple[str, str, Any]] = [
            ("GET", r"pulls", lambda: self._list_pulls(slug, rec.query)),
            ("POST", r"pulls", lambda: self._post_pull(slug, body)),
            ("GET", r"pulls/(\d+)", lambda n: self._get_pull(slug, n)),
            ("PATCH", r"pulls/(\d+)", lambda n: self._patch_pull(slug, n, body)),
            ("POST", r"pulls/(\d+)/requested_reviewers", lambda n: self._reviewers(slug, n, body)),
            ("GET", r"issues/(\d+)", lambda n: self._get_issue(slug, n)),
            ("GET", r"issues/(\d+)/comments", lambda n: self._list_comments(slug, n, rec.query)),
            ("POST", r"issues/(\d+)/comments", lambda n: self._post_comment(slug, n, body)),
            ("PATCH", r"issues/comments/(\d+)", lambda i: self._patch_comment(slug, i, body)),
            ("POST", r"issues/(\d+)/labels", lambda n: self._labels(slug, n, rec.json)),
        ]
        for method, pattern, handler in routes:
            mm = re.fullmatch(pattern, rest)
            if method == rec.method and mm:
                result: tuple[int, dict[str, str], Any] = handler(*(int(g) for g in mm.groups()))
                return result
        return 404, {}, {"message": "Not Found"}

    @staticmethod
    def _invalid(message: str, field_: str = "body") -> tuple[int, dict[str, str], Any]:
        return (
            422,
            {},
            {
                "message": "Validation Failed",
                "errors": [{"resource": "Issue", "field": field_, "code": "custom", "message": message}],
                "documentation_url": "https://docs.github.com/rest",
            },
        )

    # pull requests

    def _create_pull(self, slug: str, body: dict[str, Any], user: str) -> dict[str, Any]:
        r = self.repo(slug)
        n = r.next_number
        r.next_number += 1
        owner = slug.split("/")[0]
        head = str(body["head"])
        ref = head.split(":", 1)[1] if ":" in head else head
        pr = {
            "number": n,
            "html_url": f"{self.html_base}/{slug}/pull/{n}",
            "url": f"{self.url}/repos/{slug}/pulls/{n}",
            "state": "open",
            "title": body["title"],
            "body": body.get("body") or "",
            "draft": bool(body.get("draft", False)),
            "head": {"ref": ref, "label": f"{owner}:{ref}"},
            "base": {"ref": body["base"]},
            "user": {"login": user},
            "requested_reviewers": [],
            "requested_teams": [],
        }
        r.pulls[n] = pr
        r.issues[n] = {
            "number": n,
            "title": pr["title"],
            "body": pr["body"],
            "state": "open",
            "user": {"login": user},
            "labels": [],
            "html_url": pr["html_url"],
            "pull_request": {"url": pr["url"]},
        }
        return pr

    def _pull_view(self, slug: str, pr: dict[str, Any]) -> dict[str, Any]:
        return {**pr, "labels": self.repo(slug).issues[pr["number"]]["labels"]}

    def _list_pulls(self, slug: str, query: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        state = query.get("state", "open")
        head = query.get("head")
        out = []
        for pr in self.repo(slug).pulls.values():
            if state != "all" and pr["state"] != state:
                continue
            if head is not None and head not in (pr["head"]["label"], pr["head"]["ref"]):
                continue
            out.append(self._pull_view(slug, pr))
        return 200, {}, out

    def _post_pull(self, slug: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        for key in ("title", "head", "base"):
            if not body.get(key):
                return self._invalid(f"{key} wasn't supplied.", key)
        if len(str(body.get("body") or "")) > BODY_LIMIT:
            return self._invalid(f"body is too long (maximum is {BODY_LIMIT} characters)")
        owner = slug.split("/")[0]
        head = str(body["head"])
        label = head if ":" in head else f"{owner}:{head}"
        for pr in self.repo(slug).pulls.values():
            if pr["state"] == "open" and pr["head"]["label"] == label:
                return self._invalid(f"A pull request already exists for {label}.", "head")
        return 201, {}, self._pull_view(slug, self._create_pull(slug, body, self.login))

    def _get_pull(self, slug: str, n: int) -> tuple[int, dict[str, str], Any]:
        pr = self.repo(slug).pulls.get(n)
        return (200, {}, self._pull_view(slug, pr)) if pr else (404, {}, {"message": "Not Found"})

    def _patch_pull(self, slug: str, n: int, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        pr = self.repo(slug).pulls.get(n)
        if pr is None:
            return 404, {}, {"message": "Not Found"}
        if len(str(body.get("body") or "")) > BODY_LIMIT:
            return self._invalid(f"body is too long (maximum is {BODY_LIMIT} characters)")
        for key in ("title", "body", "state"):
            if key in body:
                pr[key] = body[key]
                self.repo(slug).issues[n][key] = body[key]
        if "base" in body:
            pr["base"] = {"ref": body["base"]}
        return 200, {}, self._pull_view(slug, pr)

    def _reviewers(self, slug: str, n: int, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        pr = self.repo(slug).pulls.get(n)
        if pr is None:
            return 404, {}, {"message": "Not Found"}
        users = [str(u) for u in body.get("reviewers") or []]
        if pr["user"]["login"] in users:
            return 422, {}, {"message": "Review cannot be requested from pull request author."}
        for u in users:
            if u not in [x["login"] for x in pr["requested_reviewers"]]:
                pr["requested_reviewers"].append({"login": u})
        for t in body.get("team_reviewers") or []:
            if t not in [x["slug"] for x in pr["requested_teams"]]:
                pr["requested_teams"].append({"slug": str(t)})
        return 201, {}, self._pull_view(slug, pr)

    # issues, comments, labels

    def _get_issue(self, slug: str, n: int) -> tuple[int, dict[str, str], Any]:
        issue = self.repo(slug).issues.get(n)
        return (200, {}, issue) if issue else (404, {}, {"message": "Not Found"})

    def _comment_view(self, c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if not k.startswith("_")}

    def _list_comments(self, slug: str, n: int, query: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        if n not in self.repo(slug).issues:
            return 404, {}, {"message": "Not Found"}
        per_page = min(100, int(query.get("per_page", "30")))
        page = max(1, int(query.get("page", "1")))
        mine = [self._comment_view(c) for c in self.comments.values() if c["_slug"] == slug and c["_number"] == n]
        return 200, {}, mine[(page - 1) * per_page : page * per_page]

    def _post_comment(self, slug: str, n: int, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        issue = self.repo(slug).issues.get(n)
        if issue is None:
            return 404, {}, {"message": "Not Found"}
        text = body.get("body")
        if not isinstance(text, str) or not text:
            return self._invalid("body wasn't supplied.")
        if len(text) > BODY_LIMIT:
            return self._invalid(f"body is too long (maximum is {BODY_LIMIT} characters)")
        cid = self._next_comment
        self._next_comment += 1
        c = {
            "id": cid,
            "body": text,
            "user": {"login": self.login},
            "html_url": f"{issue['html_url']}#issuecomment-{cid}",
            "_slug": slug,
            "_number": n,
        }
        self.comments[cid] = c
        return 201, {}, self._comment_view(c)

    def _patch_comment(self, slug: str, cid: int, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        c = self.comments.get(cid)
        if c is None or c["_slug"] != slug:
            return 404, {}, {"message": "Not Found"}
        text = body.get("body")
        if not isinstance(text, str) or not text:
            return self._invalid("body wasn't supplied.")
        if len(text) > BODY_LIMIT:
            return self._invalid(f"body is too long (maximum is {BODY_LIMIT} characters)")
        c["body"] = text
        return 200, {}, self._comment_view(c)

    def _labels(self, slug: str, n: int, payload: Any) -> tuple[int, dict[str, str], Any]:
        issue = self.repo(slug).issues.get(n)
        if issue is None:
            return 404, {}, {"message": "Not Found"}
        names = payload.get("labels") if isinstance(payload, dict) else payload
        if not isinstance(names, list):
            return self._invalid("labels wasn't supplied.", "labels")
        for name in names:
            if name not in [x["name"] for x in issue["labels"]]:
                issue["labels"].append({"name": str(name)})
        return 200, {}, issue["labels"]


@pytest.fixture(name="fake_github")
def fake_github_fixture() -> Iterator[FakeGitHub]:
    """`fake_github`: a started FakeGitHub, stopped after the test. To use it in a test module:
    `from .fake_github import fake_github_fixture  # noqa: F401 (a fixture)`."""
    with FakeGitHub() as gh:
        yield gh
