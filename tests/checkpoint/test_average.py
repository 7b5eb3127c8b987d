"""Checkpoint averaging over a run's registered checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from raytrain.checkpoint.average import average
from raytrain.checkpoint.hf import CheckpointError, load_pretrained, model_state, save_pretrained
from raytrain.models.decoder import build_decoder


@pytest.fixture
def run_dir(micro_cfg, tokenizer, tmp_path):
    from raytrain.data.tokenizer import to_files

    for step, seed in ((10, 0), (20, 1), (30, 2), (40, 3)):
        torch.manual_seed(seed)
        model = build_decoder(micro_cfg)
        save_pretrained(tmp_path / f"step{step:09d}" / "model", micro_cfg, model_state(model), to_files(tokenizer),
                        {"step": step, "run": "r"})
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "step000000030"}}))  # 40 never registered
    return tmp_path


def test_average_is_the_mean_of_the_last_k_registered_checkpoints(run_dir, tmp_path) -> None:
    out = average(run_dir, 2, tmp_path / "avg")
    avg = model_state(load_pretrained(out).model)
    a, b = (model_state(load_pretrained(run_dir / f"step{s:09d}").model) for s in (20, 30))
    for name in avg:
        torch.testing.assert_close(avg[name], (a[name] + b[name]) / 2)
    assert load_pretrained(out).meta["averaged_steps"] == [20, 30]
    assert load_pretrained(out).tokenizer is not None


def test_spacing_and_too_few_checkpoints(run_dir, tmp_path) -> None:
    assert load_pretrained(average(run_dir, 1, tmp_path / "a", every=20)).meta["averaged_steps"] == [20]
    with pytest.raises(CheckpointError, match="has 3 eligible checkpoints; k=5"):
        average(run_dir, 5, tmp_path / "b")
