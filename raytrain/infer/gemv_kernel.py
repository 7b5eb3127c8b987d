"""One row times a weight matrix (y = x Wᵀ for a single row x) as a Triton kernel: the batch-1 decode step's GEMVs,
optionally with the decoder's elementwise work around them fused in.

Why: at batch 1 a decode step reads every weight once, so it is bound by memory bandwidth, and a 1.1B model's
step on an H200 spent 0.91 ms of its 1.10 ms graph in the four weight GEMVs per layer (cuBLAS at 2-3.5 TB/s on
these 8-46 MB matrices, where 4.8 TB/s would take 0.43 ms); most of the rest were ~12 small kernels per layer
(RMSNorm, RoPE, residual adds, SwiGLU, cuBLAS's split-K reductions) whose launches, not bytes, cost time. Each
program here reads a block of `BLOCK_N` whole rows of W in contiguous `BLOCK_K` strips, multiplies by the matching
strip of x in fp32 and reduces once at the end; the block shape depends on the number of rows (`block_shape`).
Weights are loaded with `evict_first`: each is read once a step, and keeping it would push x out of L2. Each strip
of weights is loaded one iteration ahead of its use, and with `dependent_launch` (sm90+) the kernel is a programmatic
dependent launch: its programs start while the previous kernel drains and load their first strip before waiting for
it (`gdc_wait`); x, the gains and the residual are read only after (openelm_1_1b at batch 1: 961 → 1,038 tok/s).
Fused variants, for `raytrain/infer/fused_decode.py`:
- `norm`: x is RMS-normalised first. Every program reads all of x (a few KB, from L2) and accumulates its squares
  beside the weighted sums, scaling the sums at the end: in fp32 throughout, where `ops.rms_norm` rounds the
  normalised row to x's dtype (in fp32 the two are the same; in bf16 they differ by that rounding);
- `swiglu`: W holds (gate, up) halves of `n` rows each; the output is silu(gate) * up, (n,);
- `residual`: the output plus a residual row, the sum rounded once more as `x + f(x)` is.
Under TRITON_INTERPRET=1 it runs on CPU tensors (slowly), which is how the CPU tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def block_shape(n: int, k: int, swiglu: bool = False) -> tuple[int, int, int]:
    """(output rows per program, strip length, warps) for n output rows of a K-long row, from sweeps of the fused
    variants on the H200 (`benchmarks/decode.py --gemv`, the TinyLlama and Llama-2-7B shapes, 2026-12-04): two rows a
    program while rows are few, more rows and shorter strips as they grow; a SwiGLU program reads 4 gate and 4 up
    rows (1,024-long strips there ran at half the speed)."""
    if swiglu:
        return 4, 512, 4
    if n <= 2048:
        return 2, 1024, 4
    if n <= 8192:
        return 4, 512, 4
    return (8, 512, 4) if n <= 16384 else (8, 1024, 4)


@triton.jit
def _weight_strip(w_ptr, rows, cols, live, K, stride_wn, up_offset, SWIGLU: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) strip of W at `cols` (zeros past K), and its up half's with SWIGLU."""
    block = live[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=block, other=0.0,
                eviction_policy="evict_first")  # read once: keep x and the residual in L2 instead
    w_up = w
    if SWIGLU:
        w_up = tl.load(w_ptr + (rows[:, None] + up_offset) * stride_wn + cols[None, :], mask=block, other=0.0,
                       eviction_policy="evict_first")
    return w, w_up


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, gain_ptr, res_ptr, N, K, stride_wn, up_offset, eps,
                 NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    dtype = y_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    squares = tl.zeros([BLOCK_K], tl.float32)
    if PDL:  # let the next kernel's programs start: they read their weights while this one drains
        tl.extra.cuda.gdc_launch_dependents()
    # each strip's weights are loaded one iteration ahead; the first before waiting for the previous kernel,
    # since weights are never written by it
    w, w_up = _weight_strip(w_ptr, rows, tl.arange(0, BLOCK_K), live, K, stride_wn, up_offset, SWIGLU)
    if PDL:  # x and the residual are the previous kernels' outputs; every store comes after this wait
        tl.extra.cuda.gdc_wait()
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < K
        x = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if NORM:  # the row's scale multiplies the sums at the end, so no pass over x precedes the weight loads
            squares += x * x
            x = x * tl.load(gain_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if SWIGLU:
            acc_up += w_up.to(tl.float32) * x[None, :]
        w, w_up = _weight_strip(w_ptr, rows, cols + BLOCK_K, live, K, stride_wn, up_offset, SWIGLU)
    y = tl.sum(acc, axis=1)
    if NORM:
        scale = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        y = y * scale
    if SWIGLU:  # gate and up rounded as the unfused projection's output is, the product in fp32
        gate = y.to(dtype).to(tl.float32)
        up = tl.sum(acc_up, axis=1)
        if NORM:
            up = up * scale
        y = gate * tl.sigmoid(gate) * up.to(dtype).to(tl.float32)
    if RESIDUAL:
        y = y.to(dtype).to(tl.float32) + tl.load(res_ptr + rows, mask=live, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(dtype), mask=live)


def fused_outputs(rows: int, swiglu: bool, name: str) -> int:
    """Outputs of a GEMV over a weight of `rows` rows: with `swiglu` the weight holds (gate, up) halves, so half of
    an even count."""
    if swiglu and rows % 2:
        raise ValueError(f"{name} with swiglu takes (gate, up) halves; the weight has an odd {rows} rows")
    return rows // 2 if swiglu else rows


@torch.compiler.disable
def gemv(x: torch.Tensor, weight: torch.Tensor, block: tuple[int, int, int] | None = None,
         norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
         residual: torch.Tensor | None = None, dependent_launch: bool = False) -> torch.Tensor:
    """x (..., K) holding one row, weight (N, K) with contiguous rows -> (..., N) = x Wᵀ, accumulated in fp32.
    `block`: (output rows per program, strip length, warps), default `block_shape`. `norm` (K,): the RMSNorm
    gain applied to x first (with `eps`); `swiglu`: W is (2n, K) gate and up halves and the result
    silu(gate) * up, (..., n); `residual` (..., N): added to the result. `dependent_launch` (CUDA, sm90+): launched
    as a programmatic dependent of the previous kernel, whose outputs it reads only after waiting for it."""
    N, K = weight.shape
    if x.shape[:-1].numel() != 1 or x.shape[-1] != K or weight.stride(1) != 1:
        raise ValueError(f"gemv takes one row of {K} and a row-major ({N}, {K}) weight; got {tuple(x.shape)}")
    n = fused_outputs(N, swiglu, "gemv")
    block_n, block_k, num_warps = block or block_shape(n, K, swiglu)
    y = x.new_empty(*x.shape[:-1], n)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x.contiguous(), weight, y, norm if norm is not None else x,
        residual.contiguous() if residual is not None else y,
        n, K, weight.stride(0), n, eps, NORM=norm is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
        PDL=dependent_launch, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, launch_pdl=dependent_launch)
    return y
