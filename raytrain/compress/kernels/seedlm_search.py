"""SeedLM's exhaustive seed search fused into one Triton kernel (the GPU path of `seedlm.search`).

The PyTorch search materialises, per chunk of candidates x blocks, the least-squares coefficients, their quantised
versions and the C reconstructed weights: a dozen passes over GB-sized tensors per chunk, so it is bound by memory
(~100k blocks/s for (8,3) on an H200). Here each thread keeps a few blocks (their C weights) in registers and the
program walks all 2^K - 1 candidates one at a time: the candidate's U and pinv(U) are one 4*2CP-byte row of a table
(12.6 MB for (8,3), L2-resident) loaded once per thread for all its blocks, and per block it computes t = pinv(U) w,
the exponent rule, q = clamp(round(t / 2^e)), the error of the quantised reconstruction ||U q 2^e - w||^2 and the
running minimum, ~95 FP32 instructions per candidate and block and no memory traffic. The winner's codes are
recomputed at the end. Arithmetic follows `seedlm.quantise` (frexp exponents of the fp32 quotient, computed from the
mantissa without dividing; round-half-even), so the codes match the PyTorch search except where two candidates'
errors differ only by the rounding order of the sums.

Ties: the lowest cycle offset wins (as in the PyTorch search); with `search3`, candidates are taken in (offset,
exponent) order, where the PyTorch search takes exponent-major order within a chunk: on an exact tie the codes can
differ there, the error cannot.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from raytrain.compress import seedlm
from raytrain.compress.lfsr import LFSRConfig

RULES = {"range75": 0, "range7": 1, "literal": 2, "search3": 3}
# fl(m / 7.5) <= 1/4 exactly when m's mantissa bits are at most 0x700000 (fl(m / 7) <= 1/4: 0x600000), for m in [1, 2);
# binary scaling commutes with rounding, so ceil(log2(fl(amax / 7.5))) = E - 2 + (mantissa(amax) > 0x700000)
MANTISSA_THRESHOLD = {0: 0x700000, 1: 0x600000, 2: 0, 3: 0x700000}


@triton.jit
def _pow2(e):
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _first_exponent(t, P: tl.constexpr, RULE: tl.constexpr, THRESHOLD: tl.constexpr):
    """The rule's e from amax = max_p |t_p| (before search3's +-1), clamped to -8..7: E - 2 or E - 1 for the range
    rules (E = floor(log2 amax)), E for the literal one; zero and subnormals give E = -127 and clamp to -8."""
    amax = tl.abs(t[0])
    for p in tl.static_range(1, P):
        amax = tl.maximum(amax, tl.abs(t[p]))
    bits = amax.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    if RULE != 2:
        e += ((bits & 0x7FFFFF) > THRESHOLD).to(tl.int32) - 2
    return tl.minimum(tl.maximum(e, -8), 7)


@triton.jit
def _quantised(t, e):
    """q * 2^e with q = clamp(round_half_even(t / 2^e), -8, 7): adding and removing 1.5 * 2^23 rounds half to even;
    dividing by 2^e is an exact multiplication by 2^-e."""
    q = (t * _pow2(-e) + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(q, -8.0), 7.0) * _pow2(e)


@triton.jit
def _least_squares(row, w, C: tl.constexpr, P: tl.constexpr):
    """t_p = sum_c pinv[p, c] w_c for each p; `row` holds the candidate's U (C*P) then pinv(U) (P*C)."""
    t = ()
    for p in tl.static_range(P):
        tp = tl.load(row + C * P + p * C) * w[0]
        for c in tl.static_range(1, C):
            tp += tl.load(row + C * P + p * C + c) * w[c]
        t = t + (tp,)
    return t


@triton.jit
def _error(row, w, t, e, C: tl.constexpr, P: tl.constexpr):
    """||U coef - w||^2 with coef the quantised t: r_c = sum_p U[c, p] coef_p, as the PyTorch search's bmm."""
    coef = ()
    for p in tl.static_range(P):
        coef = coef + (_quantised(t[p], e),)
    err = tl.zeros(w[0].shape, tl.float32)
    for c in tl.static_range(C):
        r = tl.load(row + c * P) * coef[0]
        for p in tl.static_range(1, P):
            r += tl.load(row + c * P + p) * coef[p]
        diff = r - w[c]
        err += diff * diff
    return err


@triton.jit
def _search_kernel(w_ptr, table_ptr, offset_ptr, exp_ptr, coef_ptr, nb, C: tl.constexpr, P: tl.constexpr,
                   N: tl.constexpr, RULE: tl.constexpr, THRESHOLD: tl.constexpr, BB: tl.constexpr):
    out = tl.program_id(0) * BB + tl.arange(0, BB)
    blocks = tl.minimum(out, nb - 1)  # the tail repeats the last block; its stores are masked
    w = ()
    for c in tl.static_range(C):
        w = w + (tl.load(w_ptr + blocks * C + c),)
    best = tl.full((BB,), float("inf"), tl.float32)
    best_o = tl.zeros((BB,), tl.int32)
    best_d = tl.zeros((BB,), tl.int32)
    for o in range(N):
        row = table_ptr + o * (2 * C * P)
        t = _least_squares(row, w, C, P)
        e0 = _first_exponent(t, P, RULE, THRESHOLD)
        for d in tl.static_range(-1 if RULE == 3 else 0, 2 if RULE == 3 else 1):
            err = _error(row, w, t, tl.minimum(tl.maximum(e0 + d, -8), 7), C, P)
            better = err < best  # strict, in (offset, exponent) order: the first minimum wins
            best = tl.where(better, err, best)
            best_o = tl.where(better, o, best_o)
            best_d = tl.where(better, d, best_d)
    # the winner's codes, recomputed for one candidate per block
    row = table_ptr + best_o * (2 * C * P)
    t = _least_squares(row, w, C, P)
    e = tl.minimum(tl.maximum(_first_exponent(t, P, RULE, THRESHOLD) + best_d, -8), 7)
    ok = out < nb
    tl.store(offset_ptr + out, best_o, mask=ok)
    tl.store(exp_ptr + out, e.to(tl.int8), mask=ok)
    for p in tl.static_range(P):
        tl.store(coef_ptr + out * P + p, (_quantised(t[p], e) * _pow2(-e)).to(tl.int8), mask=ok)


def search(blocks: torch.Tensor, cfg: seedlm.SeedLMConfig, block_b: int = 256, num_warps: int = 4) -> seedlm.Codes:
    """Codes of (nb, C) blocks on their device (CUDA, or CPU under TRITON_INTERPRET=1): the same dict as
    `seedlm.search`. `block_b` blocks per program, `block_b / (32 num_warps)` per thread."""
    device = blocks.device
    table = kernel_table(cfg.C, cfg.P, cfg.lfsr, str(device))
    w = blocks.to(torch.float32).contiguous()
    nb = w.shape[0]
    offsets = torch.empty(nb, dtype=torch.int32, device=device)
    exponents = torch.empty(nb, dtype=torch.int8, device=device)
    coefficients = torch.empty(nb, cfg.P, dtype=torch.int8, device=device)
    if nb:
        rule = RULES[cfg.exponent_rule]
        _search_kernel[(triton.cdiv(nb, block_b),)](w, table, offsets, exponents, coefficients, nb, C=cfg.C,
                                                    P=cfg.P, N=cfg.lfsr.period, RULE=rule,
                                                    THRESHOLD=MANTISSA_THRESHOLD[rule], BB=block_b,
                                                    num_warps=num_warps)
    return {"offsets": offsets.cpu(), "exponents": exponents.cpu(), "coefficients": coefficients.cpu()}


@functools.lru_cache(maxsize=4)
def kernel_table(C: int, P: int, lfsr: LFSRConfig, device: str) -> torch.Tensor:
    """(N, 2CP) fp32: per candidate its U (C, P) then pinv(U) (P, C), from seedlm.search_tables."""
    U, pinv = seedlm.search_tables(C, P, lfsr, device)
    return torch.cat([U.reshape(U.shape[0], -1), pinv.reshape(pinv.shape[0], -1)], 1).contiguous()
