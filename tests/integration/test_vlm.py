"""job=vlm through Ray Train + DeepSpeed (2 CPU workers): the VLM assembled from a tower checkpoint, Stage 1
(ZeRO-2) moves only the projector and the registers, Stage 2 under ZeRO-3 starts from Stage 1's weights (registers
included) and trains the registers and the decoder with the tower still frozen (facts 8 to 10)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.commands import train
from raytrain.models.vit import ViTConfig, build_vit
from tests.conftest import compose

pytestmark = pytest.mark.integration


def weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(directory) / "model.safetensors")


def test_two_stages_freeze_then_finetune_under_zero3(ray_cluster, tmp_path, tokenizer_dir) -> None:
    tower_cfg = ViTConfig(name="tower", d_model=96, n_layers=4, n_heads=3, ffn_dim=384, num_classes=5,
                          image_size=64, pos_grid=4)
    torch.manual_seed(0)
    trunk = model_state(build_vit(tower_cfg))
    tower = save_pretrained(tmp_path / "tower", tower_cfg, trunk)
    overrides = ["job=vlm", "tracking=disabled", f"trainer.storage_path={tmp_path}", "trainer.run_name=vic",
                 f"task.tokenizer={tokenizer_dir}", f"task.image_tower={tower}", "data.samples=64",
                 "data.image_size=64", "data.world.image_size=64", "data.max_text_tokens=48",
                 "model.image.image_size=64", "model.image.pos_grid=4", "model.decoder.n_layers=4",
                 "vlm.registers=4", "vlm.drop_layer=2", "trainer.micro_batch_size=4", "trainer.checkpoint_every=2",
                 "recipe.stages.align.steps=2", "recipe.stages.finetune.steps=2",
                 "++recipe.stages.finetune.trainer.zero_stage=3"]
    outcome = train.run(compose("train", overrides))
    assert outcome["status"] == "finished"
    init = weights(tmp_path / "vic" / "init")
    align, finetune = (weights(Path(outcome["outputs"][s]) / "model") for s in ("align", "finetune"))
    assert all(torch.equal(init[f"image.{k}"], v) for k, v in trunk.items() if not k.startswith("head."))

    moved = {k for k in init if not torch.equal(init[k], align[k])}
    assert moved == {k for k in init if k.startswith(("projector.", "registers."))}  # Stage 1: nothing else
    assert not torch.equal(align["registers.weight"], finetune["registers.weight"])  # updated under ZeRO-3
    assert any(not torch.equal(align[k], finetune[k]) for k in align if k.startswith("decoder."))
    assert all(torch.equal(align[k], finetune[k]) for k in align if k.startswith("image."))
    meta = json.loads((Path(outcome["outputs"]["finetune"]) / "model" / "raytrain.json").read_text())
    assert meta["init_from"] == outcome["outputs"]["align"]
    config = json.loads((Path(outcome["outputs"]["finetune"]) / "model" / "config.json").read_text())
    assert dataclasses.asdict(train.typed_parts(compose("train", overrides))["model"].victor) == config["victor"]
