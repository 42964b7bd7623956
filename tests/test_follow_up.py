"""Follow-up runs without Docker: the context built from earlier runs (order, bound), the refusals before
anything exists, the policy and limits a follow-up inherits, and the request field and its option."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent_sandbox.cli.main import main, run
from agent_sandbox.config.policy import load_policy
from agent_sandbox.errors import UsageError
from agent_sandbox.git.checkout import open_repo
from agent_sandbox.git.gate import Violation
from agent_sandbox.run import followup, runner
from agent_sandbox.run.followup import MAX_CONTEXT_BYTES, Step, build_context
from agent_sandbox.run.request import RunRequest
from agent_sandbox.run.spec import RunSpec, RunSummary
from agent_sandbox.store import RunStore


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(d))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-unit")
    return d


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "--initial-branch", "main")
    git(r, "config", "user.name", "t")
    git(r, "config", "user.email", "t@example.invalid")
    (r / "a.py").write_text("x = 1\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "initial")
    return r


def commit_on(repo: Path, branch: str, start: str, path: str, text: str, subject: str) -> str:
    """A commit on `branch` (created at `start` when new), made without touching the working tree."""
    env_tree = git(repo, "rev-parse", f"{start}^{{tree}}")
    blob = subprocess.run(
        ["git", "-C", str(repo), "hash-object", "-w", "--stdin"], input=text, capture_output=True, text=True, check=True
    ).stdout.strip()
    index = repo / ".git" / "tmp-index"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    subprocess.run(["git", "-C", str(repo), "read-tree", env_tree], env=env, check=True)
    subprocess.run(
        ["git", "-C", str(repo), "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}"], env=env, check=True
    )
    tree = subprocess.run(
        ["git", "-C", str(repo), "write-tree"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    index.unlink()
    sha = git(repo, "commit-tree", tree, "-p", start, "-m", subject)
    git(repo, "update-ref", f"refs/heads/{branch}", sha)
    return sha


def fake_run(
    state: Path,
    repo: Path,
    run_id: str,
    task: str,
    *,
    result: str | None = "Done: x is 2 now.",
    changed: bool = True,
    follow_up: str | None = None,
    branch: str | None = None,
    finished: bool = True,
    violations: bool = False,
    budget_usd: float = 0.75,
    policy: str = "default",
) -> RunSpec:
    """The records a finished run leaves in its run directory (spec, summary, the trail's result event), and
    its branch with one commit when it changed something."""
    run_dir = state / "runs" / run_id
    run_dir.mkdir(parents=True)
    branch = branch or f"sandbox/{run_id}"
    base = git(repo, "rev-parse", f"refs/heads/{branch}" if follow_up else "main")
    pol, source = load_policy(policy)
    pol = pol.model_copy(update={"limits": pol.limits.model_copy(update={"budget_usd": budget_usd})})
    spec = RunSpec(
        run_id=run_id,
        repo=str(repo.resolve()),
        base_ref=branch if follow_up else "HEAD",
        base_commit=base,
        branch=branch,
        task=task + ("\n\n" + followup.BEGIN + "\n...\n" + followup.END if follow_up else ""),
        instruction=task if follow_up else None,
        follow_up=follow_up,
        policy=pol,
        policy_source=source,
        model="claude-test-model",
        pr_base="main",
        title=f"title of {run_id}",
        run_dir=str(run_dir),
    )
    (run_dir / "spec.json").write_text(spec.model_dump_json())
    head = commit_on(repo, branch, base, f"{run_id}.txt", "work\n", f"work of {run_id}") if changed else None
    if result is not None:
        line = {"seq": 9, "type": "result", "source": "agent", "payload": {"result": result, "subtype": "success"}}
        (run_dir / "audit.jsonl").write_text('{"seq":1,"type":"run_started","payload":{}}\n' + json.dumps(line) + "\n")
    if finished:
        summary = RunSummary(
            id=run_id,
            status="succeeded",  # type: ignore[arg-type]
            reason="completed",  # type: ignore[arg-type]
            message="the agent finished",
            repo=str(repo.resolve()),
            branch=branch if changed else None,
            base_commit=base,
            follow_up=follow_up,
            head=head,
            commits=[head] if head else [],
            files_changed=[f"{run_id}.txt"] if changed else [],
            duration_s=1.0,
            exit_code=0,
            run_dir=str(run_dir),
            violations=[Violation(rule="forbidden_path", path="x", detail="no")] if violations else [],
        )
        (run_dir / "summary.json").write_text(summary.model_dump_json())
    return spec


def request(repo: Path, follow_up: str, **kw: Any) -> RunRequest:
    return RunRequest(repo=str(repo), task="now also do y", follow_up=follow_up, **kw)


class _Untouchable:
    """A backend that fails the test if a refused follow-up ever reaches the machine."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the backend was used ({name}) for a refused request")


def refused(req: RunRequest, state: Path) -> str:
    before = sorted(p.name for p in (state / "runs").iterdir()) if (state / "runs").is_dir() else []
    store_existed = (state / "runs.sqlite").exists()
    with pytest.raises(UsageError) as exc:
        runner.run_task(req, backend=_Untouchable())  # type: ignore[arg-type]
    assert exc.value.exit_code == 2
    after = sorted(p.name for p in (state / "runs").iterdir()) if (state / "runs").is_dir() else []
    assert after == before, "a refused follow-up creates no run"
    assert (state / "runs.sqlite").exists() == store_existed
    return exc.value.message


# --- the context ---------------------------------------------------------------------------------------------


def step(i: int, result: str = "result", instruction: str | None = None) -> Step:
    return Step(
        run_id=f"run-{i}",
        instruction=instruction or f"instruction {i}",
        outcome="succeeded (completed): the agent finished",
        result=f"{result} {i}",
        commits=[f"{i:012d} commit {i}"],
        files=[f"f{i}.py"],
    )


def test_context_lists_each_earlier_run_oldest_first_with_task_result_commits_and_files() -> None:
    text = build_context([step(1), step(2), step(3)], "sandbox/run-1")
    assert text.startswith(followup.BEGIN) and text.rstrip().endswith(followup.END)
    positions = [text.index(f"## Run run-{i}") for i in (1, 2, 3)]
    assert positions == sorted(positions), "newest last"
    for i in (1, 2, 3):
        assert f"> instruction {i}" in text and f"> result {i}" in text
        assert f"- {i:012d} commit {i}" in text and f"f{i}.py" in text
    assert "`sandbox/run-1`" in text
    assert "left out" not in text and "cut:" not in text


def test_context_is_bounded_dropping_the_oldest_first_and_says_so() -> None:
    steps = [step(i, result="r" * 3000) for i in range(1, 21)]
    text = build_context(steps, "sandbox/b")
    assert len(text.encode()) <= MAX_CONTEXT_BYTES
    assert "## Run run-20" in text and "## Run run-19" in text, "the newest runs are kept"
    assert "## Run run-1\n" not in text
    assert "older run(s) left out to keep this section under 16 kB" in text
    kept = [i for i in range(1, 21) if f"## Run run-{i}\n" in text]
    assert kept == list(range(kept[0], 21)), "what is kept is the newest, contiguous"


def test_a_huge_newest_run_is_shortened_not_dropped() -> None:
    big = step(2, result="é" * 100_000, instruction="do it " * 10_000)
    text = build_context([step(1), big], "sandbox/b", limit=8 * 1024)
    assert len(text.encode()) <= 8 * 1024
    assert "## Run run-2" in text and "[... cut:" in text
    assert text.rstrip().endswith(followup.END)
    # The older run is there, or the section says it was left out: never silently gone.
    assert "## Run run-1\n" in text or "1 older run(s) left out" in text


def test_a_run_without_a_final_answer_says_so() -> None:
    s = Step(run_id="r", instruction="i", outcome="killed (timeout): wall clock", result=None)
    text = followup.render_step(s)
    assert "gave no final answer" in text and "Its commits: none" in text and "killed (timeout)" in text


def test_result_text_comes_from_the_trail_else_the_stream(tmp_path: Path) -> None:
    (tmp_path / "agent-stream.jsonl").write_text(json.dumps({"type": "result", "result": "from the stream"}) + "\n")
    assert followup.result_text(tmp_path) == "from the stream"
    trail = [{"type": "result", "payload": {"result": "first"}}, {"type": "result", "payload": {"result": "last"}}]
    (tmp_path / "audit.jsonl").write_text("not json\n" + "".join(json.dumps(e) + "\n" for e in trail))
    assert followup.result_text(tmp_path) == "last"
    assert followup.result_text(tmp_path / "nowhere") is None


# --- resolving the earlier run -------------------------------------------------------------------------------


def test_a_chain_gives_every_earlier_instruction_and_result_newest_last(state: Path, repo: Path) -> None:
    fake_run(state, repo, "20260101-000000-aaaaaa", "first task", result="first result")
    branch = "sandbox/20260101-000000-aaaaaa"
    fake_run(
        state,
        repo,
        "20260101-000100-bbbbbb",
        "second task",
        result="second result",
        follow_up="20260101-000000-aaaaaa",
        branch=branch,
    )
    fake_run(
        state,
        repo,
        "20260101-000200-cccccc",
        "third task",
        result="third result",
        follow_up="20260101-000100-bbbbbb",
        branch=branch,
    )
    f = followup.resolve("20260101-000200", open_repo(repo))  # a unique prefix is enough
    assert f.earlier.run_id == "20260101-000200-cccccc"
    assert f.branch == branch and f.head == git(repo, "rev-parse", branch) and f.warnings == []
    text = f.context
    order = [
        text.index(t)
        for t in (
            "> first task",
            "> first result",
            "> second task",
            "> second result",
            "> third task",
            "> third result",
        )
    ]
    assert order == sorted(order)
    # Each run's own instruction, not the context it was given in turn.
    assert text.count(followup.BEGIN) == 1
    assert "work of 20260101-000000-aaaaaa" in text and "20260101-000200-cccccc.txt" in text


def test_a_follow_up_that_changed_nothing_can_be_followed_up_on_its_branch(state: Path, repo: Path) -> None:
    fake_run(state, repo, "r1", "first task")
    fake_run(state, repo, "r2", "looked only", changed=False, follow_up="r1", branch="sandbox/r1")
    f = followup.resolve("r2", open_repo(repo))
    assert f.branch == "sandbox/r1" and "> looked only" in f.context and "> first task" in f.context


def test_a_branch_moved_since_is_continued_from_its_tip_with_a_warning(state: Path, repo: Path) -> None:
    fake_run(state, repo, "r1", "first task")
    tip = commit_on(repo, "sandbox/r1", "sandbox/r1", "mine.txt", "by hand\n", "a commit by hand")
    f = followup.resolve("r1", open_repo(repo))
    assert f.head == tip
    assert len(f.warnings) == 1 and "has moved on since" in f.warnings[0]
    git(repo, "update-ref", "refs/heads/sandbox/r1", commit_on(repo, "tmp", "main", "z.txt", "z\n", "rewritten"))
    f = followup.resolve("r1", open_repo(repo))
    assert "was rewritten" in f.warnings[0]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no run 'nosuchrun'"),
        ("pattern", "not a run id: '*'"),
        ("other repo", "belongs to another repository"),
        ("unfinished", "has not finished"),
        ("unchanged", "changed nothing, so there is no branch to continue"),
        ("branch gone", "no longer exists"),
        ("violations", "broke the policy's git rules"),
        ("busy", "is still working on sandbox/r1"),
        ("checked out", "branch sandbox/r1 is checked out in"),
    ],
)
def test_refusals_create_nothing(state: Path, repo: Path, tmp_path: Path, case: str, expected: str) -> None:
    target = "r1"
    if case == "missing":
        target = "nosuchrun"
    elif case == "pattern":
        fake_run(state, repo, "r1", "t")
        target = "*"
    elif case == "other repo":
        other = tmp_path / "other"
        fake_run(state, repo, "r1", "t")
        spec = json.loads((state / "runs" / "r1" / "spec.json").read_text())
        spec["repo"] = str(other)
        (state / "runs" / "r1" / "spec.json").write_text(json.dumps(spec))
    elif case == "unfinished":
        fake_run(state, repo, "r1", "t", finished=False)
    elif case == "unchanged":
        fake_run(state, repo, "r1", "t", changed=False)
    elif case == "branch gone":
        fake_run(state, repo, "r1", "t")
        git(repo, "branch", "-D", "sandbox/r1")
    elif case == "checked out":
        fake_run(state, repo, "r1", "t")
        git(repo, "switch", "-q", "sandbox/r1")
    elif case == "violations":
        fake_run(state, repo, "r1", "t", violations=True)
    elif case == "busy":
        fake_run(state, repo, "r1", "t")
        store = RunStore(state / "runs.sqlite")
        store.run_started(
            {
                "id": "r9",
                "repo": str(repo.resolve()),
                "base_commit": "0" * 40,
                "branch": "sandbox/r1",
                "task": "t",
                "policy": "default",
                "policy_sha256": "0",
                "status": "running",
                "started_at": 1.0,
                "run_dir": "/x",
                "supervisor_pid": 1,
            }
        )
        store.close()
    message = refused(request(repo, target), state)
    assert expected in message, message


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"base": "main"}, "it takes no --base"),
        ({"branch": "b"}, "it takes no a branch"),
        ({"replace_branch": True}, "cannot replace it"),
        ({"follow_up": " "}, "needs a run id"),
    ],
)
def test_a_follow_up_chooses_neither_base_nor_branch(
    state: Path, repo: Path, fields: dict[str, Any], expected: str
) -> None:
    fake_run(state, repo, "r1", "t")
    req = RunRequest(repo=str(repo), task="more", **{"follow_up": "r1", **fields})
    assert expected in refused(req, state)


def test_the_task_is_still_required(state: Path, repo: Path) -> None:
    fake_run(state, repo, "r1", "t")
    req = RunRequest(repo=str(repo), follow_up="r1")
    assert "a task is required" in refused(req, state)


# --- policy, limits and the spec -----------------------------------------------------------------------------


def test_the_earlier_policy_and_limits_apply_unless_the_request_names_them(state: Path, repo: Path) -> None:
    earlier = fake_run(state, repo, "r1", "t", policy="strict", budget_usd=0.42)
    pol, source = runner._effective_policy(request(repo, "r1"), earlier)
    assert source == "preset:strict" and pol.limits.budget_usd == 0.42
    pol, _ = runner._effective_policy(request(repo, "r1", budget_usd=2.5), earlier)
    assert pol.limits.budget_usd == 2.5, "the request's own override wins"
    named = request(repo, "r1", policy="default")
    pol, source = runner._effective_policy(named, earlier)
    assert source == "preset:default" and pol.limits.budget_usd == load_policy("default")[0].limits.budget_usd


def test_the_spec_continues_the_branch_with_the_context(
    state: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_task up to the supervisor: the spec it hands over."""
    fake_run(state, repo, "r1", "first task", result="first result", policy="strict", budget_usd=0.42)
    seen: dict[str, RunSpec] = {}

    class Stop(Exception):
        pass

    class FakeSupervisor:
        def __init__(self, spec: RunSpec, *args: Any, **kw: Any) -> None:
            seen["spec"] = spec
            raise Stop

    class FakeBackend:
        def images(self, pol: Any, progress: Any) -> Any:
            return None

    monkeypatch.setattr(runner, "Supervisor", FakeSupervisor)
    monkeypatch.setattr(runner, "recover_first", lambda *a: None)
    with pytest.raises(Stop):
        runner.run_task(request(repo, "r1"), backend=FakeBackend())  # type: ignore[arg-type]
    spec = seen["spec"]
    tip = git(repo, "rev-parse", "sandbox/r1")
    assert (spec.branch, spec.base_commit, spec.base_ref, spec.replace_branch) == (
        "sandbox/r1",
        tip,
        "sandbox/r1",
        False,
    )
    assert spec.follow_up == "r1" and spec.instruction == "now also do y"
    assert spec.task.startswith("now also do y\n\n" + followup.BEGIN)
    assert "> first task" in spec.task and "> first result" in spec.task
    assert spec.policy_source == "preset:strict" and spec.policy.limits.budget_usd == 0.42
    assert (spec.model, spec.title, spec.pr_base) == ("claude-test-model", "title of r1", "main")


# --- the request field and its option ------------------------------------------------------------------------


def test_follow_up_is_a_request_field_and_a_run_option() -> None:
    field = RunRequest.model_fields["follow_up"]
    assert field.default is None and field.description and "earlier run" in field.description
    opt = next(p for p in run.params if p.name == "follow_up")
    assert opt.opts == ["--follow-up"] and opt.help == field.description and opt.metavar == "RUN_ID"
    help_text = CliRunner().invoke(main, ["run", "--help"], terminal_width=200).output
    assert "--follow-up RUN_ID" in help_text


def test_only_the_options_given_reach_the_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A follow-up inherits the earlier policy unless --policy was typed, even as its default value."""
    got: list[RunRequest] = []

    def fake_run_task(req: RunRequest, **kw: Any) -> Any:
        got.append(req)
        raise UsageError("stop here")

    monkeypatch.setattr(runner, "run_task", fake_run_task)
    cli = CliRunner()
    cli.invoke(main, ["run", "--repo", str(tmp_path), "--task", "t", "--follow-up", "r1"])
    cli.invoke(main, ["run", "--repo", str(tmp_path), "--task", "t", "--follow-up", "r1", "--policy", "default"])
    assert [r.follow_up for r in got] == ["r1", "r1"]
    assert "policy" not in got[0].model_fields_set and got[0].policy == "default"
    assert "policy" in got[1].model_fields_set


def test_a_follow_up_whose_branch_moved_meanwhile_keeps_its_work_aside(
    tmp_path: Path, repo: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two follow-ups of one run at once: the second to land is no fast-forward any more. Its work goes onto a
    branch of its own (and the summary says so) instead of being refused and dropped with its workspace."""
    from agent_sandbox.run.supervisor import Supervisor
    from tests.memory_backend import MemoryBackend

    start = git(repo, "rev-parse", "HEAD")
    branch = "sandbox/earlier"
    git(repo, "branch", branch, start)
    # This run's work, packed as the finaliser packs it: a bundle holding exactly refs/heads/<branch>.
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", "--branch", branch, str(repo), str(work))
    mine = commit_on(work, branch, start, "mine.txt", "mine\n", "this follow-up")
    bundle = tmp_path / "work.bundle"
    git(work, "bundle", "create", str(bundle), f"refs/heads/{branch}")
    # Meanwhile another follow-up landed on the branch.
    theirs = commit_on(repo, branch, start, "theirs.txt", "theirs\n", "the other follow-up")
    git(repo, "update-ref", f"refs/heads/{branch}", theirs)

    monkeypatch.setenv("SANDBOX_DISK_QUOTA", "sampled")
    spec = RunSpec(
        run_id="20261124-010000-abcdef",
        repo=str(repo),
        base_ref=branch,
        base_commit=start,
        branch=branch,
        task="more",
        policy=load_policy("default")[0],
        policy_source="preset:default",
        model="m",
        run_dir=str(state / "runs" / "20261124-010000-abcdef"),
        follow_up="20261124-000000-000000",
    )
    backend = MemoryBackend()
    sup = Supervisor(spec, open_repo(repo), backend, backend.images())
    imported = sup._import(bundle, mine)
    assert imported.branch == f"{branch}-20261124-010000-abcdef" and imported.head == mine
    assert git(repo, "rev-parse", f"refs/heads/{branch}") == theirs, "the other run's work is untouched"
    assert any("moved on while this run worked" in w for w in sup.spec.warnings)
