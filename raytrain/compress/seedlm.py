"""SeedLM codec (spec §2.3-2.5): a block of C weights becomes an LFSR seed, a 4-bit exponent and P 4-bit coefficients.

Encoding is the paper's exhaustive search: for every block and every one of the 2^K - 1 candidate matrices U, the
least-squares coefficients t = pinv(U) w (pseudo-inverses computed once in float64 by SVD, searched in fp32) are
quantised with a shared exponent, and the candidate whose *quantised* reconstruction is closest wins (ties: lowest
cycle offset). On CPU the search is vectorised over blocks x candidates in chunks whose size bounds the memory used; on
CUDA it is one fused Triton kernel (`kernels/seedlm_search.py`).

Blocking (`blocking`): `row` (the default) zero-pads each row of a [out, in] weight to a multiple of C, so a block
never straddles two output rows and the GPU kernels can decode a row tile on their own; it equals the spec's row-major
flatten whenever in % C == 0, and otherwise costs bits (3-bit rows of 32 weights store 3.375 bits per weight).
`flat` is the spec's default: the weight flattened row-major and only the tail padded (exactly 3 or 4 bits per weight
up to one block); its checkpoints decode densely (the kernels read row blocks only).

Codes are kept as int tensors, blocks in row-major order (`offsets`, `exponents`, `coefficients`; rows first with
row blocking), so row ranges encoded separately concatenate (with flat blocking, ranges that start on a block
boundary: `row_alignment`); `pack` turns them into the stored arrays (LFSR state per block as the seed, nibble
streams). Decoding uses the exact integer form w = 2^e / (2^(K-1) - 1) * sum_p (V - 2^(K-1)) q_p; the GPU kernels
compute the same exact sum (as a float with no rounding) and the same final product, so they rebuild these weights
bitwise.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from raytrain.compress.bits import pack_bits, packed_size, unpack_bits
from raytrain.compress.lfsr import LFSRConfig, centred_table, matrices, offset_of_state, state_of_offset

PRESETS = {4: (8, 3), 3: (12, 4)}  # bits per weight -> (C, P) at K=16: (16 + 4 + 4P) / C bits
EXPONENT_RULES = ("range75", "range7", "literal", "search3")
SEED_CONVENTIONS = ("lfsr_state", "cycle_offset")
BLOCKINGS = ("row", "flat")
QMIN, QMAX = -8, 7  # 4-bit two's complement, for the exponent and the coefficients alike
FIELD_BITS = 4
Codes = dict[str, torch.Tensor]


@dataclass
class SeedLMConfig:
    """One SeedLM configuration; `for_bits` gives the paper's 4-bit (8, 3) and 3-bit (12, 4) presets."""

    C: int = 8  # weights per block
    P: int = 3  # coefficients per block
    K: int = 16  # LFSR width
    taps: list[int] = field(default_factory=lambda: [0, 1, 3, 12])
    exponent_rule: str = "range75"  # range75 | range7 | literal | search3 (spec §6)
    seed_convention: str = "lfsr_state"  # what `seeds` stores: lfsr_state (what hardware regenerates) | cycle_offset
    seed_chunk: int | None = None  # search_torch: candidates per step; None: 256 on CPU (cache-sized), 4096 on GPU
    block_chunk: int | None = None  # search_torch: blocks per step; None: 1024 on CPU, 8192 on GPU. Memory of one step
    # is about 3 * seed_chunk * block_chunk * C * 4 bytes
    blocking: str = "row"  # row (each row padded to whole blocks; the GPU kernels' layout) | flat (spec default)

    def __post_init__(self) -> None:
        if self.C < 1 or not 1 <= self.P <= 4 or self.P > self.C:
            raise ValueError(f"seedlm C={self.C}, P={self.P}: need 1 <= P <= min(C, 4) (the int32 decode is exact "
                             "for P <= 4)")
        if self.seed_convention not in SEED_CONVENTIONS:
            raise ValueError(f"seedlm seed_convention={self.seed_convention!r}: known {', '.join(SEED_CONVENTIONS)}")
        if self.exponent_rule not in EXPONENT_RULES:
            raise ValueError(f"seedlm exponent_rule={self.exponent_rule!r}: known {', '.join(EXPONENT_RULES)}")
        if self.blocking not in BLOCKINGS:
            raise ValueError(f"seedlm blocking={self.blocking!r}: known {', '.join(BLOCKINGS)}")
        if (self.seed_chunk or 1) < 1 or (self.block_chunk or 1) < 1:
            raise ValueError("seedlm seed_chunk and block_chunk must be positive")
        self.lfsr  # validates K and taps

    @classmethod
    def for_bits(cls, bits: int, **overrides: Any) -> SeedLMConfig:
        if bits not in PRESETS:
            raise ValueError(f"bits={bits}: SeedLM presets exist for {sorted(PRESETS)} bits per weight")
        C, P = PRESETS[bits]
        return cls(C=C, P=P, **overrides)

    @property
    def lfsr(self) -> LFSRConfig:
        return LFSRConfig(self.K, tuple(self.taps))

    @property
    def bits_per_block(self) -> int:
        return self.K + FIELD_BITS + FIELD_BITS * self.P

    def meta(self) -> dict[str, Any]:
        """What a decoder must know, recorded with every tensor (spec §2.4)."""
        return {"C": self.C, "P": self.P, "K": self.K, "taps": list(self.taps), "exponent_rule": self.exponent_rule,
                "rounding": "half_even", "seed_convention": self.seed_convention, "blocking": self.blocking}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> SeedLMConfig:
        if meta.get("blocking") not in BLOCKINGS or meta.get("rounding") != "half_even":
            raise ValueError(f"blocking={meta.get('blocking')!r}, rounding={meta.get('rounding')!r}: this decoder "
                             f"reads {' or '.join(BLOCKINGS)} blocking with half-even rounding")
        return cls(C=meta["C"], P=meta["P"], K=meta["K"], taps=list(meta["taps"]),
                   exponent_rule=meta["exponent_rule"], seed_convention=meta["seed_convention"],
                   blocking=meta["blocking"])


def blocks_per_row(cols: int, cfg: SeedLMConfig) -> int:
    return math.ceil(cols / cfg.C)


def block_count(shape: tuple[int, int], cfg: SeedLMConfig) -> int:
    rows, cols = shape
    return rows * blocks_per_row(cols, cfg) if cfg.blocking == "row" else math.ceil(rows * cols / cfg.C)


def padding(shape: tuple[int, int], cfg: SeedLMConfig) -> int:
    """Zero weights stored beyond the real ones (row blocking pads every row, flat blocking the tail only)."""
    return block_count(shape, cfg) * cfg.C - shape[0] * shape[1]


def row_alignment(cols: int, cfg: SeedLMConfig) -> int:
    """Row ranges encoded separately must start at multiples of this many rows to concatenate (flat blocking: a
    block must not straddle two ranges)."""
    if cfg.blocking == "row":
        return 1
    _check_flat(cols, cfg)
    return cfg.C // math.gcd(cols, cfg.C)


def _check_flat(cols: int, cfg: SeedLMConfig) -> None:
    if cols < cfg.C:  # the decoder recovers the row count from the block count: the padding must be under a row
        raise ValueError(f"seedlm blocking=flat needs rows of at least C={cfg.C} weights; this weight has {cols}")


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32, built from its bit pattern so that it is exact on every device (the kernel does the same)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


# ---- encoding --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def search_tables(C: int, P: int, lfsr: LFSRConfig, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """U (N, C, P) and pinv(U) (N, P, C) for every cycle offset, as fp32 on `device` (pinv by float64 SVD: some
    windows are nearly collinear, condition numbers up to 5e5, and fp32 normal equations corrupt them)."""
    U = matrices(torch.arange(lfsr.period), C, P, lfsr, torch.float64)
    return U.float().to(device), torch.linalg.pinv(U).float().to(device)


def quantise(t: torch.Tensor, rule: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Candidate (exponent, coefficients) pairs for least-squares coefficients t (..., P, nb); one pair except for
    `search3`, which also tries the range-filling exponent -1 and +1. Coefficients come back multiplied by 2^e."""
    amax = t.abs().amax(-2)
    if rule == "literal":  # the paper's printed rule, e = max_i floor(log2 |t_i|)
        e0 = torch.frexp(amax).exponent - 1
    else:  # range filling: e = ceil(log2(amax / 7.5)) (or / 7); frexp gives ceil(log2 x) without log2's rounding
        mantissa, ex = torch.frexp(amax / (7.0 if rule == "range7" else 7.5))
        e0 = ex - (mantissa == 0.5).to(ex.dtype)
    e0 = torch.where(amax == 0, QMIN, e0)
    deltas = (-1, 0, 1) if rule == "search3" else (0,)
    candidates = []
    for d in deltas:
        e = (e0 + d).clamp(QMIN, QMAX)
        scale = pow2(e).unsqueeze(-2)
        candidates.append((e, (t / scale).round_().clamp_(QMIN, QMAX).mul_(scale)))
    return candidates


def search(blocks: torch.Tensor, cfg: SeedLMConfig, device: str | torch.device = "cpu") -> Codes:
    """Exhaustive search for (nb, C) blocks: cycle offsets int32 (nb,), exponents int8 (nb,), coefficients int8
    (nb, P). On CUDA the fused Triton kernel (`kernels/seedlm_search.py`, several times faster), elsewhere
    `search_torch`; both are deterministic and pick the same codes up to ties broken by fp32 rounding."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        from raytrain.compress.kernels.seedlm_search import search as fused_search

        return fused_search(blocks.to(device), cfg)
    return search_torch(blocks, cfg, device)


def search_torch(blocks: torch.Tensor, cfg: SeedLMConfig, device: str | torch.device = "cpu") -> Codes:
    """The search in PyTorch, vectorised over blocks x candidates in memory-bounded chunks. The winner is the
    smallest (error, offset), and for one offset the first exponent candidate, so the result does not depend on how
    offsets are chunked."""
    device = str(torch.device(device))
    gpu = device.startswith("cuda")
    seed_chunk = cfg.seed_chunk or (4096 if gpu else 256)
    block_chunk = cfg.block_chunk or (8192 if gpu else 1024)
    U, pinv = search_tables(cfg.C, cfg.P, cfg.lfsr, device)
    results = [_search_chunk(blocks[i:i + block_chunk].to(device, torch.float32), U, pinv, cfg, seed_chunk)
               for i in range(0, blocks.shape[0], block_chunk)]
    return {k: torch.cat([r[k] for r in results]).cpu() for k in ("offsets", "exponents", "coefficients")}


def _search_chunk(blocks: torch.Tensor, U: torch.Tensor, pinv: torch.Tensor, cfg: SeedLMConfig,
                  seed_chunk: int) -> Codes:
    C, P, nb = cfg.C, cfg.P, blocks.shape[0]
    wT = blocks.T.contiguous()  # (C, nb): blocks innermost, so every step below is a dense GEMM or broadcast
    best = torch.full((nb,), math.inf, device=blocks.device)
    best_offset = torch.zeros(nb, dtype=torch.int64, device=blocks.device)
    best_e = torch.zeros(nb, dtype=torch.int64, device=blocks.device)
    best_coef = torch.zeros(P, nb, device=blocks.device)
    for start in range(0, U.shape[0], seed_chunk):
        Uc, pinv_c = U[start:start + seed_chunk], pinv[start:start + seed_chunk]
        n = Uc.shape[0]
        t = (pinv_c.reshape(n * P, C) @ wT).view(n, P, nb)  # least-squares coefficients
        for e, coef in quantise(t, cfg.exponent_rule):
            err = torch.bmm(Uc, coef).sub_(wT).square_().sum(1)  # (n, nb) error of the quantised reconstruction
            i = err.argmin(0)  # first minimum: lowest offset within the chunk
            err_i = err.gather(0, i[None])[0]
            # key (error, offset) across chunks and exponents; for one offset, the earlier exponent keeps a tie
            better = (err_i < best) | ((err_i == best) & (i + start < best_offset))
            best = torch.where(better, err_i, best)
            best_offset = torch.where(better, i + start, best_offset)
            best_e = torch.where(better, e.gather(0, i[None])[0].long(), best_e)
            chosen = coef.gather(0, i[None, None].expand(1, P, nb))[0]
            best_coef = torch.where(better, chosen, best_coef)
    q = (best_coef / pow2(best_e)).round().T
    return {"offsets": best_offset.int(), "exponents": best_e.to(torch.int8), "coefficients": q.to(torch.int8)}


def encode(weight: torch.Tensor, cfg: SeedLMConfig, device: str | torch.device = "cpu") -> Codes:
    """Codes of a [rows, cols] weight. Row blocking: offsets / exponents (rows, bpr), coefficients (rows, bpr, P),
    each row zero-padded to bpr * C weights. Flat blocking: offsets / exponents (blocks,), coefficients
    (blocks, P), the row-major flattened weight zero-padded to whole blocks."""
    rows, cols = weight.shape
    if cfg.blocking == "flat":
        _check_flat(cols, cfg)
        flat = weight.float().reshape(-1)
        return search(F.pad(flat, (0, padding((rows, cols), cfg))).view(-1, cfg.C), cfg, device)
    bpr = blocks_per_row(cols, cfg)
    blocks = F.pad(weight.float(), (0, bpr * cfg.C - cols)).reshape(rows * bpr, cfg.C)
    codes = search(blocks, cfg, device)
    return {"offsets": codes["offsets"].view(rows, bpr), "exponents": codes["exponents"].view(rows, bpr),
            "coefficients": codes["coefficients"].view(rows, bpr, cfg.P)}


# ---- decoding --------------------------------------------------------------------------------------------------

def decode(codes: Codes, cfg: SeedLMConfig, cols: int, chunk_blocks: int = 1 << 18) -> torch.Tensor:
    """fp32 [rows, cols] weight from codes, by the exact integer form (bitwise what the kernel computes). With flat
    blocking the rows follow from the block count (cols >= C: the padding is less than a row)."""
    offsets = codes["offsets"].reshape(-1).long()
    device = offsets.device
    e = codes["exponents"].reshape(-1)
    q = codes["coefficients"].reshape(-1, cfg.P).to(torch.int32)
    table = centred_table(cfg.lfsr, cfg.C * cfg.P).to(device)
    inv = torch.tensor(1.0 / (cfg.lfsr.centre - 1), dtype=torch.float32, device=device)
    window = torch.arange(cfg.C * cfg.P, device=device)
    out = torch.empty(offsets.numel(), cfg.C, device=device)
    for i in range(0, offsets.numel(), chunk_blocks):
        V = table[offsets[i:i + chunk_blocks, None] + window].view(-1, cfg.C, cfg.P)  # int32 V - 2^(K-1)
        sums = (V * q[i:i + chunk_blocks, None, :]).sum(-1, dtype=torch.int32)  # exact: |sum| <= 2^21
        out[i:i + chunk_blocks] = sums.float() * (pow2(e[i:i + chunk_blocks, None]) * inv)
    if cfg.blocking == "flat":
        return out.view(-1)[:out.numel() // cols * cols].view(-1, cols)
    rows = codes["offsets"].shape[0]
    return out.view(rows, -1)[:, :cols]


# ---- stored arrays ---------------------------------------------------------------------------------------------

def pack(codes: Codes, cfg: SeedLMConfig) -> dict[str, torch.Tensor]:
    """Stored arrays: `seeds` (LFSR state per block, uint16 for K <= 16), `exponents` and `coefficients` as 4-bit
    two's complement nibble streams (block-major, low nibble first): K + 4 + 4P bits per block."""
    seeds = codes["offsets"].reshape(-1).long()
    if cfg.seed_convention == "lfsr_state":
        seeds = state_of_offset(seeds, cfg.lfsr)
    return {"seeds": seeds.to(torch.uint16 if cfg.K <= 16 else torch.int32),
            "exponents": pack_bits(codes["exponents"], FIELD_BITS),
            "coefficients": pack_bits(codes["coefficients"], FIELD_BITS)}


def expected_sizes(shape: tuple[int, int], cfg: SeedLMConfig) -> dict[str, int]:
    blocks = block_count(shape, cfg)
    return {"seeds": blocks, "exponents": packed_size(blocks, FIELD_BITS),
            "coefficients": packed_size(blocks * cfg.P, FIELD_BITS)}


def check_arrays(arrays: dict[str, torch.Tensor], cfg: SeedLMConfig) -> None:
    """Raise ValueError for seeds that no encoder writes (sizes are checked by the format reader)."""
    seeds = arrays["seeds"].to(torch.int64)
    low, high = (1, cfg.lfsr.period) if cfg.seed_convention == "lfsr_state" else (0, cfg.lfsr.period - 1)
    if seeds.numel() and (seeds.min() < low or seeds.max() > high):
        raise ValueError(f"seeds outside {low}..{high} ({cfg.seed_convention}, K={cfg.K})")


def offsets_of(arrays: dict[str, torch.Tensor], cfg: SeedLMConfig) -> torch.Tensor:
    """Cycle offset per block, int64, from the stored seeds."""
    seeds = arrays["seeds"].to(torch.int64)
    return offset_of_state(cfg.lfsr).to(seeds.device)[seeds] if cfg.seed_convention == "lfsr_state" else seeds


def with_cycle_offsets(arrays: dict[str, torch.Tensor], cfg: SeedLMConfig
                       ) -> tuple[dict[str, torch.Tensor], SeedLMConfig]:
    """The same tensor with cycle offsets in place of LFSR states (as many bytes): what a kernel gathers by."""
    if cfg.seed_convention == "cycle_offset":
        return arrays, cfg
    offsets = offsets_of(arrays, cfg).to(arrays["seeds"].dtype)
    return {**arrays, "seeds": offsets}, dataclasses.replace(cfg, seed_convention="cycle_offset")


def unpack(arrays: dict[str, torch.Tensor], cfg: SeedLMConfig, shape: tuple[int, int]) -> Codes:
    """Codes back from stored arrays."""
    blocks = block_count(shape, cfg)
    lead = (shape[0], blocks_per_row(shape[1], cfg)) if cfg.blocking == "row" else (blocks,)
    return {"offsets": offsets_of(arrays, cfg).int().view(lead),
            "exponents": unpack_bits(arrays["exponents"], FIELD_BITS, blocks).view(lead),
            "coefficients": unpack_bits(arrays["coefficients"], FIELD_BITS, blocks * cfg.P).view(*lead, cfg.P)}
