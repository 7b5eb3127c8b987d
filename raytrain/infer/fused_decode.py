"""A batch-1 decode step in five Triton kernels per layer: the inference-only form of `Block.forward` for one token.

Why: a 1.1B model's batch-1 decode step on an H200 was ~380 kernels (about 17 a layer: RMSNorm, four projections,
cuBLAS's split-K reductions, RoPE, attention, two residual adds, SwiGLU), and its graph took 1.1 ms where reading
the weights once takes 0.46 ms: the launches of the small kernels and the GEMVs' tails, not bytes, set its time.
Here a layer is
1. RMSNorm + QKV projection (`gemv(norm=...)`),
2. per-head QK norm + RoPE + cache write + attention (`decode_attention(rope=..., qk_norm=...)`),
3. output projection + residual (`gemv(residual=...)`),
4. RMSNorm + gate/up projection + SwiGLU (`gemv(norm=..., swiglu=True)`),
5. down projection + residual,
each rounding where the unfused ops round, so it computes what `Decoder.forward` computes for one token up to fp32
summation order (tests compare them, and an engine's greedy tokens with and without it). A projection that is a
SeedLM `CompressedLinear` laid out for the kernels (`kernel_weight`: on CUDA, row blocking) runs the same fused
variants through `seedlm_gemv` (`raytrain/compress/kernels/seedlm_matmul.py`), which rebuilds its weights in
registers; the tests compare such a model's fused step with its own forward too.

It runs the model's own weights; it applies when every projection is a plain `Linear` or such a `CompressedLinear`
(no LoRA slots, no RTN or flat-blocked weights), q and k are normalised before RoPE or not at all, and the head dim
suits the attention kernel (`fused_decode_unsupported` says why not). The model runner uses it for decode steps of
width 1; wider batches, whose projections are matrix products cuBLAS does well, run the model's forward. A row at a
real-valued position (a superposed prompt's: its KV index plus `rope_offset`, `rope_positions`) has its angles
computed once a step and handed to every layer's attention kernel as a one-row table (`rope_rows`), so it runs the
same five kernels a layer as a row at an integer position; before, its q and k were normalised and rotated by the
model's own ops between kernels 1 and 2, a few more small kernels a layer (not yet timed on a GPU against that). With
the runner's length bucket as `max_position`, attention over a long context splits the keys across programs
(`decode_attention`'s split-KV: one more kernel a layer past 128 keys (`SPLIT_KEYS`)).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.compress.kernels.seedlm_matmul import seedlm_gemv
from raytrain.compress.linear import CompressedLinear
from raytrain.infer.attention_kernel import decode_attention
from raytrain.infer.gemv_kernel import gemv
from raytrain.infer.kv_cache import SlotKVCache, fused_attention_supported
from raytrain.models.decoder import Decoder, Linear, RMSNorm


def fused_decode_unsupported(model: Decoder) -> str | None:
    """Why the fused step cannot run `model`, or None."""
    cfg = model.cfg
    if not fused_attention_supported(cfg.head_dim):
        return f"head_dim {cfg.head_dim} is not a power of two of at least 16"
    if cfg.qk_norm and cfg.qk_norm_after_rope:
        return "q and k are normalised after RoPE (qk_norm_after_rope)"
    projections = [model.head] + [m for block in model.layers
                                  for m in (block.attn.qkv_proj, block.attn.out_proj, block.ffn.proj_1,
                                            block.ffn.proj_2)]
    return next((reason for reason in map(_projection_unsupported, projections) if reason is not None), None)


def _projection_unsupported(m: nn.Module) -> str | None:
    if type(m) is Linear or (isinstance(m, CompressedLinear) and m.kernel_weight is not None):
        return None
    if not isinstance(m, CompressedLinear):
        return f"a projection is a {type(m).__name__}, not a plain Linear or a SeedLM CompressedLinear (LoRA slots?)"
    if m.method != "seedlm":
        return f"a projection is {m.method}-compressed (the fused step runs plain and SeedLM weights only)"
    if m.weight_ct.config.blocking != "row":
        return f"a SeedLM projection has {m.weight_ct.config.blocking} blocking (the kernel reads row blocks)"
    return "a SeedLM projection is not laid out for the kernel (a CompressedLinear off CUDA, or with kernel=False)"


class FusedDecodeStep:
    """Logits of one token per call, for a one-row decode batch over `cache` (row 0 is slot 0)."""

    def __init__(self, model: Decoder, cache: SlotKVCache, dependent_launch: bool = True) -> None:
        """dependent_launch: each kernel after the first a programmatic dependent launch of the one before, where the
        GPU has it (sm90+): its programs start, and load their first strip of weights, while the previous kernel
        drains."""
        reason = fused_decode_unsupported(model)
        if reason is not None:
            raise ValueError(f"fused decode: {reason}")
        self.model, self.cache = model, cache
        device = model.embed.weight.device
        self.pdl = (dependent_launch and device.type == "cuda"
                    and torch.cuda.get_device_capability(device) >= (9, 0))

    def __call__(self, token: torch.Tensor, position: torch.Tensor, write_index: torch.Tensor,
                 rope_positions: torch.Tensor | None = None, max_position: int | None = None) -> torch.Tensor:
        """token, position, write_index: (1,) device tensors -> logits (1, vocab_rows). `rope_positions` (1,) fp32:
        rotate q and k to these real-valued positions instead of `position`. `max_position`: a bound on `position`
        known on the host (the graph's length bucket), past which attention splits the keys (`decode_attention`)."""
        model = self.model
        tables, by_row = (model.rope_cos, model.rope_sin), False
        if rope_positions is not None:  # the angles once for all layers, then looked up by row
            tables, by_row = tuple(t.reshape(1, -1) for t in model.rope(rope_positions[:, None])), True
        x = F.embedding(token, model.embed.weight)  # (1, d)
        for i, block in enumerate(model.layers):
            attention = partial(decode_attention, keys=self.cache.keys[i], values=self.cache.values[i],
                                positions=position, write_index=write_index, rope=tables, rope_rows=by_row,
                                max_position=max_position, dependent_launch=self.pdl, key_bias=self.cache.key_bias)
            x = self._layer(block, x, attention)
        return self._project(model.head, x, norm=model.norm)

    def _layer(self, block: nn.Module, x: torch.Tensor, attention: Callable[..., torch.Tensor]) -> torch.Tensor:
        """`attention(q, k, v, qk_norm=...)`: the layer's decode attention over its cache."""
        attn = block.attn
        n_q, n_kv, hd = attn.n_q, attn.n_kv, attn.head_dim
        qkv = self._project(attn.qkv_proj, x, norm=block.attn_norm)
        q, k, v = qkv.view(1, n_q + 2 * n_kv, 1, hd).split([n_q, n_kv, n_kv], dim=1)
        qk_norm = ((attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps)
                   if isinstance(attn.q_norm, RMSNorm) else None)
        y = attention(q, k, v, qk_norm=qk_norm)
        h = self._project(attn.out_proj, y.view(1, n_q * hd), residual=x)
        ffn = block.ffn
        gated = self._project(ffn.proj_1, h, norm=block.ffn_norm, swiglu=True)
        return self._project(ffn.proj_2, gated, residual=h)

    def _project(self, layer: nn.Module, x: torch.Tensor, norm: RMSNorm | None = None, swiglu: bool = False,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """`layer`'s GEMV kernel on one row, with the RMSNorm before it and the SwiGLU and residual after it fused."""
        gain, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        if isinstance(layer, CompressedLinear):
            return seedlm_gemv(x, layer.kernel_weight, norm=gain, eps=eps, swiglu=swiglu, residual=residual,
                               dependent_launch=self.pdl)
        return gemv(x, layer.weight, norm=gain, eps=eps, swiglu=swiglu, residual=residual, dependent_launch=self.pdl)
