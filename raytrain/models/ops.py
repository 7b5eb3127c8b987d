"""The decoder's elementwise chains as functions, so that inference can run each as one fused kernel.

Eager, as in training, each chain is several PyTorch ops. A GPU decode step at small batch is dozens of tiny kernels
per layer, and their launches, not the bytes they move, set its time; `use_fused_kernels()` (the engine calls it on
CUDA) swaps in `torch.compile`d versions: Inductor fuses each chain into one Triton kernel, compiled with dynamic
shapes, so one compilation serves every layer width and batch. Callers look the functions up on this module
(`ops.rms_norm(...)`) so the swap reaches them. (A batch-1 decode step goes further on CUDA: its whole layer is five
Triton kernels, `raytrain/infer/fused_decode.py`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to x's dtype, then the gain (the reference's order)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.type_as(x)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B or 1, 1, T, hd). Rotation in fp32: x*cos + [-x2, x1]*sin."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2f) holding (gate, up) halves -> silu(gate) * up, (..., f)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float, dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * scores + bias) in fp32 over the last dim, False entries of `mask` excluded, cast to
    `dtype`."""
    logits = scores.float() * scale
    if bias is not None:
        logits = logits + bias
    return logits.masked_fill(~mask, float("-inf")).softmax(-1).to(dtype)


_EAGER = {fn.__name__: fn for fn in (rms_norm, rope, swiglu, masked_softmax)}
_FUSED: dict = {}


RECOMPILE_LIMIT = 64


def use_fused_kernels(enabled: bool = True) -> None:
    """Swap the chains for compiled, fused versions (for inference on CUDA), or back to eager ones.

    Dynamic shapes still specialise on sizes 0 and 1, dtype and grad mode, so one process serving several models
    (a base and its adapters, decode and prefill) compiles each chain a few times over: Dynamo's default limit of 8
    is raised, and a chain past the limit runs eagerly rather than failing (no `fullgraph`)."""
    if enabled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for name, fn in _EAGER.items():
        if enabled and name not in _FUSED:
            _FUSED[name] = torch.compile(fn, dynamic=True)
        globals()[name] = _FUSED[name] if enabled else fn
