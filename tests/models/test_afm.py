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


@pytest.mark.parametrize("after", [False, True])
def test_qk_norm_order_against_a_hand_computed_attention(after: bool) -> None:
    """RMSNorm with a learned gain does not commute with the rotation: AFM (axlearn) normalises the rotated q and
    k, OpenELM normalises before rotating. One layer's attention written out by hand in float64, both orders."""
    cfg = dataclasses.replace(preset("afm_micro"), qk_norm_after_rope=after)
    torch.manual_seed(0)
    attn = build_decoder(cfg).layers[0].attn.double()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    T, hd = 7, cfg.head_dim
    x = torch.randn(1, T, cfg.d_model, dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * cfg.rope_theta ** (-torch.arange(0, hd, 2) / hd)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(t: torch.Tensor) -> torch.Tensor:  # x cos + [-x2, x1] sin, per head
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    def norm(t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return gain * t / (t.square().mean(-1, keepdim=True) + cfg.norm_eps).sqrt()

    qkv = (x @ attn.qkv_proj.weight.T).view(T, 3 + 2, hd).transpose(0, 1)  # 3 query heads, 1 K head, 1 V head
    q, k, v = qkv[:3], qkv[3:4], qkv[4:5]
    if after:
        q, k = norm(rotate(q), attn.q_norm.weight), norm(rotate(k), attn.k_norm.weight)
    else:
        q, k = rotate(norm(q, attn.q_norm.weight)), rotate(norm(k, attn.k_norm.weight))
    scores = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(0, 1).reshape(1, T, 3 * hd) @ attn.out_proj.weight.T
    with torch.no_grad():
        out = attn(x, cos[None, None], sin[None, None], None, 0)
        other = dataclasses.replace(cfg, qk_norm_after_rope=not after)
        swapped = build_decoder(other).layers[0].attn.double()
        swapped.load_state_dict(attn.state_dict())
        out_swapped = swapped(x, cos[None, None], sin[None, None], None, 0)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)  # the model normalises and rotates in fp32
    assert (out_swapped - y).abs().max() > 1e-3  # the order matters once the gains are not 1


def test_afm_presets_normalise_after_rope_and_openelm_presets_before() -> None:
    assert all(preset(n).qk_norm_after_rope for n in ("afm_3b", "afm_tiny", "afm_tiny_teacher", "afm_micro",
                                                       "afm_micro_teacher"))
    assert not any(preset(n).qk_norm_after_rope for n in ("openelm_270m", "openelm_3b", "openelm_micro"))
