"""The LoRA job's driver side (no Ray): it takes its base's model config, tokenizer and weights, records the base's
fingerprint, and refuses an `adapter_init` of another base or another LoRA shape before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytrain.checkpoint.adapter import base_fingerprint, save_adapter
from raytrain.checkpoint.hf import model_state, save_pretrained
from raytrain.commands.train import typed_parts
from raytrain.config import ConfigError
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import build_decoder
from raytrain.models.lora import LoRAConfig, adapter_state, apply_lora
from raytrain.train.tasks import fit_to_base
from tests.conftest import compose, preset


def base(path: Path, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_pretrained(path, preset("afm_micro"), model_state(build_decoder(preset("afm_micro"))),
                           to_files(tokenizer))


def adapter_of(base_dir: Path, out: Path, lora: LoRAConfig) -> Path:
    model = build_decoder(preset("afm_micro"))
    apply_lora(model, lora)
    return save_adapter(out, adapter_state(model), lora, base_dir, base_fingerprint(base_dir))


def parts(*overrides: str) -> dict:
    return typed_parts(compose("train", ["job=lora", "data.seq_len=64", *overrides]))


def test_a_lora_job_takes_its_bases_model_tokenizer_and_fingerprint(tokenizer, tmp_path) -> None:
    b = base(tmp_path / "base", tokenizer)
    p = parts(f"init={b}", "lora.rank=4", f"adapter_init={adapter_of(b, tmp_path / 'ara', LoRAConfig(4, 32.0))}")
    assert p["model"].name == "openelm_tiny"  # the job's default, until the driver fits it
    fit_to_base(p)
    assert p["model"] == preset("afm_micro") and p["trainer"].init_from == str(b)
    assert p["data"].tokenizer == str(b) and p["task"].base_fingerprint == base_fingerprint(b)


def test_an_adapter_init_of_another_base_or_shape_and_zero3_are_refused(tokenizer, tmp_path) -> None:
    b, other = base(tmp_path / "base", tokenizer), base(tmp_path / "other", tokenizer, seed=1)
    foreign = adapter_of(other, tmp_path / "foreign", LoRAConfig(rank=4, alpha=32.0))
    with pytest.raises(ConfigError, match=r"adapter_init: adapter .*foreign was trained on base .*other"):
        fit_to_base(parts(f"init={b}", "lora.rank=4", f"adapter_init={foreign}"))
    rank8 = adapter_of(b, tmp_path / "rank8", LoRAConfig(rank=8, alpha=32.0))
    with pytest.raises(ConfigError, match="adapter_init=.*rank8 has LoRA settings .*rank=8"):
        fit_to_base(parts(f"init={b}", "lora.rank=4", f"adapter_init={rank8}"))
    with pytest.raises(ConfigError, match="trainer.zero_stage <= 2"):
        fit_to_base(parts(f"init={b}", "trainer.zero_stage=3"))
    with pytest.raises(ConfigError, match="init: checkpoint .*missing: no such directory"):
        fit_to_base(parts(f"init={tmp_path / 'missing'}"))
