"""CatLIP through Ray Train + DeepSpeed (2 CPU workers) with the recipe's RangeAugment and variable-resolution batches:
the run finishes, its export holds the learnt ranges and averaged BatchNorm statistics, and the raw weights moved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytrain.commands import train
from raytrain.models.vit import build_vit
from tests.conftest import compose, preset

pytestmark = pytest.mark.integration


def test_catlip_with_range_augment_and_variable_resolution_trains_through_ray(ray_cluster, tmp_path) -> None:
    result = train.run(compose("train", [
        "job=catlip", "model.range_augment=true", "data.variable_resolution=true", "data.samples=512",
        "data.min_side=32", "data.max_side=96", "trainer.micro_batch_size=16", "trainer.max_steps=4",
        "trainer.checkpoint_every=4", "trainer.log_every=2", "schedule.warmup_steps=1", "task.top_k=64",
        "task.check_captions=64", "task.ema_momentum=0.5", "tracking=disabled", f"trainer.storage_path={tmp_path}",
        "trainer.run_name=catlip"]))
    export = load_file(Path(result.checkpoint.path) / "model" / "model.safetensors")
    assert {f"augment.{op}.{end}_raw" for op in ("brightness", "contrast", "noise") for end in ("low", "high")} \
        <= export.keys()
    torch.manual_seed(0)
    start = build_vit(preset("vit_tiny")).state_dict()
    assert not torch.equal(export["stem.norm1.running_mean"], start["stem.norm1.running_mean"])  # averaged in
    assert not torch.equal(export["layers.0.attn.qkv.weight"], start["layers.0.attn.qkv.weight"])
