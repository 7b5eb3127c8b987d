"""Pretraining through Ray Train + DeepSpeed with 2 CPU workers (gloo): loss, ZeRO-2/3, exact resume after a
crash, NaN handling and bad input. Runs use the micro preset on the embedded corpus. A Ray Train run costs ~40 s on
2 cores, nearly all of it start-up, so one uninterrupted ZeRO-2 run (`z2_run`) serves every test that only reads it
or is refused a resume of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from raytrain.checkpoint.hf import CheckpointError, load_pretrained
from raytrain.commands import train
from raytrain.data.text import DataError
from raytrain.infer.engine import Engine, Request
from raytrain.infer.sampling import SamplingParams
from raytrain.train.checkpoint import checkpoint_name
from raytrain.train.trainer import TrainingError
from tests.conftest import REPO, compose, local_ray, raytrain_at_once

pytestmark = pytest.mark.integration


def overrides(storage: Path, tokenizer_dir: str, name: str, *extra: str) -> list[str]:
    return ["model=openelm_micro", "tracking=disabled", "sample.prompt=null", f"trainer.storage_path={storage}",
            f"trainer.run_name={name}", f"data.tokenizer={tokenizer_dir}", "data.seq_len=64",
            "data.words_per_piece=48", "data.min_tokens=16", "trainer.micro_batch_size=4", "trainer.log_every=4",
            "schedule.warmup_steps=4", "schedule.total_steps=400", *extra]


def run_train(storage: Path, tokenizer_dir: str, name: str, *extra: str):
    return train.run(compose("train", overrides(storage, tokenizer_dir, name, *extra)))


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("step*"))


def registered_step(run_dir: Path) -> int | None:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return None
    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    return int(latest["checkpoint_dir_name"].removeprefix("step")) if latest else None


@dataclass(frozen=True)
class Run:
    storage: Path  # trainer.storage_path; the run is storage / "z2"
    result: Any  # Ray Train's Result


@pytest.fixture(scope="module")
def z2_run(tmp_path_factory, tokenizer_dir) -> Run:
    """24 ZeRO-2 steps without interruption, a checkpoint every 8 (all kept). Tests that use it may try to resume
    it, and are refused (NaN, another shape, another worker count), but never add to it."""
    local_ray()  # module-scoped, so not the function-scoped `ray_cluster` fixture
    storage = tmp_path_factory.mktemp("shared")
    return Run(storage, run_train(storage, tokenizer_dir, "z2", "trainer.max_steps=24", "trainer.checkpoint_every=8"))


def test_zero2_loss_falls_checkpoints_are_complete_and_nan_keeps_the_last_good_one(z2_run: Run,
                                                                                 tokenizer_dir) -> None:
    result, storage = z2_run.result, z2_run.storage
    losses = result.metrics_dataframe["loss"].tolist()
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    step = Path(result.checkpoint.path)
    assert step.name == "step000000024"
    assert {p.name for p in (step / "rng").iterdir()} == {"rank00000.pt", "rank00001.pt"}
    assert (step / "ds" / "latest").read_text().strip() == "step000000024"
    assert json.loads((step / "raytrain.json").read_text())["world_size"] == 2

    model = load_pretrained(storage / "z2")  # the run directory resolves to its latest checkpoint
    assert model.meta["step"] == 24
    request = Request("The if", SamplingParams(max_new_tokens=8, temperature=0))
    text = Engine(model.model, model.tokenizer).generate([request])[0].text
    assert text.strip()
    cli = subprocess.run([sys.executable, "-m", "raytrain", "generate", f"checkpoint={storage / 'z2'}",
                          "prompt=The if", "temperature=0", "max_new_tokens=8"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert cli.returncode == 0 and cli.stdout.strip() == "The if" + text

    with pytest.raises(TrainingError, match="NaN/inf at step 25"):
        run_train(storage, tokenizer_dir, "z2", "trainer.max_steps=32", "trainer.checkpoint_every=1",
                  "trainer.z_loss=inf")
    assert checkpoints(storage / "z2") == ["step000000008", "step000000016", "step000000024"]
    assert registered_step(storage / "z2") == 24


def test_zero3_stops_and_resumes(ray_cluster, tmp_path, tokenizer_dir) -> None:
    common = ["trainer.zero_stage=3", "trainer.max_steps=8", "trainer.checkpoint_every=8"]
    first = run_train(tmp_path, tokenizer_dir, "z3", *common, "trainer.stop_after_steps=4")
    assert first.return_value == {"status": "stopped", "step": 4}
    shards = sorted(p.name for p in (tmp_path / "z3" / "step000000004" / "ds" / "step000000004").iterdir())
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    second = run_train(tmp_path, tokenizer_dir, "z3", *common)
    assert second.return_value == {"status": "finished", "step": 8}
    assert checkpoints(tmp_path / "z3") == ["step000000004", "step000000008"]
    weights = load_pretrained(tmp_path / "z3").model.state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_killed_run_resumes_to_the_parameters_of_an_uninterrupted_one(ray_cluster, tmp_path, tokenizer_dir,
                                                                        z2_run: Run) -> None:
    """Kill the driver of a run after its first checkpoint, rerun the same name to step k + 8, and compare with
    a run that went to step k + 8 without interruption: data position, optimizer, schedule and RNG all resume.
    That run is `z2_run` (same config; trainer.max_steps only ends a run, the schedule's length is total_steps)
    where it saved step k + 8, else one run here."""
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "raytrain", "train", f"ray.address={address}",
           *overrides(tmp_path, tokenizer_dir, "killed", "trainer.max_steps=400", "trainer.checkpoint_every=8")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while registered_step(tmp_path / "killed") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = registered_step(tmp_path / "killed")
    assert killed_at is not None and killed_at < 400
    target = [f"trainer.max_steps={killed_at + 8}", "trainer.checkpoint_every=8"]
    resumed = run_train(tmp_path, tokenizer_dir, "killed", *target)
    straight = z2_run.storage / "z2" / checkpoint_name(killed_at + 8)
    if not straight.is_dir():  # killed after step 16: past what the shared run saved
        straight = Path(run_train(tmp_path, tokenizer_dir, "straight", *target).checkpoint.path)
    a = load_file(Path(resumed.checkpoint.path) / "model" / "model.safetensors")
    b = load_file(straight / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_bad_input_is_reported_before_training(ray_cluster, tmp_path, tokenizer_dir, z2_run: Run) -> None:
    (tmp_path / "short.jsonl").write_text('{"text": "too short"}\n{"body": "wrong field"}\nnot json\n')
    with pytest.raises(DataError, match="no usable documents"):
        run_train(tmp_path, tokenizer_dir, "nodocs", f"data.path={tmp_path / 'short.jsonl'}")
    with pytest.raises(CheckpointError, match="another shape or config"):  # resuming the shared run to step 32
        run_train(z2_run.storage, tokenizer_dir, "z2", "trainer.max_steps=32", "model.d_model=32")
    with pytest.raises(CheckpointError, match="written by 2 workers; this run has 1"):
        run_train(z2_run.storage, tokenizer_dir, "z2", "trainer.max_steps=32", "trainer.num_workers=1")


CLI_ERRORS = [
    ("data.path={tmp}/missing", "data.path={tmp}/missing: no such file or directory"),
    ("data.path={tmp}", "no .txt, .jsonl, .parquet or .arrow files"),
    ("trainer.storage_path={tmp}/file/runs", "is not a writable directory"),
    ("trainer.init_from={tmp}", "trainer.init_from: checkpoint {tmp}: no config.json"),
    ("trainer.run_name=a/b", "trainer.run_name='a/b'"),
]


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """`raytrain train OVERRIDE` of every case, all at once (`raytrain_at_once`), in one directory none writes to."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "file").write_text("")
    runs = raytrain_at_once(*(["train", override.format(tmp=tmp)] for override, _ in CLI_ERRORS))
    return tmp, {override: run for (override, _), run in zip(CLI_ERRORS, runs)}


@pytest.mark.parametrize("override, message", CLI_ERRORS)
def test_cli_errors_are_one_line_with_exit_status_2(cli_errors, override: str, message: str) -> None:
    tmp, runs = cli_errors
    out = runs[override]
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("raytrain: error: ") and message.format(tmp=tmp) in lines[0]
