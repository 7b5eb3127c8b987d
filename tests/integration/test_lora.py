"""`raytrain train job=ara` on Ray Train + DeepSpeed (2 CPU workers): an accuracy-recovery adapter on a palettized
frozen base, distilled from the uncompressed model, started from a given adapter, saved alone with its base's
fingerprint; the frozen base stays out of the DeepSpeed state, and the adapter brings the palettized model closer
to the uncompressed one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from raytrain.checkpoint.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_fingerprint, read_adapter, save_adapter
from raytrain.checkpoint.hf import (linear_weight_names, load_pretrained, model_state, read_weights, save_compressed,
                                    save_pretrained)
from raytrain.commands import train
from raytrain.compress.format import compress_tensor
from raytrain.compress.palettize import PalettizeConfig
from raytrain.data.corpus import source
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import build_decoder
from raytrain.models.lora import LoRAConfig, adapter_state, apply_lora
from tests.conftest import compose, preset

pytestmark = pytest.mark.integration
START_A = 0.05  # every entry of the given adapter's A: a fresh one is drawn from +-1/8


def mean_kl(teacher: torch.nn.Module, student: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        t, s = F.log_softmax(teacher(tokens), -1), F.log_softmax(student(tokens), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_an_accuracy_recovery_adapter_trains_on_a_palettized_base(ray_cluster, tokenizer, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    cfg = preset("afm_micro")
    fp = save_pretrained(tmp_path / "fp", cfg, model_state(build_decoder(cfg)), to_files(tokenizer))
    state = read_weights(fp)
    compressed = {n: compress_tensor(state[n], "palettize", PalettizeConfig(bits=2)) for n in linear_weight_names(fp)}
    pal = save_compressed(tmp_path / "pal", fp, {k: v for k, v in state.items() if k not in compressed}, compressed)
    start = build_decoder(cfg)
    lora = LoRAConfig(rank=4, alpha=8.0)
    apply_lora(start, lora)
    given = {k: torch.full_like(v, START_A) if k.endswith("lora_A") else v for k, v in adapter_state(start).items()}
    save_adapter(tmp_path / "given", given, lora, pal, base_fingerprint(pal))

    train.run(compose("train", [
        "job=ara", f"init={pal}", f"objective.teacher={fp}", f"adapter_init={tmp_path / 'given'}", "lora.rank=4",
        "lora.alpha=8", "tracking=disabled", f"trainer.storage_path={tmp_path}", "trainer.run_name=ara",
        "data.seq_len=64", "data.words_per_piece=48", "data.min_tokens=16", "trainer.micro_batch_size=4",
        "trainer.max_steps=8", "trainer.checkpoint_every=8", "trainer.log_every=4", "schedule.warmup_steps=2",
        "optim.lr=3e-3", "sample.prompt=The if", "sample.max_new_tokens=4", "sample.temperature=0"]))

    step = tmp_path / "ara" / "step000000008"
    assert {p.name for p in (step / "model").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    adapter = read_adapter(tmp_path / "ara")  # the run directory resolves to its latest checkpoint's adapter
    assert adapter.base_fingerprint == base_fingerprint(pal) and adapter.meta["teacher"] == str(fp)
    A = adapter.state["layers.0.attn.qkv_proj.lora_A"]
    assert 0 < (A - START_A).abs().max() < 0.04  # trained from the given adapter: 8 Adam steps of about 3e-3
    ds = torch.load(next((step / "ds").glob("*/mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert not [k for k in ds if "lora_" not in k and not k.endswith(".scale") and k != "head.weight"]
    manifest = json.loads((step / "raytrain.json").read_text())
    assert manifest["model"]["name"] == "afm_micro" and manifest["world_size"] == 2
    assert "\nThe if" in capsys.readouterr().out  # the sample ran on the base with the adapter (after worker logs)

    ids = torch.tensor([t for d in source("heldout") for t in tokenizer.encode(d)][:8 * 64]).view(8, 64)
    teacher, bare = load_pretrained(fp).model, load_pretrained(pal).model
    recovered = load_pretrained(pal, adapter=tmp_path / "ara").model
    assert mean_kl(teacher, recovered, ids) < mean_kl(teacher, bare, ids)
