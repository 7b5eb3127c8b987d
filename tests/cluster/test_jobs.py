"""Job submission without a cluster: the command line reaches the job untouched, runs are named and numbered by
attempt, only the intended environment travels, the token is found where Ray looks, and bad input is named."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest

from raytrain.cli import CONF_DIR
from raytrain.cluster.jobs import (ClusterError, JobClient, Plan, SubmitConfig, auth_headers, dashboard_url, describe,
                                   entrypoint, next_submission_id, plan, runtime_env)
from raytrain.commands.submit import _split
from raytrain.config import ConfigError

SHARED = ["trainer.storage_path=/mnt/shared/runs", "tracking=online"]


def job(submission_id: str, status: str = "SUCCEEDED", entrypoint: str = "", **meta: str) -> SimpleNamespace:
    return SimpleNamespace(submission_id=submission_id, status=status, entrypoint=entrypoint, metadata=meta)


def test_the_command_after_the_separator_is_kept_verbatim() -> None:
    argv = ["--address", "http://h:8265", "pip=[x]", "--", "train", "a=b", "--", "--cfg", "job"]
    assert _split(argv) == (["--address", "http://h:8265", "pip=[x]"], ["train", "a=b", "--", "--cfg", "job"])


def test_the_entrypoint_quotes_each_override_so_hydra_sees_it_unchanged() -> None:
    overrides = ['tracking.tags=["two words", "it\'s"]', "sample.prompt=$HOME `x`", "stop=[\"\\n\\n\"]", "a=b;c"]
    line = entrypoint(SubmitConfig(python="python3"), Plan("train", overrides))
    assert shlex.split(line) == ["python3", "-m", "raytrain", "train", *overrides]


def test_a_training_run_is_named_once_and_keeps_a_given_name() -> None:
    given = plan("train", ["model=openelm_micro", "trainer.run_name=elm", *SHARED])
    assert given.run_name == "elm" and given.overrides == ["model=openelm_micro", "trainer.run_name=elm", *SHARED]
    fresh = plan("train", ["model=openelm_micro", *SHARED])
    assert fresh.run_name.startswith("openelm_micro-") and fresh.overrides[-1] == f"trainer.run_name={fresh.run_name}"
    assert plan("model-info", ["model=openelm_micro"]) == Plan("model-info", ["model=openelm_micro"])


@pytest.mark.parametrize("command, overrides, message", [
    ("train", ["tracking=online"], "trainer.storage_path=outputs/runs is relative"),
    ("train", ["trainer.storage_path=s3://b/runs"], "tracking.dir=outputs/wandb is relative"),
    ("train", ["trainer.num_wokers=2", *SHARED], "Could not override 'trainer.num_wokers': Key 'num_wokers' is not"),
    ("train", ["model=openelm_2b", *SHARED], "Could not find 'model/openelm_2b' (options: "),
    ("train", ["trainer.run_name=a/b", *SHARED], "trainer.run_name='a/b'"),
    ("trian", [], "cannot submit 'trian'; commands: "),
    ("submit", [], "cannot submit 'submit'"),
])
def test_bad_job_command_lines_fail_before_submission(command: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(command, overrides)


def test_the_runtime_env_carries_the_checkout_and_only_the_runs_variables() -> None:
    environ = {"WANDB_API_KEY": "k", "HF_TOKEN": "h", "NCCL_DEBUG": "INFO", "MY_FLAG": "1", "HOME": "/home/me",
               "AWS_SECRET_ACCESS_KEY": "s"}
    env = runtime_env(SubmitConfig(pass_env=["MY_*"], pip=["rich"]), environ)
    assert env["env_vars"] == {"WANDB_API_KEY": "k", "HF_TOKEN": "h", "NCCL_DEBUG": "INFO", "MY_FLAG": "1"}
    assert env["working_dir"] == str(CONF_DIR.parent) and ".git" in env["excludes"] and env["pip"] == ["rich"]
    with pytest.raises(ConfigError, match="is not a raytrain checkout"):
        runtime_env(SubmitConfig(working_dir="/"), environ)


def test_attempts_are_numbered_per_run_and_an_active_run_is_not_doubled() -> None:
    jobs = [job("elm-a1", "FAILED"), job("elm-a2", "STOPPED"), job("elm-x-a7"), job("raysubmit_123"), job(None)]
    assert next_submission_id(jobs, "elm") == "elm-a3"
    assert next_submission_id(jobs, "elm-x") == "elm-x-a8"
    assert next_submission_id(jobs, "new") == "new-a1"
    with pytest.raises(ClusterError, match="run elm is still RUNNING as job elm-a3; stop it first"):
        next_submission_id([*jobs, job("elm-a3", "RUNNING")], "elm")


class FakeJobs:
    def __init__(self, jobs: list[SimpleNamespace]) -> None:
        self.jobs, self.submitted = jobs, []

    def list_jobs(self) -> list[SimpleNamespace]:
        return self.jobs

    def submit_job(self, **kwargs) -> str:
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


def fake_client(jobs: list[SimpleNamespace]) -> JobClient:
    client = JobClient.__new__(JobClient)
    client.url, client.client = "http://head:8265", FakeJobs(jobs)
    return client


def test_resume_resubmits_the_last_attempts_command_as_the_next_attempt() -> None:
    client = fake_client([job("elm-a1", "FAILED", "python -m raytrain train old", raytrain_run="elm"),
                          job("elm-a2", "FAILED", "python -m raytrain train new", raytrain_run="elm")])
    assert client.resubmit(SubmitConfig(), "elm", {"WANDB_API_KEY": "k"}) == "elm-a3"
    (sent,) = client.client.submitted
    assert sent["entrypoint"] == "python -m raytrain train new" and sent["metadata"] == {"raytrain_run": "elm"}
    assert sent["runtime_env"]["env_vars"] == {"WANDB_API_KEY": "k"}
    with pytest.raises(ClusterError, match="no job of run 'other'"):
        client.resubmit(SubmitConfig(), "other", {})


def test_submit_names_the_job_after_the_run() -> None:
    client = fake_client([job("elm-a1", "STOPPED")])
    assert client.submit(SubmitConfig(), Plan("train", ["x=1"], "elm"), {}) == "elm-a2"
    assert client.submit(SubmitConfig(), Plan("model-info", []), {}) is None  # Ray picks the id
    assert client.client.submitted[0]["metadata"] == {"raytrain_command": "train", "raytrain_run": "elm"}


def test_status_never_prints_the_runtime_env() -> None:
    info = SimpleNamespace(submission_id="elm-a1", status="RUNNING", entrypoint="python -m raytrain train",
                           message="", start_time=0, end_time=None, metadata={"raytrain_run": "elm"},
                           runtime_env={"env_vars": {"WANDB_API_KEY": "k"}})
    assert "k" not in str(describe(info).values()) and describe(info)["run"] == "elm"


@pytest.mark.parametrize("env, home_token, expected", [
    ({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": "{tmp}/file"}, "home", "from-env"),
    ({"RAY_AUTH_TOKEN_PATH": "{tmp}/file"}, "home", "from-file"),
    ({}, "home", "home"),
    ({}, None, None),
    ({"RAY_AUTH_MODE": "disabled"}, "home", None),
])
def test_the_token_is_found_where_ray_looks(env, home_token, expected, tmp_path, monkeypatch) -> None:
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "file").write_text("from-file\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    if home_token:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text(home_token)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    assert auth_headers() == ({"Authorization": f"Bearer {expected}"} if expected else {})


def test_a_token_path_that_cannot_be_read_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=f"RAY_AUTH_TOKEN_PATH={tmp_path / 'missing'}: No such file"):
        auth_headers()


def test_the_dashboard_address(monkeypatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert dashboard_url(None) == "http://127.0.0.1:8265"
    assert dashboard_url("head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.com")
    assert dashboard_url(None) == "https://ray.example.com" and dashboard_url("http://h:1") == "http://h:1"


def test_train_joins_only_a_cluster_it_is_told_about(monkeypatch) -> None:
    """Without ray.address or RAY_ADDRESS (which Ray jobs set), `raytrain train` starts its own cluster instead of
    joining whichever one a `ray start` on this machine registered last; `ray.address=auto` asks for that one."""
    from raytrain.commands.train import _ray_address
    from tests.conftest import compose

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _ray_address(compose("train")) == "local"
    assert _ray_address(compose("train", ["ray.address=auto"])) == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert _ray_address(compose("train")) is None  # Ray reads RAY_ADDRESS itself
