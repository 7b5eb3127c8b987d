"""`raytrain submit` against a head started like a real one (`ray start --head --block`, token authentication on,
every port explicit): a training job is submitted, refused a twin, stopped, resubmitted and resumed, inspected and
listed; bad addresses, job ids and tokens end in one-line errors."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from raytrain.cli import main
from raytrain.cluster.jobs import JobClient
from raytrain.cluster.local_head import LocalHead, free_ports
from tests.conftest import raytrain_at_once
from tests.integration.test_train import overrides, registered_step

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Head:
    url: str
    token_path: Path


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    """A head with token authentication and its own token file (`raytrain.cluster.local_head`: explicit ports,
    private temp dir, ended by SIGTERM to the process it started). On SIGTERM a head first drains its node for up
    to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s, for Serve replicas); after this module's jobs it never finishes
    draining and waits all of it (a head that ran nothing stops in 2 s). Nothing here is served: no drain. Its jobs
    keep Ray Train's default 2 s controller poll, which tests/conftest.py shortens: a worker's report of a checkpoint
    waits for the poll to take the one before, so at 2 s the 16-step run below is still training when it is
    stopped after its first checkpoint, as a long run would be (at 0.5 s it finished before the stop landed)."""
    token_path = tmp_path_factory.mktemp("head") / "token"
    token_path.write_text(secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="2")
    with LocalHead(num_cpus=4, object_store_bytes=200 * 2**20, env=env) as url:
        yield Head(url, token_path)


@pytest.fixture
def client_env(head: Head, monkeypatch) -> Head:
    """The caller holds the token in a file named by RAY_AUTH_TOKEN_PATH and sets no RAY_AUTH_MODE."""
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    return head


def raytrain(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(argv))
        status = 0
    except SystemExit as e:
        status = e.code or 0
    out = capsys.readouterr()
    return status, out.out, out.err


def test_a_stopped_run_resubmitted_resumes(client_env, capsys, tmp_path, monkeypatch,
                                           tokenizer_dir) -> None:  # noqa: F811
    """Submit without waiting, refuse a second job for the same run while the first is active, stop it after its
    first checkpoint, then submit the identical command again and follow it: attempt 2 resumes the run."""
    monkeypatch.setenv("WANDB_API_KEY", "secret-from-the-callers-env")
    command = ["--address", client_env.url, f"python={sys.executable}", "--", "train",
               *overrides(tmp_path, tokenizer_dir, "sub", "trainer.max_steps=16", "trainer.checkpoint_every=4",
                          'tracking.tags=["two words", "x"]')]
    status, out, _ = raytrain(capsys, "submit", "--no-wait", *command)
    assert status == 0 and json.loads(out) == {"job": "sub-a1", "run": "sub", "address": client_env.url}
    status, _, err = raytrain(capsys, "submit", "--no-wait", *command)
    assert status == 2 and "run sub is still" in err and "as job sub-a1" in err

    deadline = time.monotonic() + 600
    while registered_step(tmp_path / "sub") is None and time.monotonic() < deadline:
        time.sleep(0.2)
    status, out, _ = raytrain(capsys, "submit", "stop", "sub-a1", "--address", client_env.url)
    stopped = json.loads(out)
    assert status == 0 and stopped["was_running"] and stopped["status"] == "STOPPED", stopped
    resumed_from = registered_step(tmp_path / "sub")

    status, out, err = raytrain(capsys, "submit", *command)
    assert status == 0, err
    assert "submitted job sub-a2" in err and "job sub-a2 SUCCEEDED" in err
    assert f"resumed run sub at step {resumed_from}" in out and "step 16/16" in out

    status, out, _ = raytrain(capsys, "submit", "status", "sub-a1", "--address", client_env.url)
    described = json.loads(out)
    assert described["status"] == "STOPPED" and described["run"] == "sub" and described["command"] == "train"
    assert "'tracking.tags=[\"two words\", \"x\"]'" in described["entrypoint"]  # quoted, reached Hydra intact
    assert "secret-from-the-callers-env" not in out
    assert JobClient(client_env.url).info("sub-a2").runtime_env["env_vars"]["WANDB_API_KEY"] == \
        "secret-from-the-callers-env"
    status, out, _ = raytrain(capsys, "submit", "logs", "sub-a1", "--address", client_env.url)
    assert status == 0 and "Running entrypoint for job sub-a1" in out and "step 16/16" not in out
    status, out, _ = raytrain(capsys, "submit", "list", "--address", client_env.url)
    assert {j["job"]: j["status"] for j in json.loads(out)["jobs"]} == {"sub-a1": "STOPPED", "sub-a2": "SUCCEEDED"}


def test_cluster_errors_are_one_line(client_env, tmp_path) -> None:
    url = client_env.url
    unreachable = f"http://127.0.0.1:{free_ports(1)[0]}"
    no_token = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(tmp_path)}
    cases = [  # (arguments of `raytrain submit`, its environment, what its one line says); none changes the head
        (["status", "nope-a1", "--address", url], os.environ, f"no job 'nope-a1' on {url}"),
        (["stop", "nope-a1", "--address", url], os.environ, "no job 'nope-a1'"),
        (["resume", "nope", "--address", url], os.environ, "no job of run 'nope'"),
        (["list", "--address", unreachable], os.environ, f"cannot reach the Ray dashboard at {unreachable}"),
        (["list", "--address", url], {**os.environ, "RAY_AUTH_TOKEN": "wrong"}, "rejected the token"),
        (["list", "--address", url], no_token, "requires a token"),
    ]
    runs = raytrain_at_once(*(["submit", *argv] for argv, _, _ in cases), envs=[env for _, env, _ in cases])
    for (argv, _, message), out in zip(cases, runs):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("raytrain: error: "), (argv, out.stderr)
        assert message in lines[0], (argv, lines[0])
