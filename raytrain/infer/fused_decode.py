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
summation order (tests compare them, and an engine's greedy tokens with and without it).

It runs the model's own weights; it applies when every projection is a plain `Linear` (no LoRA slots, no
`CompressedLinear`), q and k are normalised before RoPE or not at all, and the head dim suits the attention kernel
(`fused_decode_unsupported` says why not). The model runner uses it for decode steps of width 1; wider batches, whose
projections are matrix products cuBLAS does well, run the model's forward. A row at a real-valued position (a
superposed prompt's: its KV index plus `rope_offset`) has its q and k normalised and rotated by the model's own ops
between kernels 1 and 2 (`rope_positions`), which adds a few small kernels a layer where the unfused forward has a
dozen more (on an H200, the 7B shape's superposed decode went from 0.092 to 0.073 s for 15 tokens: README,
"Superposition prompting").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    if any(type(m) is not Linear for m in projections):
        return "a projection is not a plain Linear (LoRA adapter slots or compressed weights)"
    return None


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
                 rope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """token, position, write_index: (1,) device tensors -> logits (1, vocab_rows). `rope_positions` (1,) fp32:
        rotate q and k to these real-valued positions instead of `position`."""
        model = self.model
        rope = model.rope(rope_positions[:, None]) if rope_positions is not None else None  # (1, 1, 1, hd) each
        x = F.embedding(token, model.embed.weight)  # (1, d)
        for i, block in enumerate(model.layers):
            x = self._layer(block, i, x, position, write_index, rope)
        return gemv(x, model.head.weight, norm=model.norm.weight, eps=model.norm.eps, dependent_launch=self.pdl)

    def _layer(self, block: nn.Module, layer: int, x: torch.Tensor, position: torch.Tensor, write_index: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        attn = block.attn
        n_q, n_kv, hd = attn.n_q, attn.n_kv, attn.head_dim
        pdl = self.pdl
        qkv = gemv(x, attn.qkv_proj.weight, norm=block.attn_norm.weight, eps=block.attn_norm.eps,
                   dependent_launch=pdl)
        q, k, v = qkv.view(1, n_q + 2 * n_kv, 1, hd).split([n_q, n_kv, n_kv], dim=1)
        if rope is not None:  # rotated here, as the model's forward does: the kernel takes them as they are
            q, k = attn.rotate(q, k, *rope)
            y = decode_attention(q, k, v, self.cache.keys[layer], self.cache.values[layer], position, write_index)
        else:
            qk_norm = ((attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps)
                       if isinstance(attn.q_norm, RMSNorm) else None)
            y = decode_attention(q, k, v, self.cache.keys[layer], self.cache.values[layer], position, write_index,
                                 rope=(self.model.rope_cos, self.model.rope_sin), qk_norm=qk_norm,
                                 dependent_launch=pdl)
        h = gemv(y.view(1, n_q * hd), attn.out_proj.weight, residual=x, dependent_launch=pdl)
        ffn = block.ffn
        gated = gemv(h, ffn.proj_1.weight, norm=block.ffn_norm.weight, eps=block.ffn_norm.eps, swiglu=True,
                     dependent_launch=pdl)
        return gemv(gated, ffn.proj_2.weight, residual=h, dependent_launch=pdl)
