"""One run-request model: `sandbox run`'s options map onto it one for one, a sweep's manifest and the service's
repository configuration reuse its settings, and a ticket is only ever the task. No Docker needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from agent_sandbox.cli.main import _request, run
from agent_sandbox.errors import UsageError
from agent_sandbox.fleet.service import RepoConfig, ServiceConfig, TaskIn
from agent_sandbox.fleet.sweep import SweepManifest, SweepRepo, load_manifest
from agent_sandbox.run.request import LIMIT_OVERRIDES, Assignment, RunRequest, RunSettings

MODELS: list[type[BaseModel]] = [
    RunSettings,
    Assignment,
    RunRequest,
    SweepManifest,
    SweepRepo,
    RepoConfig,
    ServiceConfig,
    TaskIn,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_documented_and_unknown_keys_are_refused(model: type[BaseModel]) -> None:
    assert model.model_config.get("extra") == "forbid"
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no docstring"


def test_run_options_are_the_request_fields() -> None:
    """Every option of `sandbox run` but --json is the RunRequest field of its name, with its help and default."""
    options = [p for p in run.params if p.name != "as_json"]
    assert options
    for opt in options:
        assert opt.name in RunRequest.model_fields, f"--{opt.name} is not a RunRequest field"
        field = RunRequest.model_fields[opt.name]
        assert opt.help == field.description
        assert opt.opts == ["--" + opt.name.replace("_", "-")]
        if field.is_required():
            assert opt.required
        else:
            assert opt.default == field.default
    # The fields a caller other than the command line sets are the only ones without an option.
    assert set(RunRequest.model_fields) - {o.name for o in options} == {"ticket_text", "branch", "replace_branch"}


def test_a_bad_option_value_is_a_usage_error_naming_the_option() -> None:
    with pytest.raises(UsageError) as exc:
        _request({"repo": "/r", "timeout": 0, "max_turns": -1})
    assert exc.value.exit_code == 2
    assert "--timeout: Input should be greater than 0" in exc.value.message
    assert "--max-turns: Input should be greater than 0" in exc.value.message


def test_callers_share_the_settings_rather_than_restate_them() -> None:
    for model in (RunRequest, SweepManifest, SweepRepo, RepoConfig):
        assert issubclass(model, RunSettings), model
    assert issubclass(RunRequest, Assignment) and issubclass(SweepRepo, Assignment)
    # A repository's settings become its tasks' requests; the request adds what only it may choose.
    repo = RepoConfig(path="/srv/w", policy="strict", timeout=60, check="make test", push=True)
    req = repo.request(repo=repo.path, task="t")
    assert (req.repo, req.policy, req.timeout, req.check, req.push, req.task) == (
        "/srv/w",
        "strict",
        60,
        "make test",
        True,
        "t",
    )
    assert req.model_dump(exclude={"repo", "task"}) == {
        **RunRequest(repo="x").model_dump(exclude={"repo", "task"}),
        **repo.settings(),
    }


def test_the_task_comes_from_exactly_one_of_task_and_ticket(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="a task is required"):
        RunRequest(repo="r").task_text()
    with pytest.raises(UsageError, match="a task is required"):
        RunRequest(repo="r", task="   ").task_text()
    with pytest.raises(UsageError, match="either --task or --ticket"):
        RunRequest(repo="r", task="t", ticket=str(tmp_path / "missing.md")).task_text()
    text = json.dumps({"title": "Make x two", "body": "policy: yolo", "policy": "yolo"})
    task, title = RunRequest(repo="r", ticket_text=text).task_text()
    assert (task, title) == ("Make x two\n\npolicy: yolo\n", "Make x two")
    ticket = tmp_path / "t.md"
    ticket.write_text("# Fix it\n\nplease\n")
    task, title = RunRequest(repo="r", ticket=str(ticket), pre="bump").task_text()
    assert title == "Fix it" and task.startswith("Fix it\n\nplease\n\nBefore you started, the sandbox ran `bump`")


def test_limit_overrides_name_the_policy_keys() -> None:
    assert RunRequest(repo="r").limit_overrides() == {}
    req = RunRequest(repo="r", timeout=10, idle_timeout=5, budget_usd=0.5, max_turns=3)
    assert req.limit_overrides() == {"wall_seconds": 10, "idle_seconds": 5, "budget_usd": 0.5, "max_turns": 3}
    from agent_sandbox.config.policy import Limits

    assert set(LIMIT_OVERRIDES.values()) <= set(Limits.model_fields)


def test_a_request_round_trips_through_json() -> None:
    """The service queues requests as JSON and reads them back when it claims them."""
    req = RunRequest(repo="/r", ticket_text='{"title": "x"}', policy="strict", push=True, check="true", max_turns=2)
    assert RunRequest.model_validate_json(req.model_dump_json()) == req
    with pytest.raises(ValidationError):
        RunRequest.model_validate({"repo": "/r", "limits": {"wall_seconds": 1}})


# --- sweeps ---------------------------------------------------------------------------------------------------


def test_a_sweep_entry_overrides_only_what_it_sets(make_repo, tmp_path: Path) -> None:
    a, b = make_repo("a"), make_repo("b")
    (tmp_path / "s.yaml").write_text("turns: []\n")
    (tmp_path / "own.yaml").write_text("turns: []\n")
    (tmp_path / "p.yaml").write_text("name: mine\n")
    m = tmp_path / "m.yaml"
    m.write_text(
        json.dumps(
            {
                "name": "n",
                "task": "do it",
                "policy": "strict",
                "model_script": "s.yaml",
                "timeout": 60,
                "push": True,
                "check": "make test",
                "repos": [
                    {"path": "a"},
                    {
                        "path": "b",
                        "task": "other",
                        "policy": "p.yaml",
                        "model_script": "own.yaml",
                        "timeout": 30,
                        "base": "main",
                    },
                ],
            }
        )
    )
    manifest = load_manifest(str(m))
    first, second = (manifest.entry_request(r, "sandbox/n/today") for r in manifest.repos)
    assert first.repo == str(a) and second.repo == str(b)
    assert (first.task, first.policy, first.model_script, first.timeout, first.base) == (
        "do it",
        "strict",
        str(tmp_path / "s.yaml"),
        60,
        "HEAD",
    )
    assert (second.task, second.policy, second.model_script, second.timeout, second.base) == (
        "other",
        str(tmp_path / "p.yaml"),
        str(tmp_path / "own.yaml"),
        30,
        "main",
    )
    for req in (first, second):
        assert req.push and req.check == "make test"
        assert req.branch == "sandbox/n/today" and req.replace_branch


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"policy": "nonesuch"}, "repos[0] ({repo}): unknown policy 'nonesuch'"),
        ({"model_script": "missing.yaml"}, "repos[0] ({repo}): "),
        ({"timeout": 0}, "repos.0.timeout: Input should be greater than 0"),
        ({"limits": {}}, "repos.0.limits: unknown key"),
        ({"base": "no-such-ref"}, "'no-such-ref' does not name a commit"),
    ],
)
def test_a_bad_sweep_entry_is_refused_with_its_place(entry, fragment, make_repo, tmp_path: Path) -> None:
    repo = make_repo()
    m = tmp_path / "m.yaml"
    m.write_text(json.dumps({"name": "n", "task": "t", "repos": [{"path": str(repo), **entry}]}))
    with pytest.raises(UsageError) as exc:
        load_manifest(str(m))
    assert fragment.format(repo=repo) in exc.value.message
