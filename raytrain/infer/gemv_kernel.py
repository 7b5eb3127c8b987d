"""One row times a weight matrix (y = x Wᵀ for a single row x) as a Triton kernel: the batch-1 decode step's GEMVs.

Why: at batch 1 a decode step reads every weight once, so it is bound by memory bandwidth, and a 1.1B model's
step on an H200 spent 0.91 ms of its 1.10 ms graph in the four weight GEMVs per layer (cuBLAS at 2-3.5 TB/s on
these 8-46 MB matrices, where 4.8 TB/s would take 0.43 ms). Each program here reads a block of `BLOCK_N` whole rows
of W in contiguous `BLOCK_K` strips, multiplies by the matching strip of x in fp32 and reduces once at the end;
the block shape depends on the number of rows (`block_shape`). Under TRITON_INTERPRET=1 it runs on CPU tensors
(slowly), which is how the CPU tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

def block_shape(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) by output rows, from a sweep on the H200 (`benchmarks/decode.py --gemv`, 2026-12-04): few
    rows per program while programs are scarce, wider blocks of shorter strips for the 6-14k-row FFN inputs."""
    if n <= 4096:
        return 4, 512
    if n <= 6144:
        return 8, 512
    return (16, 256) if n <= 14336 else (4, 512)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < K
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=live[:, None] & inside[None, :],
                    other=0.0)
        x = tl.load(x_ptr + cols, mask=inside, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=live)


@torch.compiler.disable
def gemv(x: torch.Tensor, weight: torch.Tensor, block: tuple[int, int] | None = None,
         num_warps: int = 4) -> torch.Tensor:
    """x (..., K) holding one row, weight (N, K) with contiguous rows -> (..., N) = x Wᵀ, accumulated in fp32.
    `block`: (BLOCK_N, BLOCK_K), default `block_shape(N, K)`."""
    N, K = weight.shape
    if x.shape[:-1].numel() != 1 or x.shape[-1] != K or weight.stride(1) != 1:
        raise ValueError(f"gemv takes one row of {K} and a row-major ({N}, {K}) weight; got {tuple(x.shape)}")
    block_n, block_k = block or block_shape(N, K)
    y = x.new_empty(*x.shape[:-1], N)
    _gemv_kernel[(triton.cdiv(N, block_n),)](x.contiguous(), weight, y, N, K, weight.stride(0),
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return y
