"""adastar's update in two fused Triton kernels, so a step reads and writes each state tensor about as often as
fused AdamW does (9 passes over fp32 memory instead of AdamW's 7; the foreach form makes some 25).

The per-tensor update clip needs the norm of the whole raw update before any of it is applied, hence two passes
over the gradients: `second_moments` updates v and sums u^2 of u = c g / sqrt(v / (1 - b2^t)) per block (written
to a (pieces, blocks) buffer, summed per piece without atomics, so the result is deterministic); the caller turns
the sums into one clip factor per piece; `apply_updates` recomputes u with the same arithmetic (bitwise the same)
and updates m and p. Every piece is a contiguous 1-D view: a whole tensor, or one tensor's segment of a ZeRO flat
partition. Divisions and square roots are IEEE (`div_rn`, `sqrt_rn`) like torch's; under TRITON_INTERPRET=1 the
kernels run on CPU tensors (slowly), which is how CPU tests check them against the foreach form.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, in 128-bit loads


@triton.jit
def _raw_update(g, v, bias_correction):
    """u = g / sqrt(v / (1 - b2^t)), the same instructions in both kernels."""
    return tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, bias_correction)))


@triton.jit
def _second_moments_kernel(g_ptr, v_ptr, sums_ptr, n, clip, b2, one_minus_b2, eps_term, bias_correction,
                           BLOCK: tl.constexpr):
    """v = b2 v + (1 - b2) (c g)^2 + (1 - b2) eps; this block's sum of u^2 to sums_ptr[program]."""
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * clip
    v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
    v = b2 * v + one_minus_b2 * (g * g) + eps_term
    tl.store(v_ptr + offsets, v, mask=mask)
    u = _raw_update(g, v, bias_correction)
    tl.store(sums_ptr + block, tl.sum(tl.where(mask, u * u, 0.0), axis=0))


@triton.jit
def _apply_kernel(g_ptr, v_ptr, m_ptr, p_ptr, scales_ptr, piece, n, clip, bias_correction, b1, one_minus_b1, decay,
                  step_size, BLOCK: tl.constexpr):
    """u = clip factor * c g / sqrt(v / bc); m = b1 m + (1 - b1) u; p = decay p - step_size m."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * clip
    v = tl.load(v_ptr + offsets, mask=mask, other=1.0)
    u = _raw_update(g, v, bias_correction) * tl.load(scales_ptr + piece)
    m = b1 * tl.load(m_ptr + offsets, mask=mask, other=0.0) + one_minus_b1 * u
    tl.store(m_ptr + offsets, m, mask=mask)
    p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + offsets, (decay * p - step_size * m).to(p_ptr.dtype.element_ty), mask=mask)


def second_moments(grads: list[torch.Tensor], vs: list[torch.Tensor], bias_corrections: list[float], clip: float,
                   b2: float, eps: float) -> torch.Tensor:
    """Update every v in place; returns the sum of u^2 of each piece, (pieces,) fp32 on the device."""
    blocks = [triton.cdiv(g.numel(), BLOCK) for g in grads]
    partials = torch.zeros(len(grads), max(blocks), dtype=torch.float32, device=grads[0].device)
    for k, (g, v, bc, count) in enumerate(zip(grads, vs, bias_corrections, blocks)):
        _second_moments_kernel[(count,)](g, v, partials[k], g.numel(), clip, b2, 1 - b2, (1 - b2) * eps, bc,
                                         BLOCK=BLOCK, num_warps=8)
    return partials.sum(1)


def apply_updates(grads: list[torch.Tensor], vs: list[torch.Tensor], ms: list[torch.Tensor],
                  params: list[torch.Tensor], bias_corrections: list[float], scales: torch.Tensor, clip: float,
                  b1: float, decay: float, step_size: float) -> None:
    """m and p of every piece in place; `scales` (pieces,) holds each piece's update-clip factor."""
    for k, (g, v, m, p, bc) in enumerate(zip(grads, vs, ms, params, bias_corrections)):
        _apply_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, v, m, p, scales, k, g.numel(), clip, bc, b1, 1 - b1,
                                                        decay, step_size, BLOCK=BLOCK, num_warps=8)
