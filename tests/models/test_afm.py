"""AFM presets of the decoder family: the on-device shape's parameter counts (spec 5.1) and AFM's init."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from raytrain.models.decoder import build_decoder
from raytrain.models.registry import build_model
from tests.conftest import preset

PER_LAYER = {"qkv": 15_728_640, "o": 9_437_184, "ffn": 74_317_824, "norms": 6_144 + 256}


def test_afm_3b_counts_match_the_spec_exactly() -> None:
    cfg = preset("afm_3b")
    model = build_model(cfg, "meta")
    block = model.layers[0]
    assert block.attn.qkv_proj.weight.numel() == PER_LAYER["qkv"]
    assert block.attn.out_proj.weight.numel() == PER_LAYER["o"]
    assert sum(p.numel() for p in block.ffn.parameters()) == PER_LAYER["ffn"]
    norms = sum(p.numel() for n, p in block.named_parameters() if "norm" in n)
    assert norms == PER_LAYER["norms"]
    assert sum(p.numel() for p in block.parameters()) == 99_490_048
    assert model.param_counts() == {"params_total": 2_737_739_264, "params_embedding": 150_994_944,
                                    "params_non_embedding": 2_586_744_320}
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight")
    assert matrices == 2_586_574_848
    assert cfg.ffn_dim / cfg.d_model == 2.625 and cfg.q_heads // cfg.kv_heads == 3
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.qk_norm) == (500_000, 1e-5, True, True)
    untied = build_model(dataclasses.replace(cfg, tie_embeddings=False), "meta")
    assert untied.param_counts()["params_total"] == 2_888_734_208  # what the preset must not be


def test_model_info_reports_the_afm_3b_counts() -> None:
    out = subprocess.run([sys.executable, "-m", "raytrain", "model-info", "model=afm_3b"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    info = json.loads(out)
    assert (info["params_total"], info["params_non_embedding"], info["params_embedding"]) == (
        2_737_739_264, 2_586_744_320, 150_994_944)
    assert info["layers"] == [{"q_heads": 24, "kv_heads": 8, "ffn_dim": 8064}] * 26


@pytest.mark.parametrize("name, student", [("afm_tiny_teacher", "afm_tiny"), ("afm_micro_teacher", "afm_micro")])
def test_tiny_teachers_keep_width_and_depth_of_their_students(name: str, student: str) -> None:
    big, small = preset(name), preset(student)
    assert (big.d_model, big.n_layers, big.head_dim, big.vocab_size) == (small.d_model, small.n_layers,
                                                                         small.head_dim, small.vocab_size)
    assert (big.ffn_dim, big.kv_heads) == (4 * small.ffn_dim, 2 * small.kv_heads)


def test_afm_init_draws_every_linear_layer_from_its_fan_in() -> None:
    cfg = dataclasses.replace(preset("afm_tiny"), d_model=512, ffn_dim=1344, q_heads=12, kv_heads=4)
    torch.manual_seed(0)
    model = build_decoder(cfg)
    for block in model.layers:
        assert block.attn.qkv_proj.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.03)
        assert block.attn.out_proj.weight.std().item() == pytest.approx((12 * 32) ** -0.5, rel=0.03)
        assert block.ffn.proj_1.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.03)
        assert block.ffn.proj_2.weight.std().item() == pytest.approx(1344 ** -0.5, rel=0.03)
    assert model.embed.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.03)
