"""Fused SeedLM matmul in Triton: y = x W^T for a SeedLM-compressed W and a few rows of x (batch 1..16, decode).

Each program owns BLOCK_M output rows and walks their blocks NB at a time. Per block it reads the 16-bit cycle offset,
the exponent nibble and the P coefficient nibbles, gathers the C*P consecutive entries of the cached LFSR cycle in one
go (int16 V - 2^(K-1), 128 KiB for K=16, so it stays in L1/L2) and rebuilds the C weights in registers with the exact
integer form w = 2^e / (2^(K-1) - 1) * sum_p (V - 2^(K-1)) q_p, which it multiplies with x right away. The weights
never go to memory: a step reads 4 (8,3) or 3 (12,4) bits per weight instead of 16.

Blocks run along rows (each row padded to a multiple of C), which is what `raytrain.compress.seedlm` writes. The
decoded weights are bitwise those of `seedlm.decode`, cast to x's dtype; only the summation order differs from a dense
matmul. Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (slowly), which is how CPU tests check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from raytrain.compress import seedlm
from raytrain.compress.format import CompressedTensor
from raytrain.compress.lfsr import centred_table

MAX_BATCH = 16


@dataclass
class KernelConfig:
    block_m: int = 16  # output rows per program
    blocks: int = 16  # SeedLM blocks per row per step (NB)
    num_warps: int = 4
    num_stages: int = 2


@dataclass
class SeedLMWeight:
    """The operands of the kernel for one compressed [rows, cols] weight, on one device."""

    offsets: torch.Tensor  # uint16 (int32 for K > 16) (rows * bpr,): cycle offset per block
    exponents: torch.Tensor  # uint8 nibble stream
    coefficients: torch.Tensor  # uint8 nibble stream
    table: torch.Tensor  # int16 (or int32 for K > 16): the extended cycle, V - 2^(K-1)
    rows: int
    cols: int
    C: int
    P: int
    K: int

    @classmethod
    def from_compressed(cls, ct: CompressedTensor, device: torch.device | str) -> SeedLMWeight:
        if ct.method != "seedlm":
            raise ValueError(f"the SeedLM kernel takes seedlm tensors, not {ct.method}")
        arrays, cfg = seedlm.with_cycle_offsets(ct.arrays, ct.config)
        small = cfg.K <= 16  # 16-bit offsets and table entries: 2 bytes per block read, a 128 KiB table
        table = centred_table(cfg.lfsr, cfg.C * cfg.P).to(torch.int16 if small else torch.int32)
        return cls(arrays["seeds"].to(device, torch.uint16 if small else torch.int32).contiguous(),
                   arrays["exponents"].to(device).contiguous(), arrays["coefficients"].to(device).contiguous(),
                   table.to(device).contiguous(), ct.shape[0], ct.shape[1], cfg.C, cfg.P, cfg.K)

    @property
    def blocks_per_row(self) -> int:
        return -(-self.cols // self.C)


@triton.jit
def _nibble(stream_ptr, index, mask):
    """Signed 4-bit value number `index` of a low-nibble-first stream."""
    byte = tl.load(stream_ptr + (index >> 1), mask=mask, other=0).to(tl.int32)
    nib = (byte >> ((index & 1) * 4)) & 0xF
    return (nib ^ 8) - 8


@triton.jit
def _seedlm_matmul_kernel(x_ptr, y_ptr, offsets_ptr, exps_ptr, coefs_ptr, table_ptr,
                          rows, cols, bpr, batch, stride_xb, stride_yb, inv_scale,
                          C: tl.constexpr, P: tl.constexpr, CP2: tl.constexpr, P2: tl.constexpr,
                          BLOCK_M: tl.constexpr, NB: tl.constexpr, BATCH: tl.constexpr, USE_DOT: tl.constexpr,
                          IEEE: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) output rows
    c = tl.arange(0, CP2)  # (CP2,) position in a block; >= C is padding of the tile
    p = tl.arange(0, P2)  # (P2,) coefficient index; >= P is padding of the tile
    n = tl.arange(0, BATCH)  # (BATCH,) rows of x
    row_ok = r < rows
    acc = tl.zeros((BLOCK_M, BATCH), dtype=tl.float32)
    for j0 in range(0, bpr, NB):
        j = j0 + tl.arange(0, NB)  # (NB,) block columns
        bmask = row_ok[:, None] & (j < bpr)[None, :]  # (BM, NB)
        b = r[:, None] * bpr + j[None, :]  # global block index
        off = tl.load(offsets_ptr + b, mask=bmask, other=0).to(tl.int32)
        e = _nibble(exps_ptr, b, bmask)
        scale = ((e + 127) << 23).to(tl.float32, bitcast=True) * inv_scale  # exact 2^e / (2^(K-1) - 1)
        # a block's C*P table entries are one contiguous window, V[c, p] = T[o + c*P + p]: one gather for all of
        # them, adjacent lanes on adjacent entries
        qmask = bmask[:, :, None] & (p < P)[None, None, :]  # (BM, NB, P2)
        q = _nibble(coefs_ptr, (b * P)[:, :, None] + p[None, None, :], qmask)
        vmask = qmask[:, :, None, :] & (c < C)[None, None, :, None]  # (BM, NB, CP2, P2)
        window = off[:, :, None, None] + (c * P)[None, None, :, None] + p[None, None, None, :]
        v = tl.load(table_ptr + window, mask=vmask, other=0).to(tl.int32)
        wint = tl.sum(v * q[:, :, None, :], axis=3)  # exact integer sums, |.| <= 2^21
        w = wint.to(tl.float32) * scale[:, :, None]  # (BM, NB, CP2); bitwise seedlm.decode
        col = j[:, None] * C + c[None, :]  # (NB, CP2) input index of each tile position
        xmask = ((j < bpr)[:, None] & (c < C)[None, :] & (col < cols))[:, :, None] & (n < batch)[None, None, :]
        xt = tl.load(x_ptr + n[None, None, :] * stride_xb + col[:, :, None], mask=xmask, other=0.0)
        w = w.to(xt.dtype)
        if USE_DOT:
            w2 = tl.reshape(w, (BLOCK_M, NB * CP2))
            x2 = tl.reshape(xt, (NB * CP2, BATCH))
            if IEEE:
                acc += tl.dot(w2, x2, input_precision="ieee")
            else:
                acc += tl.dot(w2, x2)
        else:  # batch 1: a register reduction, no tensor-core layout change
            prod = w.to(tl.float32)[:, :, :, None] * xt.to(tl.float32)[None, :, :, :]
            acc += tl.sum(tl.sum(prod, axis=2), axis=1)
    ymask = row_ok[:, None] & (n < batch)[None, :]
    tl.store(y_ptr + n[None, :] * stride_yb + r[:, None], acc.to(y_ptr.dtype.element_ty), mask=ymask)


def seedlm_matmul(x: torch.Tensor, weight: SeedLMWeight, config: KernelConfig | None = None) -> torch.Tensor:
    """x (batch, cols) with batch <= 16 -> y (batch, rows) = x @ W^T, in x's dtype (fp32 accumulation)."""
    batch, cols = x.shape
    if cols != weight.cols:
        raise ValueError(f"x has {cols} features, the weight {weight.cols}")
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"the fused kernel takes 1..{MAX_BATCH} rows of x (decode); got {batch}")
    cfg = config or KernelConfig()
    x = x.contiguous()
    y = torch.empty(batch, weight.rows, device=x.device, dtype=x.dtype)
    use_dot = batch > 1
    padded_batch = max(16, triton.next_power_of_2(batch)) if use_dot else 1
    inv = float(torch.tensor(1.0 / ((1 << (weight.K - 1)) - 1), dtype=torch.float32))
    grid = (triton.cdiv(weight.rows, cfg.block_m),)
    _seedlm_matmul_kernel[grid](
        x, y, weight.offsets, weight.exponents, weight.coefficients, weight.table,
        weight.rows, cols, weight.blocks_per_row, batch, x.stride(0), y.stride(0), inv,
        C=weight.C, P=weight.P, CP2=triton.next_power_of_2(weight.C), P2=triton.next_power_of_2(weight.P),
        BLOCK_M=cfg.block_m, NB=cfg.blocks,
        BATCH=padded_batch, USE_DOT=use_dot, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
