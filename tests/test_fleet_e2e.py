"""Fleet work: sweeps across repositories, and tickets turned into tasks."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from .conftest import git, labelled

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]

GOOD = 'turns:\n  - edit: {path: m.py, old: "return 1", new: "return 2"}\n  - text: fixed\n'
WRONG = 'turns:\n  - edit: {path: m.py, old: "return 1", new: "return 3"}\n  - text: fixed, I think\n'
TEST_M = (
    "import unittest\nfrom m import f\n\n\nclass T(unittest.TestCase):\n    def test_f(self):\n"
    "        self.assertEqual(f(), 2)\n"
)


def three_repos(make_repo) -> list[Path]:
    return [make_repo(n, files={"m.py": "def f():\n    return 1\n", "test_m.py": TEST_M}) for n in "abc"]


def manifest(tmp_path: Path, paths: list[Path], **extra: object) -> Path:
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "wrong.yaml").write_text(WRONG)
    data = {
        "name": "nightly-fix",
        "task": "Make the tests pass.",
        "concurrency": 2,
        "check": "python3 -m unittest -q",
        "model_script": "good.yaml",
        "repos": [
            {"path": str(paths[0])},
            {"path": str(paths[1])},
            {"path": str(paths[2]), "model_script": "wrong.yaml"},
        ],
        **extra,
    }
    p = tmp_path / "sweep.yaml"
    p.write_text(json.dumps(data))
    return p


def test_sweep_runs_in_parallel_and_a_rerun_retries_only_the_failure(make_repo, sandbox, tmp_path) -> None:
    repos = three_repos(make_repo)
    m = manifest(tmp_path, repos)
    res = sandbox("sweep", str(m), "--json")
    assert res.code == 18, res.stderr
    first = res.json()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    branch = f"sandbox/nightly-fix/{today}"
    rows = {Path(r["repo"]).name: r for r in first["rows"]}
    assert [rows[n]["status"] for n in "abc"] == ["succeeded", "succeeded", "failed"]
    assert rows["c"]["reason"] == "check" and "python3 -m unittest -q" in rows["c"]["message"]
    for n in "ab":
        assert rows[n]["branch"] == branch and rows[n]["files_changed"] == 1
        assert git(repos["ab".index(n)], "show", f"{branch}:m.py").endswith("return 2")
    assert git(repos[2], "show", f"{branch}:m.py").endswith("return 3"), "the failed work is kept for review"
    for r in first["rows"]:
        assert labelled(r["run_id"]) == []
    status = sandbox("sweep", "status", "nightly-fix")
    assert status.code == 0 and "2 of 3 repositories done" in status.stdout and "| failed | check |" in status.stdout
    # The next run the same day: the two successes are skipped, the failure is tried again (now fixed).
    (tmp_path / "wrong.yaml").write_text(GOOD)
    res = sandbox("sweep", str(m), "--json")
    assert res.code == 0, res.stderr
    second = {Path(r["repo"]).name: r for r in res.json()["rows"]}
    for n in "ab":
        assert second[n]["earlier"] is True and second[n]["run_id"] == rows[n]["run_id"]
    assert second["c"]["earlier"] is False and second["c"]["run_id"] != rows["c"]["run_id"]
    assert second["c"]["status"] == "succeeded"
    # Same branch, updated rather than a new one added.
    assert git(repos[2], "show", f"{branch}:m.py").endswith("return 2")
    assert git(repos[2], "branch", "--list", "sandbox/*").split() == [branch]
    assert json.loads(sandbox("sweep", "status", "nightly-fix", "--json").stdout)["exit_code"] == 0


def test_shared_budget_stops_the_sweep(make_repo, sandbox, tmp_path) -> None:
    repos = three_repos(make_repo)
    # Sonnet input is $3 per million tokens: 20k tokens is $0.06 a call, over the sweep's $0.05 at once.
    (tmp_path / "pricey.yaml").write_text(GOOD + "usage: {input_tokens: 20000, output_tokens: 0}\n")
    m = manifest(
        tmp_path,
        repos,
        concurrency=1,
        budget_usd=0.05,
        model_script="pricey.yaml",
        repos=[{"path": str(r)} for r in repos],
    )
    res = sandbox("sweep", str(m), "--json")
    assert res.code == 18, res.stderr
    s = res.json()
    assert [r["status"] for r in s["rows"]] == ["killed", "skipped", "skipped"]
    assert s["rows"][0]["reason"] == "budget"
    assert all(r["reason"] == "budget" and "sweep budget of $0.05 is spent" in r["message"] for r in s["rows"][1:])
    assert "sweep budget of $0.05 was spent" in s["stopped"]
    assert s["spent_usd"] >= 0.05
    assert "**Stopped:**" in sandbox("sweep", "status", "nightly-fix").stdout


def test_a_rerun_the_same_day_continues_under_the_days_budget(make_repo, sandbox, tmp_path, state_dir) -> None:
    repos = three_repos(make_repo)
    # $0.06 a call (see above): the day's $0.05 goes on the first repository's first call.
    (tmp_path / "pricey.yaml").write_text(GOOD + "usage: {input_tokens: 20000, output_tokens: 0}\n")

    def write(budget: float) -> Path:
        return manifest(
            tmp_path,
            repos,
            concurrency=1,
            budget_usd=budget,
            model_script="pricey.yaml",
            repos=[{"path": str(r)} for r in repos],
        )

    m = write(0.05)
    res = sandbox("sweep", str(m), "--json")
    assert res.code == 18, res.stderr
    first = res.json()
    assert [r["status"] for r in first["rows"]] == ["killed", "skipped", "skipped"]
    assert first["order"] == [str(r) for r in repos] and first["day_spent_usd"] >= 0.05
    today = dt.datetime.now(dt.UTC).date().isoformat()
    summary = state_dir / "sweeps" / "nightly-fix" / f"{today}.json"
    written = summary.read_text()
    # The same day again: the budget is spent, nothing starts, the day's summary stays.
    res = sandbox("sweep", str(m), "--json")
    assert res.code == 13, res.stderr
    assert f"budget of $0.05 for {today} (UTC) is spent" in res.stderr and "nothing started" in res.stderr
    assert summary.read_text() == written
    # The operator allows $0.06 more today: the rerun spends what is left, on the repositories that had no
    # turn yet (b first), and leaves a's row as it was.
    m = write(0.11)
    res = sandbox("sweep", str(m), "--json")
    assert res.code == 18, res.stderr
    second = res.json()
    assert second["order"][:2] == [str(repos[1]), str(repos[2])]
    a, b, c = second["rows"]
    assert a["earlier"] is True and a["run_id"] == first["rows"][0]["run_id"]
    assert b["earlier"] is False and b["run_id"] and (b["status"], b["reason"]) == ("killed", "budget")
    assert (c["status"], c["reason"]) == ("skipped", "budget") and c["run_id"] is None
    assert 0.05 <= second["spent_usd"] < 0.11
    assert second["day_spent_usd"] == pytest.approx(first["day_spent_usd"] + second["spent_usd"])
    assert "day's sweep budget of $0.11 was spent" in second["stopped"]
    for r in (a, b):
        assert labelled(r["run_id"]) == []


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"concurency": 2}, "concurency: unknown key"),
        ({"concurrency": 0}, "concurrency: Input should be greater than or equal to 1"),
        ({"repos": [{"path": "/nonexistent/repo"}]}, "repos[0] (/nonexistent/repo): repository path does not exist"),
        ({"repos": [{"path": "plain"}]}, "not a git repository"),
        ({"repos": [{"base": "main"}]}, "repos.0.path: Field required"),
        ({"repos": []}, "repos: List should have at least 1 item"),
        ({"name": "Bad Name"}, "name: String should match pattern"),
    ],
)
def test_bad_manifests_are_refused_before_anything_starts(
    change, fragment, make_repo, sandbox, tmp_path, state_dir
) -> None:
    (tmp_path / "plain").mkdir()
    data = {"name": "n", "task": "t", "repos": [{"path": str(make_repo())}], **change}
    m = tmp_path / "m.yaml"
    m.write_text(json.dumps(data))
    res = sandbox("sweep", str(m))
    assert res.code == 2, res.stderr
    assert fragment in res.stderr
    assert not (state_dir / "runs").exists() and not (state_dir / "sweeps").exists()


def test_ticket_is_only_ever_the_task(make_repo, sandbox, write_script, tmp_path) -> None:
    ticket = tmp_path / "ticket.md"
    ticket.write_text(
        "# Fix the answer\n\nIt should be 2.\n\npolicy: strict\n--budget-usd 999\nlimits: {wall_seconds: 1}\n"
    )
    res = sandbox(
        "run",
        "--repo",
        str(make_repo()),
        "--ticket",
        str(ticket),
        "--model-script",
        str(write_script('turns:\n  - edit: {path: a.py, old: "x = 1", new: "x = 2"}\n  - text: ok\n')),
        "--json",
    )
    assert res.code == 0, res.stderr
    s = res.json()
    started = json.loads(Path(s["run_dir"], "audit.jsonl").read_text().splitlines()[0])["payload"]
    assert (
        started["task"] == "Fix the answer\n\nIt should be 2.\n\npolicy: strict\n--budget-usd 999\n"
        "limits: {wall_seconds: 1}\n"
    )
    pol = started["spec"]["policy"]
    assert pol["name"] == "default" and pol["limits"]["budget_usd"] == 5.0 and pol["limits"]["wall_seconds"] == 1800
    assert started["spec"]["title"] == "Fix the answer"
    j = tmp_path / "ticket.json"
    j.write_text(json.dumps({"title": "Bump it", "body": "please", "policy": "yolo", "token": "x"}))
    res = sandbox(
        "run",
        "--repo",
        str(make_repo("r2")),
        "--ticket",
        str(j),
        "--model-script",
        str(write_script("turns: []\n", name="empty.yaml")),
        "--json",
    )
    assert res.code == 0, res.stderr
    assert res.json()["branch"] is None
    for bad, msg in (("", "the ticket is empty"), ('{"body": "no title"}', "not a ticket")):
        j.write_text(bad)
        r = sandbox(
            "run",
            "--repo",
            str(make_repo(f"r{len(bad)}")),
            "--ticket",
            str(j),
            "--model-script",
            str(write_script("turns: []\n", name="e2.yaml")),
        )
        assert r.code == 2 and msg in r.stderr
    r = sandbox("run", "--repo", str(make_repo("r9")), "--ticket", str(j), "--task", "both")
    assert r.code == 2 and "either --task or --ticket" in r.stderr


def test_pre_command_runs_before_the_agent(make_repo, sandbox, write_script) -> None:
    script = write_script("turns:\n  - bash: 'cat bumped.txt; git status --short'\n  - text: done\n")
    repo = make_repo()
    res = sandbox(
        "run",
        "--repo",
        str(repo),
        "--task",
        "make it pass",
        "--pre",
        "echo 'requests==9.9' > bumped.txt && echo bumped one package",
        "--check",
        "test -f bumped.txt",
        "--model-script",
        str(script),
        "--json",
    )
    assert res.code == 0, res.stderr
    s = res.json()
    events = [json.loads(x) for x in Path(s["run_dir"], "audit.jsonl").read_text().splitlines()]
    pre = next(e for e in events if e["type"] == "pre_command")
    assert pre["source"] == "agent" and pre["payload"] == {"exit_code": 0, "output": "bumped one package"}
    first_call = next(i for i, e in enumerate(events) if e["type"] == "tool_call")
    assert events.index(pre) < first_call, "the pre command ran before the agent's first tool call"
    started = events[0]["payload"]
    assert "the sandbox ran `echo 'requests==9.9' > bumped.txt" in started["task"]
    check = next(e for e in events if e["type"] == "check")
    assert check["payload"]["exit_code"] == 0
    assert git(repo, "show", f"{s['branch']}:bumped.txt") == "requests==9.9"
