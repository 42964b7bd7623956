"""The GitHub client against the local GitHub-compatible server: API base derivation, retries on rate limits
and server errors (with an injected sleep: nothing really waits), comments kept up to date, pull requests
opened or updated, bodies cut to GitHub's limit, and the policy keys behind draft, labels and reviewers."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from agent_sandbox.config.policy import GitSettings
from agent_sandbox.git.github import BODY_LIMIT, GitHub, GitHubError, api_base_for, fit_body, marker_comment
from agent_sandbox.git.handoff import HandoffError, open_pull_request

from .fake_github import (
    FakeGitHub,
    fake_github_fixture,  # noqa: F401 (a fixture)
)

SLUG = "acme/widgets"


@pytest.fixture(autouse=True)
def _no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_GITHUB_API", raising=False)
    monkeypatch.delenv("SANDBOX_GITHUB_API_URL", raising=False)


class Sleeps:
    """A sleep that records what it was asked and moves a fake clock instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.now = time.time()

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def client(gh: FakeGitHub, sleeps: Sleeps, max_wait_s: float = 120.0, enterprise: bool = False) -> GitHub:
    base = gh.enterprise_url if enterprise else gh.url
    return GitHub("t0ken", base, max_wait_s=max_wait_s, sleep=sleeps, clock=sleeps.clock)


# ---- the API base ----


@pytest.mark.parametrize(
    ("remote", "base"),
    [
        ("https://github.com/acme/widgets.git", "https://api.github.com"),
        ("https://x-access-token:abc@github.com/acme/widgets", "https://api.github.com"),
        ("git@github.com:acme/widgets.git", "https://api.github.com"),
        ("ssh://git@github.com/acme/widgets.git", "https://api.github.com"),
        ("ssh://git@ssh.github.com:443/acme/widgets.git", "https://api.github.com"),
        ("https://ghe.corp.example/acme/widgets.git", "https://ghe.corp.example/api/v3"),
        ("https://ghe.corp.example:8443/acme/widgets", "https://ghe.corp.example:8443/api/v3"),
        ("git@ghe.corp.example:acme/widgets.git", "https://ghe.corp.example/api/v3"),
        ("ssh://git@ghe.corp.example:2222/acme/widgets.git", "https://ghe.corp.example/api/v3"),
        ("/srv/git/widgets.git", "https://api.github.com"),
        (None, "https://api.github.com"),
    ],
)
def test_api_base_from_the_remote(remote: str | None, base: str) -> None:
    assert api_base_for(remote) == base


def test_api_base_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    ghe = "https://ghe.corp.example/acme/widgets.git"
    assert api_base_for(ghe, "http://127.0.0.1:9/api/v3/") == "http://127.0.0.1:9/api/v3"
    monkeypatch.setenv("SANDBOX_GITHUB_API_URL", "http://legacy.example")
    assert api_base_for(ghe) == "http://legacy.example"
    monkeypatch.setenv("SANDBOX_GITHUB_API", "http://new.example/")
    assert api_base_for(ghe) == "http://new.example"
    assert api_base_for(ghe, "http://arg.example") == "http://arg.example"


# ---- retries ----


def test_429_retry_after_is_honoured(fake_github: FakeGitHub) -> None:
    sleeps = Sleeps()
    fake_github.add_issue(SLUG)
    fake_github.too_many_next(2, retry_after=7)
    url = client(fake_github, sleeps).upsert_comment(SLUG, 1, "status", "hi")
    assert url.endswith("#issuecomment-1001")
    assert sleeps.waits == [7.0, 7.0]
    assert [r.status for r in fake_github.requests] == [429, 429, 200, 201]


def test_403_rate_limit_waits_for_the_reset(fake_github: FakeGitHub) -> None:
    sleeps = Sleeps()
    fake_github.add_issue(SLUG)
    start = sleeps.now
    reset = fake_github.rate_limit_next(1, reset_in=40)
    client(fake_github, sleeps).comment(SLUG, 1, "hi")
    (wait,) = sleeps.waits
    assert wait == pytest.approx(reset - start + 1, abs=0.01)  # to the reset, and a second more
    assert 35 < wait <= 42
    assert fake_github.requests[0].status == 403 and fake_github.requests[1].status == 201


def test_5xx_backs_off_and_succeeds(fake_github: FakeGitHub) -> None:
    sleeps = Sleeps()
    fake_github.fail_next(3, 502)
    assert client(fake_github, sleeps).find_open_pr(SLUG, "b") is None
    assert sleeps.waits == [1.0, 2.0, 4.0]


def test_gives_up_within_max_wait_and_says_when_to_retry(fake_github: FakeGitHub) -> None:
    sleeps = Sleeps()
    fake_github.rate_limit_next(5, reset_in=3600)
    with pytest.raises(GitHubError) as info:
        client(fake_github, sleeps, max_wait_s=120).find_open_pr(SLUG, "b")
    assert sleeps.waits == []  # an hour away: not worth waiting at all
    assert info.value.status == 403 and isinstance(info.value, HandoffError)
    assert "rate limit" in info.value.message and "retry after" in info.value.message and "UTC" in info.value.message


def test_total_wait_is_bounded(fake_github: FakeGitHub) -> None:
    sleeps = Sleeps()
    fake_github.fail_next(20, 503)
    with pytest.raises(GitHubError) as info:
        client(fake_github, sleeps, max_wait_s=20).find_open_pr(SLUG, "b")
    assert sum(sleeps.waits) <= 20 and sleeps.waits == [1.0, 2.0, 4.0, 8.0]
    assert info.value.status == 503


def test_a_client_error_is_not_retried(fake_github: FakeGitHub) -> None:
    sleeps = Sleeps()
    with pytest.raises(GitHubError) as info:
        client(fake_github, sleeps).comment(SLUG, 99, "hi")  # no such issue
    assert info.value.status == 404 and sleeps.waits == [] and len(fake_github.requests) == 1


def test_unreachable_is_an_error_not_a_hang() -> None:
    with FakeGitHub() as gh:
        base = gh.url
    sleeps = Sleeps()
    with pytest.raises(GitHubError) as info:
        GitHub("t", base, max_wait_s=5, sleep=sleeps, clock=sleeps.clock).find_open_pr(SLUG, "b")
    assert info.value.status is None and sum(sleeps.waits) <= 5


# ---- comments ----


def test_upsert_comment_creates_then_edits(fake_github: FakeGitHub) -> None:
    fake_github.add_issue(SLUG)
    fake_github.add_issue(SLUG)
    gh = client(fake_github, Sleeps(), enterprise=True)
    first = gh.upsert_comment(SLUG, 1, "status", "run started")
    gh.upsert_comment(SLUG, 2, "status", "another issue")
    gh.upsert_comment(SLUG, 1, "other", "another marker")
    again = gh.upsert_comment(SLUG, 1, "status", "run ended: succeeded")
    assert again == first
    (status, other) = fake_github.comments_on(SLUG, 1)
    assert status["body"] == "run ended: succeeded\n" + marker_comment("status")
    assert other["body"].endswith("<!-- sandbox:other -->")
    assert len(fake_github.comments_on(SLUG, 2)) == 1
    assert len(fake_github.requests_to("PATCH", r"/repos/acme/widgets/issues/comments/\d+")) == 1
    assert all(r.enterprise for r in fake_github.requests)
    assert fake_github.requests[0].headers["authorization"] == "Bearer t0ken"


def test_upsert_comment_finds_its_marker_past_the_first_page(fake_github: FakeGitHub) -> None:
    fake_github.add_issue(SLUG)
    gh = client(fake_github, Sleeps())
    gh.upsert_comment(SLUG, 1, "status", "mine")
    for i in range(120):
        gh.comment(SLUG, 1, f"chatter {i}")
    # Now the marker comment is first; put it on page 2 by moving the chatter ahead of it.
    mine = fake_github.comments.pop(1001)
    fake_github.comments[1001] = mine
    gh.upsert_comment(SLUG, 1, "status", "mine, edited")
    assert len(fake_github.comments_on(SLUG, 1)) == 121
    assert fake_github.comments[1001]["body"].startswith("mine, edited")


def test_upsert_comment_fits_a_long_body(fake_github: FakeGitHub) -> None:
    fake_github.add_issue(SLUG)
    client(fake_github, Sleeps()).upsert_comment(SLUG, 1, "status", "y" * 70_000)
    (c,) = fake_github.comments_on(SLUG, 1)
    assert len(c["body"]) <= BODY_LIMIT and c["body"].endswith(marker_comment("status"))


# ---- pull requests ----


def test_open_then_update_pr(fake_github: FakeGitHub) -> None:
    gh = client(fake_github, Sleeps())
    r = gh.open_or_update_pr(
        SLUG,
        "sandbox/fix",
        "main",
        "Fix it",
        "report 1",
        draft=True,
        labels=["sandbox", "bot"],
        reviewers=["bob", "acme/core"],
    )
    assert (r.number, r.created, r.problems) == (1, True, ())
    assert r.url == "https://github.example/acme/widgets/pull/1"
    (post,) = fake_github.requests_to("POST", "/repos/acme/widgets/pulls")
    assert post.json == {"title": "Fix it", "head": "sandbox/fix", "base": "main", "body": "report 1", "draft": True}
    assert fake_github.labels_of(SLUG, 1) == ["sandbox", "bot"]
    (reviewers,) = fake_github.requests_to("POST", "/repos/acme/widgets/pulls/1/requested_reviewers")
    assert reviewers.json == {"reviewers": ["bob"], "team_reviewers": ["core"]}

    # A rerun of the same branch: the body is replaced and the new run summarised in a comment, no 422.
    r2 = gh.open_or_update_pr(
        SLUG,
        "sandbox/fix",
        "main",
        "Fix it again",
        "report 2",
        draft=True,
        labels=["sandbox"],
        reviewers=["bob"],
        note="run 2",
    )
    assert (r2.number, r2.created, r2.url) == (1, False, r.url)
    (pr,) = fake_github.pulls(SLUG)
    assert pr["body"] == "report 2" and pr["title"] == "Fix it"  # the title is people's to edit
    assert [c["body"] for c in fake_github.comments_on(SLUG, 1)] == ["run 2"]
    assert len(fake_github.requests_to("POST", "/repos/acme/widgets/pulls")) == 1
    assert len(fake_github.requests_to("POST", r"/repos/acme/widgets/pulls/\d+/requested_reviewers")) == 1


def test_a_closed_pr_does_not_count(fake_github: FakeGitHub) -> None:
    gh = client(fake_github, Sleeps())
    old = gh.open_or_update_pr(SLUG, "b", "main", "t", "one")
    fake_github.close_pull(SLUG, old.number)
    new = gh.open_or_update_pr(SLUG, "b", "main", "t", "two")
    assert new.created and new.number != old.number


def test_a_pr_opened_meanwhile_is_updated(fake_github: FakeGitHub) -> None:
    """Someone opens the pull request between our look and our POST: GitHub's 422 turns into an update."""
    gh = client(fake_github, Sleeps())
    real_find = gh.find_open_pr
    calls = []

    def racing_find(slug: str, head: str) -> object:
        calls.append(head)
        if len(calls) == 1:
            fake_github.add_pull(SLUG, head, body="theirs")
            return None
        return real_find(slug, head)

    gh.find_open_pr = racing_find  # type: ignore[method-assign]
    r = gh.open_or_update_pr(SLUG, "b", "main", "t", "ours", note="n")
    assert not r.created and fake_github.pulls(SLUG)[0]["body"] == "ours"
    assert fake_github.requests_to("POST", "/repos/acme/widgets/pulls")[0].status == 422


def test_reviewer_problems_do_not_fail_the_pr(fake_github: FakeGitHub) -> None:
    gh = client(fake_github, Sleeps())
    r = gh.open_or_update_pr(SLUG, "b", "main", "t", "body", reviewers=["sandbox-bot"])  # the author itself
    assert r.created and len(r.problems) == 1 and "sandbox-bot" in r.problems[0]


def test_other_422s_are_errors(fake_github: FakeGitHub) -> None:
    with pytest.raises(GitHubError) as info:
        client(fake_github, Sleeps()).open_or_update_pr(SLUG, "b", "main", "", "body")
    assert info.value.status == 422 and "title" in info.value.message


def test_open_pull_request_uses_the_remote_and_the_override(fake_github: FakeGitHub, monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_GITHUB_API", fake_github.enterprise_url)
    r = open_pull_request(
        slug=SLUG,
        head="b",
        base="main",
        title="t",
        body="z" * 100_000,
        token="t0ken",
        remote="https://github.com/acme/widgets.git",
        labels=["sandbox"],
        full_report="`/runs/r1/report.md` (`sandbox show r1`)",
    )
    assert r.created
    (post,) = fake_github.requests_to("POST", "/repos/acme/widgets/pulls")
    assert post.enterprise and len(post.json["body"]) <= BODY_LIMIT
    assert "`sandbox show r1`" in post.json["body"].splitlines()[-1]


def test_an_enterprise_remote_posts_under_api_v3(fake_github: FakeGitHub) -> None:
    # The fake stands for a GitHub Enterprise host: its remote URL alone leads to its /api/v3.
    remote = f"{fake_github.url}/acme/widgets.git"
    assert api_base_for(remote) == fake_github.enterprise_url
    r = open_pull_request(slug=SLUG, head="b", base="main", title="t", body="b", token="t0ken", remote=remote)
    assert r.created and all(x.enterprise for x in fake_github.requests)


# ---- bodies ----


def test_fit_body() -> None:
    assert fit_body("short", "x") == "short"
    exact = "a" * BODY_LIMIT
    assert fit_body(exact, None) == exact
    long = "\n".join(f"line {i} " + "x" * 90 for i in range(2000))
    cut = fit_body(long, "`/state/runs/r1/report.md` (`sandbox show r1`)")
    assert len(cut) <= BODY_LIMIT
    last = cut.rstrip("\n").splitlines()[-1]
    assert "cut" in last and "`sandbox show r1`" in last
    body_lines = cut.split("\n\n---\n")[0].splitlines()
    assert body_lines[-1] in long.splitlines()  # cut at a line end, not mid-line


def test_fit_body_closes_an_open_fence() -> None:
    long = "intro\n```\n" + "code line\n" * 10_000
    cut = fit_body(long, None)
    assert len(cut) <= BODY_LIMIT and cut.split("\n\n---\n")[0].count("```") == 2


# ---- the policy keys ----


def test_git_settings_pr_keys() -> None:
    g = GitSettings(pr_draft=True, pr_labels=["sandbox"], pr_reviewers=["bob", "acme/core-team"])
    assert g.pr_draft and g.pr_labels == ["sandbox"] and g.pr_reviewers == ["bob", "acme/core-team"]
    d = GitSettings()
    assert (d.pr_draft, d.pr_labels, d.pr_reviewers) == (False, [], [])
    with pytest.raises(ValidationError, match="not a GitHub user"):
        GitSettings(pr_reviewers=["bob smith"])
    with pytest.raises(ValidationError, match="not a GitHub label"):
        GitSettings(pr_labels=["x" * 51])
    with pytest.raises(ValidationError):
        GitSettings(pr_label=["typo"])  # type: ignore[call-arg]
