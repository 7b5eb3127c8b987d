"""The decoder family: OpenELM preset shapes and counts (spec section 5), masking, GQA, RMSNorm, init."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from raytrain.cli import CONF_DIR
from raytrain.models import ops
from raytrain.models.decoder import DecoderConfig, RMSNorm, build_decoder, training_flops_per_token
from raytrain.models.registry import build_model, model_config

SPEC = {  # openelm.md section 5
    "openelm_270m": dict(
        q=[12, 12, 12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20],
        ffn=[768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120],
        non_embedding=230_567_168, embedding=40_960_000, total=271_527_168, first=5_409_408, last=23_759_488),
    "openelm_450m": dict(
        q=[12, 12, 12, 16, 16, 16, 16, 16, 16, 16, 20, 20, 20, 20, 20, 20, 24, 24, 24, 24],
        ffn=[768, 1024, 1280, 1536, 1792, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4352, 4608, 5120, 5376,
             5632, 5888, 6144],
        non_embedding=408_027_136, embedding=49_152_000, total=457_179_136, first=6_491_264, last=34_212_992),
    "openelm_1_1b": dict(
        q=[16, 16, 16, 20, 20, 20, 20, 20, 20, 20, 24, 24, 24, 24, 24, 24, 24, 24, 28, 28, 28, 28, 28, 28, 32, 32,
           32, 32],
        ffn=[1024, 1280, 1536, 1792, 2048, 2304, 2560, 2816, 3072, 3328, 3584, 3840, 4096, 4608, 4608, 5120, 5376,
             5632, 5888, 6144, 6400, 6656, 6912, 7168, 7424, 7680, 7936, 8192],
        non_embedding=1_014_355_456, embedding=65_536_000, total=1_079_891_456, first=11_538_560, last=60_821_632),
    "openelm_3b": dict(
        q=[12] * 4 + [16] * 14 + [20] * 12 + [24] * 6,
        ffn=[1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 4096, 4352, 4608, 4864, 5120, 5632, 5888, 6144, 6400,
             6656, 7168, 7424, 7680, 7936, 8192, 8704, 8960, 9216, 9472, 9728, 10240, 10496, 10752, 11008, 11264,
             11776, 12032, 12288],
        non_embedding=2_938_343_424, embedding=98_304_000, total=3_036_647_424, first=25_958_656, last=136_845_568),
}


def preset(name: str) -> DecoderConfig:
    return model_config(OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(SPEC))
def test_preset_shapes_and_parameter_counts(name: str) -> None:
    cfg, spec = preset(name), SPEC[name]
    shapes = cfg.layer_shapes()
    assert [s.q_heads for s in shapes] == spec["q"]
    assert [s.kv_heads for s in shapes] == [q // 4 for q in spec["q"]]
    assert [s.ffn_dim for s in shapes] == spec["ffn"]
    model = build_model(cfg, "meta")
    assert model.param_counts() == {"params_total": spec["total"], "params_embedding": spec["embedding"],
                                    "params_non_embedding": spec["non_embedding"]}
    assert sum(p.numel() for p in model.layers[0].parameters()) == spec["first"]
    assert sum(p.numel() for p in model.layers[-1].parameters()) == spec["last"]


def test_model_info_prints_exactly_one_json_object() -> None:
    out = subprocess.run([sys.executable, "-m", "raytrain", "model-info", "model=openelm_3b"], capture_output=True,
                         text=True, check=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    info = json.loads(lines[0])
    assert info["model"] == "openelm_3b"
    assert info["params_total"] == SPEC["openelm_3b"]["total"]
    assert info["params_non_embedding"] == SPEC["openelm_3b"]["non_embedding"]
    assert [layer["q_heads"] for layer in info["layers"]] == SPEC["openelm_3b"]["q"]
    assert sorted(info) == ["layers", "model", "params_embedding", "params_non_embedding", "params_total"]


def test_causal_masking(micro_model) -> None:
    tokens = torch.randint(0, 97, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    with torch.no_grad():
        a, b = micro_model(tokens), micro_model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gqa_reads_kv_heads_by_repeat_interleave(micro_model) -> None:
    """Query head h reads KV head h // (n_q / n_kv): compare with an explicit repeat_interleave reference."""
    block = micro_model.layers[1]
    attn = block.attn
    assert (attn.n_q, attn.n_kv) == (4, 2)
    x = torch.randn(1, 6, 64)
    cos, sin = micro_model.rope_cos[None, None, :6], micro_model.rope_sin[None, None, :6]
    qkv = attn.qkv_proj(x).view(1, 6, 8, 16).transpose(1, 2)
    q, k, v = qkv.split([4, 2, 2], dim=1)
    q, k = ops.rope(attn.q_norm(q), cos, sin), ops.rope(attn.k_norm(k), cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 4.0 + torch.full((6, 6), float("-inf")).triu(1)
    reference = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 64))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, None, 1), reference, rtol=1e-5, atol=1e-5)


def test_rmsnorm_normalises_in_fp32_and_casts_before_the_gain() -> None:
    norm = RMSNorm(8)
    norm.weight.data = torch.linspace(0.5, 2.0, 8)
    x = torch.randn(3, 8).to(torch.bfloat16)
    x32 = x.float()
    expected = norm.weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def test_init_follows_the_reference_stds() -> None:
    cfg = DecoderConfig(name="init", vocab_size=1000, d_model=512, n_layers=4, head_dim=64, q_heads=8, kv_heads=2,
                        ffn_dim=1024)
    torch.manual_seed(0)
    model = build_decoder(cfg)
    residual = 512 ** -0.5 * (2 * 4) ** -0.5
    for blk in model.layers:
        assert blk.attn.qkv_proj.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.02)
        assert blk.ffn.proj_1.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.02)
        assert blk.attn.out_proj.weight.std().item() == pytest.approx(residual, rel=0.02)
        assert blk.ffn.proj_2.weight.std().item() == pytest.approx(residual, rel=0.02)
        assert torch.equal(blk.attn_norm.weight, torch.ones(512))
    assert model.embed.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.02)
    assert model.head.weight is model.embed.weight


def test_training_flops_count_six_per_weight_plus_attention(micro_cfg) -> None:
    model = build_decoder(micro_cfg)
    weights = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)  # embedding = tied head
    attention = sum(12 * 32 * blk.attn.n_q * 16 for blk in model.layers)
    assert training_flops_per_token(micro_cfg, 32) == 6 * weights + attention


def test_config_rejects_inconsistent_shapes() -> None:
    with pytest.raises(ValueError, match="q_heads, kv_heads and ffn_dim"):
        DecoderConfig(name="bad", q_heads=4)
    with pytest.raises(ValueError, match="not a multiple"):
        DecoderConfig(name="bad", q_heads=6, kv_heads=4, ffn_dim=128)
    with pytest.raises(ValueError, match="entries for 2 layers"):
        DecoderConfig(name="bad", n_layers=2, q_heads=[4, 4, 4], kv_heads=2, ffn_dim=128)
