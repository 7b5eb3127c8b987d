"""The fused batch-1 decode step (`raytrain/infer/fused_decode.py`) and its kernels' fused variants against the
decoder's own ops: the GEMV with RMSNorm, SwiGLU and residual, the decode attention with QK norm and RoPE, and a
model runner's decode steps with and without the fused step, for plain weights and for SeedLM-compressed projections
(`seedlm_gemv`). Without a GPU it runs under Triton's interpreter (tests/conftest.py switches it on before triton is
imported), in fp32, where the kernels must match to summation order."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from raytrain.compress.format import compress_tensor
from raytrain.compress.linear import replace_linears
from raytrain.compress.rtn import RTNConfig
from raytrain.compress.seedlm import SeedLMConfig
from raytrain.infer.kv_cache import decode_attention as reference_attention
from raytrain.infer.model_runner import ModelRunner
from raytrain.models import ops
from raytrain.models.decoder import DecoderConfig, build_decoder
from raytrain.models.lora import LoRAConfig, apply_lora
from tests.conftest import triton_device

DEVICE = triton_device("the fused decode kernels need triton")

from raytrain.infer.attention_kernel import decode_attention  # noqa: E402 (under the interpreter)
from raytrain.infer.fused_decode import FusedDecodeStep, fused_decode_unsupported  # noqa: E402
from raytrain.infer.gemv_kernel import gemv  # noqa: E402

TOL = {"atol": 1e-4, "rtol": 1e-4}


def llama_like(qk_norm: bool, after_rope: bool = False, **sizes) -> torch.nn.Module:
    """Two layers with different head counts and FFN widths, 4 query heads per KV head in the first (`sizes`:
    other DecoderConfig sizes). Small otherwise: the interpreter runs each GEMV program (two output rows) in Python,
    so a fused step's time follows its rows (97 vocabulary rows: the head's last program half live)."""
    cfg = DecoderConfig(**{"name": "fused", "vocab_size": 97, "d_model": 32, "n_layers": 2, "head_dim": 16,
                           "q_heads": [4, 2], "kv_heads": [1, 2], "ffn_dim": [96, 160], "max_seq_len": 128,
                           "qk_norm": qk_norm, "qk_norm_after_rope": after_rope, "norm_eps": 1e-5, **sizes})
    torch.manual_seed(0)
    model = build_decoder(cfg).eval()
    with torch.no_grad():  # non-trivial gains, so that a gain applied to the wrong entries shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("block", [None, (4, 64, 4), (1, 512, 8)])
def test_gemv_with_norm_swiglu_and_residual_equals_the_decoder_ops(block) -> None:
    torch.manual_seed(0)
    x, gain, residual = torch.randn(1, 1, 200), 1 + torch.randn(200), torch.randn(1, 1, 70)
    w_out, w_gate_up = torch.randn(70, 200), torch.randn(140, 200)  # 70 rows: not a multiple of a block
    normed = ops.rms_norm(x, gain, 1e-5)
    on = [t.to(DEVICE) for t in (x, gain, residual, w_out, w_gate_up)]
    got_norm = gemv(on[0], on[3], block, norm=on[1], eps=1e-5).cpu()
    torch.testing.assert_close(got_norm, F.linear(normed, w_out), **TOL)
    got_swiglu = gemv(on[0], on[4], block, norm=on[1], eps=1e-5, swiglu=True).cpu()
    torch.testing.assert_close(got_swiglu, ops.swiglu(F.linear(normed, w_gate_up)), **TOL)
    got_residual = gemv(on[0], on[3], block, residual=on[2]).cpu()
    torch.testing.assert_close(got_residual, residual + F.linear(x, w_out), **TOL)


def test_gemv_refuses_an_odd_gate_up_weight() -> None:
    with pytest.raises(ValueError, match="odd 7 rows"):
        gemv(torch.randn(1, 8, device=DEVICE), torch.randn(7, 8, device=DEVICE), swiglu=True)


@pytest.mark.parametrize("qk_norm,rope_rows", [(False, False), (True, False), (False, True), (True, True)])
def test_decode_attention_rotates_and_normalises_q_and_k_like_the_decoder(qk_norm: bool, rope_rows: bool) -> None:
    """Unrotated q, k in; the cache must hold the rotated (normalised) key and the output equal the decoder's ops.
    With `rope_rows` the tables hold each row's own angles (here those of its position), indexed by row."""
    torch.manual_seed(0)
    W, n_q, n_kv, hd, max_len = 2, 4, 2, 16, 80
    model = llama_like(qk_norm=True)
    q_gain, k_gain = model.layers[0].attn.q_norm.weight, model.layers[0].attn.k_norm.weight
    q, k, v = (torch.randn(W, n, 1, hd) for n in (n_q, n_kv, n_kv))
    keys, values = torch.randn(W, n_kv, max_len + 1, hd), torch.randn(W, n_kv, max_len + 1, hd)
    positions = torch.tensor([70, 3])
    cos, sin = model.rope_cos[positions][:, None, None], model.rope_sin[positions][:, None, None]  # (W, 1, 1, hd)
    if qk_norm:
        q_in, k_in = ops.rms_norm(q, q_gain, 1e-5), ops.rms_norm(k, k_gain, 1e-5)
    else:
        q_in, k_in = q, k
    q_rot, k_rot = ops.rope(q_in, cos, sin), ops.rope(k_in, cos, sin)
    want_keys, want_values = keys.clone(), values.clone()
    rows = torch.arange(W)
    want_keys[rows, :, positions], want_values[rows, :, positions] = k_rot[:, :, 0], v[:, :, 0]
    mask = (torch.arange(71)[None, :] <= positions[:, None])[:, None, None]
    want = reference_attention(q_rot, want_keys[:, :, :71], want_values[:, :, :71], mask)
    dev = [t.to(DEVICE) for t in (q, k, v, keys, values, positions)]
    tables = (cos, sin) if rope_rows else (model.rope_cos, model.rope_sin)
    got = decode_attention(*dev, dev[5], rope=tuple(t.reshape(-1, hd).contiguous().to(DEVICE) for t in tables),
                           qk_norm=(q_gain.to(DEVICE), k_gain.to(DEVICE), 1e-5) if qk_norm else None,
                           rope_rows=rope_rows)
    torch.testing.assert_close(got.cpu(), want, **TOL)
    torch.testing.assert_close(dev[3].cpu(), want_keys, **TOL)
    assert torch.equal(dev[4].cpu(), want_values)


def test_decode_attention_refuses_rope_rows_that_are_not_one_row_per_row() -> None:
    q, k = torch.randn(2, 4, 1, 16, device=DEVICE), torch.randn(2, 2, 1, 16, device=DEVICE)
    cache = torch.randn(2, 2, 8, 16, device=DEVICE)
    positions = torch.tensor([3, 5], device=DEVICE)
    table = torch.randn(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rope_rows"):
        decode_attention(q, k, k, cache, cache.clone(), positions, positions, rope=(table, table), rope_rows=True)


@pytest.mark.parametrize("qk_norm,rope_offset", [(False, 0.0), (True, 0.0), (False, 2.75), (True, -0.5)])
def test_a_runner_with_the_fused_step_decodes_the_same_logits_and_cache(qk_norm: bool, rope_offset: float) -> None:
    """Rows at integer positions, and rows rotated to real-valued ones (a superposed prompt's `rope_offset`)."""
    model = llama_like(qk_norm).to(DEVICE)
    runners = [ModelRunner(model, n_slots=2, max_len=96, cuda_graphs=False, fused_attention=True, fused_decode=fused)
               for fused in (False, True)]
    assert runners[0].fused_step is None and runners[1].fused_step is not None
    prompt = list(range(3, 70))  # past a 64-key block of the attention kernel
    steps = []
    for runner in runners:
        runner.join(0, runner.prefill(0, prompt, 0).argmax(-1), len(prompt), rope_offset)
        logits = []
        for _ in range(3):
            logits.append(runner.decode(1, 96).clone())
            runner.advance(1, logits[-1].argmax(-1))
        steps.append(torch.stack(logits))
    torch.testing.assert_close(steps[1], steps[0], **TOL)
    for layer in range(2):  # the keys the fused step wrote (rotated, normalised) are the ones the forward wrote
        torch.testing.assert_close(runners[1].cache.keys[layer][0, :, :73], runners[0].cache.keys[layer][0, :, :73],
                                   **TOL)


def test_the_fused_step_adds_each_keys_bias_like_the_eager_decode() -> None:
    """Superposition's attenuation: a per-key logit bias in the cache, read by the fused step's attention as by the
    runner's eager (SDPA) decode, at a real-valued position; it changes the logits, and leaving the slot clears it."""
    model = llama_like(True).to(DEVICE)
    prompt = list(range(3, 70))
    bias = -2 * torch.rand(len(prompt), generator=torch.Generator().manual_seed(0))
    steps = []
    for fused, biased in ((False, True), (True, True), (True, False)):
        runner = ModelRunner(model, n_slots=2, max_len=96, cuda_graphs=False, fused_attention=fused,
                             fused_decode=fused, key_bias=biased)
        first = runner.prefill(0, prompt, 0).argmax(-1)
        if biased:
            runner.cache.key_bias[0, :len(prompt)] = bias.to(DEVICE)
        runner.join(0, first, len(prompt), 0.5)
        logits = []
        for _ in range(3):
            logits.append(runner.decode(1, 96).clone())
            runner.advance(1, logits[-1].argmax(-1))
        steps.append(torch.stack(logits))
        runner.leave(0)
        assert runner.cache.key_bias is None or not runner.cache.key_bias.any()
    torch.testing.assert_close(steps[1], steps[0], **TOL)
    assert not torch.allclose(steps[2][0], steps[1][0], atol=1e-3)


def test_the_fused_step_refuses_what_it_cannot_run() -> None:
    assert fused_decode_unsupported(llama_like(qk_norm=True)) is None
    assert "after RoPE" in fused_decode_unsupported(llama_like(qk_norm=True, after_rope=True))
    adapted = llama_like(qk_norm=False)
    apply_lora(adapted, LoRAConfig(rank=2))
    assert "plain Linear" in fused_decode_unsupported(adapted)
    runner = ModelRunner(adapted, n_slots=1, max_len=32, cuda_graphs=False, fused_decode=True)
    assert runner.fused_step is None  # the runner falls back to the model's forward
    with pytest.raises(ValueError, match="fused decode: a projection"):
        FusedDecodeStep(adapted, runner.cache)


def compressed(model: torch.nn.Module, method: str, kernel: bool | None = None, **seedlm) -> torch.nn.Module:
    """A copy of `model` with its blocks' projections compressed (SeedLM with an 8-bit LFSR: 255 candidates keep the
    search fast)."""
    config = SeedLMConfig.for_bits(4, K=8, taps=[0, 2, 3, 4], **seedlm) if method == "seedlm" else RTNConfig()
    weights = {name: compress_tensor(p.detach(), method, config) for name, p in model.named_parameters()
               if name.startswith("layers.") and name.endswith(("_proj.weight", "proj_1.weight", "proj_2.weight"))}
    model = copy.deepcopy(model)
    replace_linears(model, weights, DEVICE, kernel)
    return model


def test_the_fused_step_runs_seedlm_projections_like_the_forward() -> None:
    """SeedLM projections in the kernels' layout through the fused step (norm, swiglu and residual variants of
    `seedlm_gemv`) against the forward of the model holding the same codes decoded densely: the logits of one decode
    step, fp32. One small layer (2 query heads, 1 KV head, 44 FFN rows: a partial row tile and block) keeps the
    interpreter fast."""
    model = llama_like(qk_norm=True, d_model=32, n_layers=1, q_heads=[2], kv_heads=[1], ffn_dim=[44]).to(DEVICE)
    fused, dense = compressed(model, "seedlm", kernel=True), compressed(model, "seedlm", kernel=False)
    assert fused_decode_unsupported(fused) is None
    runners = [ModelRunner(m, n_slots=1, max_len=16, cuda_graphs=False, fused_attention=True, fused_decode=on)
               for m, on in ((dense, False), (fused, True))]
    assert runners[1].fused_step is not None
    logits = []
    for runner in runners:
        runner.join(0, runner.prefill(0, [5, 17, 3], 0).argmax(-1), 3)
        logits.append(runner.decode(1, 16))
    torch.testing.assert_close(logits[1], logits[0], **TOL)


def test_the_fused_step_names_the_compressed_projections_it_cannot_run() -> None:
    model = llama_like(qk_norm=False)
    assert "rtn-compressed" in fused_decode_unsupported(compressed(model, "rtn"))
    assert "flat blocking" in fused_decode_unsupported(compressed(model, "seedlm", blocking="flat"))
    assert "kernel=False" in fused_decode_unsupported(compressed(model, "seedlm", kernel=False))
