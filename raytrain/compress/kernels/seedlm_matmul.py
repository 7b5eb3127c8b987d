"""SeedLM on the GPU in Triton: the fused decode-time matmul y = x W^T (batch 1..16) and the dense decode (prefill).

Batch-1 decode reads 4 bits per weight instead of bf16's 16, so it could be 4x faster, but only if rebuilding the
weights costs less than the bytes it saves. At 4096x14336 the compressed weight is 29 MB (7 us of HBM on an H200),
while the issue rate of 132 SMs x 4 schedulers x 1.98 GHz allows about 14 instructions per weight in the ~25 us a bf16
GEMV takes. So the kernel is built around instruction counts, with every weight rebuilt in registers:

* The C*P states of a block are windows of its LFSR output bit stream s: state k is bits k+1 .. k+K. The stream comes
  from the seed in ~20 shift/XOR instructions (`stream="lfsr"`: the next K bits are an XOR of shifted copies of the
  XOR of the tapped windows, see `inverse_shifts`); from two 4-byte gathers in 1 KiB tables, one per seed byte, whose
  entries XOR to the bits after the seed (`stream="bytes"`: the register is linear over GF(2), see `byte_tables`;
  through L1, or from shared memory with `KernelConfig.shared_tables`;
  the block's word, seed in its top half, is the stream's low 32 bits as loaded, `stream_low`);
  or from one 8-byte gather in a 32 KiB table of the m-sequence indexed by the cycle offset (`stream="table"`).
  `default_stream` gathers for large weights, whose many warps hide the L1 latency, and computes for small ones. No
  128 KiB state table, no per-state gathers.
* A state becomes a float with one LOP3: a 32-bit copy of the stream is placed so that the state's K bits fall in the
  mantissa, and the exponent is ORed in (F = 2^E + V 2^-K). One copy serves all P states of a weight; the exponent
  E = P-1-p keeps every product q_p F exact, so the FFMA chain q_0 F_0 + ... - offset is the exact integer sum
  2^-K sum_p q_p (V_p - 2^(K-1)): about two instructions per state, no integer multiply, no int->float conversion.
* The shared exponent becomes 2^(e-7) with one LOP3 and is folded with 2^(7+K) / (2^(K-1) - 1) into one scale per
  block, applied after the block's dot product: for a one-hot x the result is bitwise `seedlm.decode`'s weight.
* Batch 1 need not build the weights: sum_c d_c x_c = sum_p q_p sum_c (F_cp - 2^(P-1-p) - 1/2) x_c takes P FFMAs a
  weight where the weights take P + 1, and each state's sum starts at -(2^(P-1-p) + 1/2) sum_c x_c, which a
  column's rows share, so the centring costs nothing a block (`_state_sums`; one-hot x still bitwise, other x to
  about 2^-21 of sum |x| a block). It runs where a program takes two steps or more; one-step launches sum a weight
  at a time (`_weight_sums`, which differs from a dense fp32 GEMV only in rounding order): see `BY_STATE_STEPS`.
* Compressed arrays are reshaped at load time (`SeedLMWeight`, the file format is unchanged): one int32 word per block,
  [q_0 .. q_P-1 nibbles | exponent | 16-bit seed], so each thread reads 4 bytes per block, coalesced along the row,
  as a flat tile declared non-contiguous (`_one_per_thread`): a launch's alignment would otherwise vectorise the load
  4 columns a thread and the tile would be converted back through shared memory every step.

Threads own block columns and `block_m` rows (the x words for a column are loaded once per `block_m` rows). With
`KernelConfig.prefetch` the words are double-buffered in registers: the next step's loads are issued before this step's
rebuild, so that their latency overlaps it (the tile sweep of `benchmarks/seedlm_kernel.py` times both). Compiled for
sm_90a as launched (Triton 3.9, `benchmarks/seedlm_sass.py` on CPU), the batch-1 main loop at block_m=8, summed by
state, is ~12.4 instructions per weight with the LFSR stream, ~10.8 with the byte tables and ~10.7 with the m-sequence
table (13.3 / 11.6 / 11.5 a weight at a time), with no spills, and no shared memory or barriers but the byte
tables' when they are gathered from shared memory (2 stores, 4 barriers and an LDS a table and row a step). Fewer
instructions do not mean less time here: the batch-1 kernel waits more than it issues, and where ptxas places the
next step's word loads moves it by up to 40% (docs/seedlm_kernel.md). Batch 1 accumulates with FFMA and reduces the
row at the end; batch 2..16 rebuilds a step's (rows, blocks x C) tile with each block's C weights joined
in one thread (`_weight_stack`) and feeds it to one `tl.dot` (tensor cores in bf16). With 8-weight blocks and 16 rows a
warp the blocks are dealt to threads in the MMA's A-operand fragment order and the dot's k is permuted to match
(`_fragment_order`), so the rebuilt registers are the operand and only x goes through shared memory; other tiles reach
shared memory in 16-byte stores.
With `split_k` > 1 the programs of a row tile each sum a share of the row; the last one to finish adds their fp32
partial sums in split order and stores y (`_store_sums`), so a split launch is one kernel and its sums are the same
every run. Its arrival counts live in the weight (`SeedLMWeight.split_counts`): launches on one weight must be ordered
on one stream, as a model's layers are.
`seedlm_dense` rebuilds W (bitwise `seedlm.decode`, then rounded to the requested dtype) with 8-byte stores for prefill.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (slowly), which is how CPU tests check them.

`seedlm_gemv` is the batch-1 kernel with the fused variants of `raytrain/infer/gemv_kernel.py`, for the fused decode
step (`raytrain/infer/fused_decode.py`), rounding where that kernel rounds: `norm` (x RMS-normalised with a gain: the
squares of x accumulated as x is read, the row sums scaled at the end, so split_k must be 1), `swiglu` (W holds gate
and up halves; each program runs its gate rows, then its up rows, through the same loop) and `residual`, each a
constexpr that is off in `seedlm_matmul`, whose code is unchanged by them. With `dependent_launch` (sm90+) it is a
programmatic dependent launch: the first step's words (never written by the previous kernel) are loaded before it
waits, x, the gain and the residual after.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from raytrain.compress import seedlm
from raytrain.compress.format import CompressedTensor
from raytrain.compress.lfsr import LFSRConfig, state_of_offset, stream_bits
from raytrain.infer.gemv_kernel import fused_outputs

MAX_BATCH = 16
GEMV_PROGRAMS = 1024  # batch-1 programs (about 8 an SM on 132 SMs) below which 4-row tiles beat 8-row ones
WIDE_ROWS = 3328  # batch-1 rows up to which 8 warps along a row of more than 128 blocks beat 4 (H200, 2026-12-06)
LONG_ROW_BLOCKS = 1024  # blocks a row above which batch 1 takes 8 rows over 8 warps, batch 2..16 16 splits, not 8
# Batch 1: steps a program from which the block sums are grouped by state (`_state_sums`). H100, 2026-12-06, every
# fused-step projection of openelm_1_1b by state against a weight at a time: one-step launches 14.6% slower (the
# 2,048-row ones at 8 rows over 8 warps 3.8 -> 5.1 us; they compile to 80 registers against 111, and capping the
# other form at 80 slowed it the same way), two steps even, 3-4 steps 1-2% faster, 4096 x 14336 and 14336 x 4096
# 3-5% faster (`benchmarks/results/seedlm_*_2026-12-06_06{44,46,47}*`).
BY_STATE_STEPS = 2
STREAMS = ("lfsr", "table", "bytes")
BYTES_FROM_WEIGHTS = 1 << 24  # weights from which `default_stream` gathers ("bytes") rather than computes the bits
SEED_BIT = 16  # a word's seed (cycle offset for "table") is its bits 16..31 (`pack_words`)
TABLE_BITS = 49  # a table entry shifted by up to 15 leaves stream bits 0..48 of the block


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 4  # output rows per program; each thread holds all of them for its block columns
    block_n: int = 128  # SeedLM blocks per row per step: 32 lanes x num_warps, one block column per thread
    num_warps: int = 4
    num_stages: int = 1
    split_k: int = 1  # programs per row tile, each over a share of the blocks; the last to finish adds them up
    prefetch: bool = False  # load the next step's words before rebuilding this step's weights (to hide HBM latency)
    fragment_order: bool = True  # batch 2..16: rebuild straight into the MMA's A registers where the tile allows
    max_registers: int | None = None  # ptxas register cap per thread (None: the compiler's choice)
    shared_tables: bool = False  # stream="bytes": gather from a shared-memory copy of the tables (tl.gather), not L1


def default_config(batch: int, rows: int = 4096, blocks_per_row: int = 512) -> KernelConfig:
    """Tiles for 1 and 2..16 rows of x of a (rows, blocks_per_row) weight, from the GPU sweeps of
    `benchmarks/seedlm_kernel.py` and `benchmarks/seedlm_fused_gemv.py`. Batch 1, with prefetch: 8 rows (H200,
    2026-12-05) from 8,192 rows up, else 4 (H100 on openelm_1_1b's shapes, 2026-12-05 17:01: 4 rows faster at
    1,536-5,632 rows, within 2% of 8 at 14,336); up to 2,048 rows of more than 128 blocks (one 4-warp step), 8
    rows over 8 warps (H100, the fused step's variants, 17:18: 1.2-1.4x the 4-row tile on the output and down
    projections; H200, 2026-12-06, every layer of openelm_1_1b: a step costs about 3 us at these shapes, and
    2,048 x 1,280 weights took 6.1 us in two 4-warp steps, 2,048 x 1,536 ones 3.9 in one 8-warp step), and 4 rows
    over 8 warps up to WIDE_ROWS (H200, 03:55, the same sweep: QKV at 2,304-3,072 rows 4.8-5.6 us against 7.0 at
    4 rows over 4 warps, gate/up at 2,304-3,328 outputs 8.8-12.0 against 11.8-12.3; from 3,584 up 4 warps won).
    Above WIDE_ROWS, rows of more than LONG_ROW_BLOCKS blocks take 8 rows over 8 warps (H100, 4,096 x 14,336 at
    04:23, 06:24 and 06:58: 35.0 / 35.5 / 33.7 us against 36.4 / 37.0 / 35.6 at 8 rows over 4 warps).
    The byte tables follow the same rule since their 4-row tile compiles to 48 registers, not 72 (the stream built
    on the word, the state sums started from x): at 4,096 x 4,096 as the fused step launches it (PDL), 4 rows took
    11.0 / 11.1 us against 8 rows' 13.1 / 13.2, and through `seedlm_matmul` 11.84 against 11.87 (H100, 2026-12-06
    09:28-09:36, `benchmarks/results/seedlm_candidates_h100_2026-12-06.log`). The 8-row, 4-warp tile gathers the
    byte tables from shared memory (`shared_tables`): at 14,336 x 4,096, 32.85 / 32.93 us against 34.05 / 34.13
    through L1; the other two defaults were even or slower with it (4,096 x 4,096 11.63 / 12.00 against 11.58 /
    11.98, 4,096 x 14,336 34.34 / 33.93 against 33.78 / 33.79; H100, 2026-12-06 11:51,
    `benchmarks/results/seedlm_shared_tables_ab_h100_2026-12-06.log`). Batch 2..16 (H100, 2026-12-05 22:06):
    64 rows over one warp group, prefetch, each row split over up to 8 programs (`_store_sums`). 64 rows let Hopper's
    wgmma take the rebuilt tile; at 32 rows mma.sync needed its operands shuffled out of shared memory (15.2 against
    13.0 instructions a weight): 6-12% less time than 32 rows by 32 blocks on the three large shapes
    (docs/seedlm_kernel.md). 8 blocks a step (bytes, H100, 2026-12-06 09:16 and 09:40: 4,096 x 4,096 17.0 / 17.0 us
    against 17.7 / 17.7 at 16 blocks, 14,336 x 4,096 43.6 / 43.9 against 48.0 / 48.3). Rows of more than
    LONG_ROW_BLOCKS blocks take 16 blocks a step, split 16 ways (4,096 x 14,336: 45.8 against 47.6 us on an H100,
    2026-12-06 04:23; 47.2 against 48.3 and 46.9 against 48.0 on an H200, 03:53 and 02:19; on 512-block rows 16
    splits lost 4-12%; 8 blocks a step 46.5 / 48.4 against 45.9 / 48.7, 09:16 and 09:40). Around this default, 17
    batch-8 tiles were none more than 1% faster on any of the three shapes (H100, 2026-12-06 11:26,
    `benchmarks/results/seedlm_b8_tiles_h100_2026-12-06.log`)."""
    if batch == 1:
        if rows <= WIDE_ROWS and blocks_per_row > 128:  # few rows, long ones: 8 warps along the row
            return KernelConfig(block_m=8 if rows <= 2048 else 4, block_n=256, num_warps=8, prefetch=True)
        if blocks_per_row > LONG_ROW_BLOCKS:
            return KernelConfig(block_m=8, block_n=256, num_warps=8, prefetch=True)
        if triton.cdiv(rows, 8) >= GEMV_PROGRAMS:
            return KernelConfig(block_m=8, prefetch=True, shared_tables=True)
        return KernelConfig(block_m=4, prefetch=True)
    steps = 16 if blocks_per_row > LONG_ROW_BLOCKS else 8  # blocks a step, and programs a row
    return KernelConfig(block_m=64, block_n=steps, num_warps=4,
                        split_k=max(1, min(steps, triton.cdiv(blocks_per_row, steps))), prefetch=True)


@dataclass
class SeedLMWeight:
    """The kernel's operands for one compressed [rows, cols] weight, laid out for it on one device."""

    words: torch.Tensor  # int32 (rows, bpr): q_p nibble at bits 4p, exponent at bits 12..15 (P <= 3), seed at 16..31
    exps: torch.Tensor  # uint8 (rows, ceil(bpr / 2)): exponent nibbles, low nibble first (P = 4); empty otherwise
    table: torch.Tensor  # stream="table": int64 m-sequence windows; "bytes": int32/int64 (ceil(K/8) * 256,); else empty
    masks: torch.Tensor  # int32 (9,): state masks (4), coefficient masks (4), exponent mask, kept in registers
    rows: int
    cols: int
    C: int
    P: int
    lfsr: LFSRConfig
    stream: str
    inv_scale: float  # 2^(7+K) / (2^(K-1) - 1) in fp32: with the kernel's 2^(e-7), 2^K times seedlm.decode's scale
    stream_args: dict[str, int | str]  # the constexprs of the stream: K, STREAM, TAPS, INV, LOW
    split_counts: torch.Tensor  # int32 (rows,): per row tile, split programs done (`_store_sums`); 0 between launches

    @classmethod
    def from_compressed(cls, ct: CompressedTensor, device: torch.device | str, stream: str | None = None
                        ) -> SeedLMWeight:
        """stream: how the kernels regenerate the LFSR bits (STREAMS); None: `default_stream` of the shape."""
        if ct.method != "seedlm":
            raise ValueError(f"the SeedLM kernel takes seedlm tensors, not {ct.method}")
        cfg: seedlm.SeedLMConfig = ct.config
        stream = stream or default_stream(*ct.shape)
        check_supported(cfg, stream)
        arrays = {k: v.cpu() for k, v in ct.arrays.items()}  # packed once on the host, then moved
        codes = seedlm.unpack(arrays, cfg, ct.shape)
        offsets = codes["offsets"]
        if stream == "table":
            seeds = offsets
        elif cfg.seed_convention == "lfsr_state":
            seeds = arrays["seeds"].to(torch.int32).view(offsets.shape)
        else:
            seeds = state_of_offset(offsets.reshape(-1), cfg.lfsr).view(offsets.shape)
        words, exps = pack_words(seeds, codes["exponents"], codes["coefficients"])
        table = stream_operand(stream, cfg)
        m0 = 24 - cfg.K - cfg.P
        masks = [((1 << cfg.K) - 1) << (m0 + p) for p in range(4)] + [15 << (4 * p) for p in range(4)] + [15 << 23]
        inv = float(torch.tensor(1.0 / (cfg.lfsr.centre - 1), dtype=torch.float32) * 2.0 ** (7 + cfg.K))
        stream_args = {"K": cfg.K, "STREAM": stream, "TAPS": sum(1 << t for t in cfg.taps),
                       "INV": sum(1 << k for k in inverse_shifts(cfg.lfsr)), "LOW": stream_low(stream, cfg)}
        return cls(words.to(device), exps.to(device), table.to(device),
                   torch.tensor(masks, dtype=torch.int32, device=device), ct.shape[0], ct.shape[1], cfg.C, cfg.P,
                   cfg.lfsr, stream, inv, stream_args, torch.zeros(ct.shape[0], dtype=torch.int32, device=device))

    @property
    def blocks_per_row(self) -> int:
        return self.words.shape[1]

    @property
    def stored_bytes(self) -> int:
        return self.words.numel() * 4 + self.exps.numel()


def default_stream(rows: int, cols: int) -> str:
    """"bytes" for weights of 2^24 or more (H100, 2026-12-05 19:13: 8% faster than "lfsr" at 4096x14336 and
    14336x4096, 4% at 4096x4096), "lfsr" below: on openelm_1_1b's 2048-wide QKV and output projections the gathers'
    latency made "bytes" 12-13% slower (docs/seedlm_kernel.md)."""
    return "bytes" if rows * cols >= BYTES_FROM_WEIGHTS else "lfsr"


def stream_low(stream: str, cfg: seedlm.SeedLMConfig) -> int:
    """Where the kernels' 64-bit stream of a block holds its bit 0: SEED_BIT for "bytes" when the K + C*P bits fit
    above it, so that the word, seed in place, is its low half as loaded; else 0."""
    return SEED_BIT if stream == "bytes" and SEED_BIT + cfg.K + cfg.C * cfg.P <= 64 else 0


def check_supported(cfg: seedlm.SeedLMConfig, stream: str) -> None:
    """The kernel's limits: 16-bit seeds, the whole stream of a block in 64 bits, exact FFMA sums (K + P <= 21)."""
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r}: known {', '.join(STREAMS)}")
    if cfg.K > 16 or cfg.K + cfg.C * cfg.P > 64 or cfg.K + cfg.P > 21:
        raise ValueError(f"the SeedLM kernel needs K <= 16, K + C*P <= 64 and K + P <= 21; got K={cfg.K}, "
                         f"C={cfg.C}, P={cfg.P}")
    if stream == "table" and cfg.K + cfg.C * cfg.P > TABLE_BITS:
        raise ValueError(f"stream='table' reads {TABLE_BITS} stream bits per block; K + C*P = "
                         f"{cfg.K + cfg.C * cfg.P} needs stream='lfsr' or 'bytes'")


def inverse_shifts(lfsr: LFSRConfig) -> list[int]:
    """Shifts k with B = XOR_k T << k (mod 2^K) for the K stream bits B after a window A, T = XOR_t A >> t: B =
    T ^ N B with N = sum of left shifts by K - t over the nonzero taps, so B = (1 + N)^-1 T = sum_i N^i T (N is
    nilpotent); shifts that occur an even number of times cancel."""
    N = [lfsr.K - t for t in lfsr.taps if t > 0]
    total, power = {0}, {0}
    while power:
        step: dict[int, int] = {}
        for a in power:
            for b in N:
                if a + b < lfsr.K:
                    step[a + b] = step.get(a + b, 0) ^ 1
        power = {k for k, odd in step.items() if odd}
        total ^= power
    return sorted(total)


def pack_words(seeds: torch.Tensor, exponents: torch.Tensor, coefficients: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 words (rows, bpr) [q nibbles | exponent (P <= 3) | seed << 16] and, for P = 4, the exponents as a
    row-padded nibble stream (rows, ceil(bpr / 2)); two's complement nibbles as in the file."""
    rows, bpr, P = coefficients.shape
    words = seeds.to(torch.int64) << SEED_BIT
    for p in range(P):
        words |= (coefficients[..., p].to(torch.int64) & 15) << (4 * p)
    e = exponents.to(torch.int64) & 15
    if P <= 3:
        words |= e << 12
        exps = torch.zeros(0, dtype=torch.uint8, device=seeds.device)
    else:
        e = torch.nn.functional.pad(e, (0, bpr % 2)).view(rows, -1, 2)
        exps = (e[..., 0] | (e[..., 1] << 4)).to(torch.uint8).contiguous()
    words = words - ((words >> 31) << 32)  # to int32 two's complement
    return words.to(torch.int32).contiguous(), exps


def stream_operand(stream: str, cfg: seedlm.SeedLMConfig) -> torch.Tensor:
    """The table a stream gathers from (a placeholder for "lfsr", which computes its bits)."""
    if stream == "table":
        return stream_table(cfg.lfsr)
    if stream == "bytes":
        return byte_tables(cfg.lfsr, cfg.C * cfg.P)
    return torch.zeros(1, dtype=torch.int64)


@functools.lru_cache(maxsize=8)  # the same for every weight of a model: built once, not per layer
def byte_tables(lfsr: LFSRConfig, nbits: int) -> torch.Tensor:
    """Stream bits K .. K+nbits-1 of the seed v << 8i in entry 256i + v, for each byte i of a K-bit seed: the
    register is linear over GF(2), so a seed's bits are the XOR of the entries of its bytes. int32 while the bits
    fit 31 (no sign to extend), else int64; 1 KiB a table for (8,3), so that a warp's gathers touch few L1 lines."""
    K = lfsr.K
    seeds = ((torch.arange(256)[None, :] << (8 * torch.arange((K + 7) // 8))[:, None]) & lfsr.period).reshape(-1)
    tail = torch.from_numpy(stream_bits(lfsr, K + nbits, seeds.numpy())[:, K:].astype("int64"))
    return (tail << torch.arange(nbits)).sum(1).to(torch.int32 if nbits <= 31 else torch.int64)


@functools.lru_cache(maxsize=8)  # 46 ms a build on CPU, the same for every weight of a model
def stream_table(lfsr: LFSRConfig) -> torch.Tensor:
    """int64 entries i = 0 .. (N-1) >> 4: bits 16i .. 16i+63 of the m-sequence (the stream from seed 1). The block at
    cycle offset o has stream bits m[o + n], so entry o >> 4 shifted right by o & 15 holds its bits 0 .. 48."""
    entries = ((lfsr.period - 1) >> 4) + 1
    period = stream_bits(lfsr, lfsr.period)
    m = torch.from_numpy(period[torch.arange(16 * entries + 64).remainder(lfsr.period).numpy()].astype("int64"))
    windows = m.unfold(0, 64, 16)[:entries]  # (entries, 64)
    return (windows << torch.arange(64)).sum(1)  # wraps to two's complement, as the kernel reads it


# ---- decoding in registers -------------------------------------------------------------------------------------

@triton.jit
def _load_masks(masks_ptr):
    """State masks (4), coefficient masks (4) and the exponent mask as registers: LOP3 takes one immediate, so the
    second constant of each mask-and-OR must be a register (literals are re-materialised before every use)."""
    return (tl.load(masks_ptr), tl.load(masks_ptr + 1), tl.load(masks_ptr + 2), tl.load(masks_ptr + 3),
            tl.load(masks_ptr + 4), tl.load(masks_ptr + 5), tl.load(masks_ptr + 6), tl.load(masks_ptr + 7),
            tl.load(masks_ptr + 8))


@triton.jit
def _stream_lfsr(seed, K: tl.constexpr, TAPS: tl.constexpr, INV: tl.constexpr, NBITS: tl.constexpr):
    """int64 bits 0 .. NBITS-1 of each seed's output stream (bits 0 .. K-1 are the seed), K bits per round: the next K
    bits B after a K-bit window A obey B = T ^ sum_t (B << (K - t)) with T = XOR_t A >> t, so B is the XOR of T << k
    over the shifts k in INV (`inverse_shifts`)."""
    s = seed.to(tl.int64)
    a = seed
    for r in tl.static_range(1, (NBITS + K - 1) // K):
        t = a
        for i in tl.static_range(1, K):
            if (TAPS >> i) & 1:
                t ^= a >> i
        b = t
        for k in tl.static_range(1, K):
            if (INV >> k) & 1 and k < NBITS - r * K:  # shifts past the last bit needed only make unused bits
                b ^= t << k
        a = b & ((1 << K) - 1)
        s |= a.to(tl.int64) << (r * K)
    return s


@triton.jit
def _table_entry(table_ptr, index, SHARED_TABLES: tl.constexpr):
    """table_ptr[index] for a 256-entry table: an L1 gather, or with SHARED_TABLES tl.gather from the table loaded
    whole, which Triton stages in shared memory every step (two stores and four barriers a step at 8 rows)."""
    if SHARED_TABLES:
        return tl.gather(tl.load(table_ptr + tl.arange(0, 256)), index, 0)
    return tl.load(table_ptr + index)


@triton.jit
def _stream_bytes(w, table_ptr, K: tl.constexpr, LOW: tl.constexpr, SHARED_TABLES: tl.constexpr):
    """int64 stream bits of each word's seed from bit LOW: the seed, then the XOR of its bytes' `byte_tables` entries
    above it (one gather a byte instead of the LFSR's ~25 shifts and XORs: through L1, or with SHARED_TABLES from a
    copy of each table that tl.gather stages in shared memory). With LOW = SEED_BIT the word itself is the low half,
    seed in place: no instruction joins the two halves, and no state reaches the bits below."""
    seed = w >> 16 & 0xFFFF
    tail = _table_entry(table_ptr, seed & 255, SHARED_TABLES)
    for i in tl.static_range(1, (K + 7) // 8):
        tail ^= _table_entry(table_ptr + 256 * i, seed >> 8 * i & 255, SHARED_TABLES)
    if LOW > 0:
        return w.to(tl.uint32).to(tl.int64) | tail.to(tl.int64) << (LOW + K)
    return seed.to(tl.int64) | tail.to(tl.int64) << K


@triton.jit
def _coefficient(w, masks, p: tl.constexpr):
    """q_p as fp32: the nibble lands in the mantissa of 2^(23-4p), its sign bit flipped to make it q + 8."""
    bits = (w & masks[4 + p]) ^ (((150 - 4 * p) << 23) | (8 << (4 * p)))
    return bits.to(tl.float32, bitcast=True) - (2.0 ** (23 - 4 * p) + 8.0)


@triton.jit
def _block_terms(w, e_nibble, table_ptr, masks, C: tl.constexpr, P: tl.constexpr, K: tl.constexpr,
                 STREAM: tl.constexpr, TAPS: tl.constexpr, INV: tl.constexpr, LOW: tl.constexpr,
                 SHARED_TABLES: tl.constexpr):
    """Per block: its stream bits (int64, bit 0 at bit LOW: `stream_low`), 2^(e-7) (times inv_scale, 2^K times
    decode's scale 2^e / (2^(K-1) - 1)), and the offset that centres the states, sum_p q_p (2^(P-1-p) + 1/2)."""
    if STREAM == "lfsr":
        s = _stream_lfsr(w >> 16 & 0xFFFF, K, TAPS, INV, K + C * P)
    else:
        # gathered as a 1-D tensor: a 2-D gather has no contiguous dimension, and Triton versions break that tie in
        # the coalescing pass differently (3.6 puts lanes along the rows); 1-D, it keeps the words' thread mapping
        flat = tl.reshape(w, (w.shape[0] * w.shape[1],))
        if STREAM == "table":
            offset = flat >> 16 & 0xFFFF
            s = tl.load(table_ptr + (offset >> 4)) >> (offset & 15).to(tl.int64)
        else:
            s = _stream_bytes(flat, table_ptr, K, LOW, SHARED_TABLES)
        s = tl.reshape(s, w.shape)
    if P <= 3:
        ebits = (w << 11) & masks[8]
    else:
        ebits = e_nibble << 23
    exp2 = (ebits ^ (120 << 23)).to(tl.float32, bitcast=True)  # 2^(e-7): exponent field 112 + (e + 8)
    off = _coefficient(w, masks, 0) * (2.0 ** (P - 1) + 0.5)
    for p in tl.static_range(1, P):
        off += _coefficient(w, masks, p) * (2.0 ** (P - 1 - p) + 0.5)
    return s, exp2, off


@triton.jit
def _state(s, masks, c: tl.constexpr, p: tl.constexpr, P: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr):
    """State p of weight c of each block as F = 2^(P-1-p) + V 2^-K: its stream bits cP+p+1 .. cP+p+K (at bit LOW
    on of s) moved to mantissa bits M0+p .. M0+p+K-1 of a float with exponent P-1-p (the P states of a weight share
    one shift)."""
    M0: tl.constexpr = 24 - K - P
    SHIFT: tl.constexpr = c * P + 1 - M0 + LOW
    if SHIFT + M0 >= 32:  # all of the weight's bits in the high word: a 32-bit shift, a left one on the FMA pipe
        if SHIFT <= 32:
            x = (s >> 32).to(tl.int32) << (32 - SHIFT)
        else:
            x = (s >> 32).to(tl.int32) >> (SHIFT - 32)
    elif SHIFT >= 0:
        x = (s >> SHIFT).to(tl.int32)
    else:
        x = (s << -SHIFT).to(tl.int32)
    return ((x & masks[p]) | ((127 + P - 1 - p) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _weight(w, s, off, masks, c: tl.constexpr, P: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr):
    """2^-K sum_p q_p (V_p - 2^(K-1)) for weight c of each block, exactly: each q_p F has at most 24 - M0 - p + 3
    <= 24 significant bits (`_state`) and every partial sum is exact."""
    d = -off
    for p in tl.static_range(P):
        d = _coefficient(w, masks, p) * _state(s, masks, c, p, P, K, LOW) + d
    return d


@triton.jit
def _x_column(x_ptr, gain_ptr, j, cols, c: tl.constexpr, squares, C: tl.constexpr, XBITS: tl.constexpr,
              GBITS: tl.constexpr, X_WORDS: tl.constexpr, G_WORDS: tl.constexpr, NORM: tl.constexpr):
    """Element c of x's block columns j as fp32; with NORM times the gain, its square added to `squares` (the row's
    scale multiplies the sums at the end: no pass over x before the weights)."""
    xc = _x_element(x_ptr, j, cols, c, C, XBITS, X_WORDS)
    if NORM:
        squares += xc * xc
        xc = xc * _x_element(gain_ptr, j, cols, c, C, GBITS, G_WORDS)
    return xc, squares


@triton.jit
def _weight_sums(x_ptr, gain_ptr, j, cols, w, s, off, masks, squares, C: tl.constexpr, P: tl.constexpr,
                 K: tl.constexpr, LOW: tl.constexpr, XBITS: tl.constexpr, GBITS: tl.constexpr, X_WORDS: tl.constexpr,
                 G_WORDS: tl.constexpr, NORM: tl.constexpr):
    """sum_c d_c x_c for each block, a weight at a time: P + 1 FFMAs a weight (`_weight`, then x)."""
    blk = tl.zeros(w.shape, tl.float32)
    for c in tl.static_range(C):
        xc, squares = _x_column(x_ptr, gain_ptr, j, cols, c, squares, C, XBITS, GBITS, X_WORDS, G_WORDS, NORM)
        blk += _weight(w, s, off, masks, c, P, K, LOW) * xc[None, :]
    return blk, squares


@triton.jit
def _state_start(total, shape: tl.constexpr, p: tl.constexpr, P: tl.constexpr):
    """-(2^(P-1-p) + 1/2) sum_c x_c for every row: where state p's sums start (`_state_sums`)."""
    return tl.zeros(shape, tl.float32) - (total * (2.0 ** (P - 1 - p) + 0.5))[None, :]


@triton.jit
def _state_sums(x_ptr, gain_ptr, j, cols, w, s, masks, squares, C: tl.constexpr, P: tl.constexpr, K: tl.constexpr,
                LOW: tl.constexpr, XBITS: tl.constexpr, GBITS: tl.constexpr, X_WORDS: tl.constexpr,
                G_WORDS: tl.constexpr, NORM: tl.constexpr):
    """sum_c d_c x_c for each block, grouped by state: sum_p q_p sum_c (F_cp - 2^(P-1-p) - 1/2) x_c, P FFMAs a
    weight and fewer live registers. State p's sums start at -(2^(P-1-p) + 1/2) sum_c x_c, which a column's rows
    share, so the centring costs no instruction a block. For a one-hot x each q_p's factor is exact and the sum is
    `_weight`'s, bitwise; otherwise the state sums carry the floats' 2^(P-1-p) parts, which costs fp32 bits (about
    2^-21 of sum |x| a block against 2^-24), far below x's bf16 rounding."""
    total = tl.zeros((w.shape[1],), tl.float32)
    for c in tl.static_range(C):
        xc, squares = _x_column(x_ptr, gain_ptr, j, cols, c, squares, C, XBITS, GBITS, X_WORDS, G_WORDS, NORM)
        total += xc
    a0 = _state_start(total, w.shape, 0, P)
    a1 = _state_start(total, w.shape, 1, P)
    a2 = _state_start(total, w.shape, 2, P)
    a3 = _state_start(total, w.shape, 3, P)
    # weights outer, states inner: each weight's shifted stream copy dies after its P states (states outer kept all C
    # copies live: 120 registers against 80 at 8 rows, sm_90a). x's loads again: the compiler keeps the first ones.
    for c in tl.static_range(C):
        xc = _x_column(x_ptr, gain_ptr, j, cols, c, squares, C, XBITS, GBITS, X_WORDS, G_WORDS, NORM)[0][None, :]
        a0 += _state(s, masks, c, 0, P, K, LOW) * xc
        if P > 1:
            a1 += _state(s, masks, c, 1, P, K, LOW) * xc
        if P > 2:
            a2 += _state(s, masks, c, 2, P, K, LOW) * xc
        if P > 3:
            a3 += _state(s, masks, c, 3, P, K, LOW) * xc
    blk = _coefficient(w, masks, 0) * a0
    if P > 1:
        blk = _coefficient(w, masks, 1) * a1 + blk
    if P > 2:
        blk = _coefficient(w, masks, 2) * a2 + blk
    if P > 3:
        blk = _coefficient(w, masks, 3) * a3 + blk
    return blk, squares


@triton.jit
def _one_per_thread(ptr, offsets, mask, EVEN: tl.constexpr):
    """tl.load of a 2-D tile as a flat tile whose offsets are declared non-contiguous: each thread gets its own
    column for every row, the layout the rebuild computes in. A 2-D load of the row-contiguous words is vectorised 4
    columns a thread, and converting that tile back costs shared-memory round trips and barriers every step."""
    shape: tl.constexpr = offsets.shape
    flat = tl.max_contiguous(tl.reshape(offsets, (shape[0] * shape[1],)), 1)
    if EVEN:
        v = tl.load(ptr + flat)
    else:
        v = tl.load(ptr + flat, mask=tl.reshape(mask, (shape[0] * shape[1],)), other=0)
    return tl.reshape(v, shape)


@triton.jit
def _load_blocks(words_ptr, exps_ptr, r, j, rows, bpr, ebpr, P: tl.constexpr, EVEN: tl.constexpr):
    """The words at rows r, block columns j (2-D, broadcast to one tile), and their exponent nibbles (P = 4; else
    the word again)."""
    mask = (r < rows) & (j < bpr)
    w = _one_per_thread(words_ptr, r * bpr + j, mask, EVEN)  # a masked word is 0: decodes to 0
    if P <= 3:
        e = w
    else:
        byte = _one_per_thread(exps_ptr, r * ebpr + (j >> 1), mask, False).to(tl.int32)
        e = (byte >> ((j & 1) * 4)) & 15
    return w, e


@triton.jit
def _first_blocks(words_ptr, exps_ptr, r, lane, start, rows, bpr, ebpr, P: tl.constexpr, EVEN: tl.constexpr,
                  NB: tl.constexpr, PREFETCH: tl.constexpr):
    """The first step's words and exponents (rows r, block columns start + lane), loaded before the loop with
    PREFETCH (else placeholders). A split past the row's end (split_k > steps) has no step: its unmasked load is
    moved onto the last tile, in bounds."""
    if PREFETCH:
        first = tl.minimum(start, bpr - NB) if EVEN else start
        w, e = _load_blocks(words_ptr, exps_ptr, r, first + lane, rows, bpr, ebpr, P, EVEN)
    else:
        w = tl.zeros_like(r + lane)
        e = w
    return w, e


@triton.jit
def _next_blocks(words_ptr, exps_ptr, r, lane, j0, end, w_next, e_next, rows, bpr, ebpr, P: tl.constexpr,
                 EVEN: tl.constexpr, NB: tl.constexpr, PREFETCH: tl.constexpr):
    """This step's words and exponents (rows r, block columns j0 + lane), and the ones the next step will use. With
    PREFETCH the next step's loads are issued now, so that their HBM latency overlaps this step's rebuild (the last
    step loads its own tile again, which keeps every load in bounds); otherwise this step's are loaded here and
    waited for."""
    if PREFETCH:
        ahead = tl.minimum(j0 + NB, end - NB) + lane if EVEN else j0 + NB + lane
        w2, e2 = _load_blocks(words_ptr, exps_ptr, r, ahead, rows, bpr, ebpr, P, EVEN)
        return w_next, e_next, w2, e2
    w, e = _load_blocks(words_ptr, exps_ptr, r, j0 + lane, rows, bpr, ebpr, P, EVEN)
    return w, e, w_next, e_next


@triton.jit
def _x_element(x_ptr, j, cols, c: tl.constexpr, C: tl.constexpr, XBITS: tl.constexpr, X_WORDS: tl.constexpr):
    """Element c of x's block columns j (NB,) as fp32: out of the 8-byte words that hold each block (one load per
    word after CSE, bf16 widened by a shift), else by masked scalar loads. 1-D, so that its layout is the tile's."""
    if X_WORDS:
        PER: tl.constexpr = 64 // XBITS
        word = tl.load(x_ptr.to(tl.pointer_type(tl.int64)) + j * (C * XBITS // 64) + c // PER)
        bits = (word >> (XBITS * (c % PER))).to(tl.int32)
        if XBITS == 32:
            v = bits.to(tl.float32, bitcast=True)
        elif x_ptr.dtype.element_ty == tl.bfloat16:
            v = (bits << 16).to(tl.float32, bitcast=True)
        else:
            v = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        col = j * C + c
        v = tl.load(x_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    return v


# ---- kernels ---------------------------------------------------------------------------------------------------

@triton.jit
def _row_sums(x_ptr, gain_ptr, words_ptr, exps_ptr, table_ptr, masks, r, start, end, w_next, e_next, rows, cols, bpr,
              ebpr, C: tl.constexpr, P: tl.constexpr, K: tl.constexpr, STREAM: tl.constexpr, TAPS: tl.constexpr,
              INV: tl.constexpr, LOW: tl.constexpr, XBITS: tl.constexpr, GBITS: tl.constexpr, NB: tl.constexpr,
              EVEN: tl.constexpr, X_WORDS: tl.constexpr, G_WORDS: tl.constexpr, NORM: tl.constexpr,
              PREFETCH: tl.constexpr, BY_STATE: tl.constexpr, SHARED_TABLES: tl.constexpr):
    """Rows r of W x over block columns start .. end, short of the constant factor inv_scale, from the first step's
    words w_next, e_next: per block sum_c d_c x_c (BY_STATE: `_state_sums`, else `_weight_sums`), times 2^(e-7),
    rows reduced at the end. With NORM x is multiplied by the gain and the sum of its squares is returned too (else
    0)."""
    acc = tl.zeros((r.shape[0], NB), tl.float32)
    squares = tl.zeros((NB,), tl.float32)
    for j0 in range(start, end, NB):
        j = j0 + tl.arange(0, NB)
        w, e, w_next, e_next = _next_blocks(words_ptr, exps_ptr, r[:, None], tl.arange(0, NB)[None, :], j0, end,
                                            w_next, e_next, rows, bpr, ebpr, P, EVEN, NB, PREFETCH)
        s, exp2, off = _block_terms(w, e, table_ptr, masks, C, P, K, STREAM, TAPS, INV, LOW, SHARED_TABLES)
        if BY_STATE:
            blk, squares = _state_sums(x_ptr, gain_ptr, j, cols, w, s, masks, squares, C, P, K, LOW, XBITS, GBITS,
                                       X_WORDS, G_WORDS, NORM)
        else:
            blk, squares = _weight_sums(x_ptr, gain_ptr, j, cols, w, s, off, masks, squares, C, P, K, LOW, XBITS,
                                        GBITS, X_WORDS, G_WORDS, NORM)
        acc += blk * exp2  # exact (a power of two); the constant factor of the scale is applied once per row
    total = 0.0
    if NORM:
        total = tl.sum(squares, axis=0)
    return tl.sum(acc, axis=1), total


@triton.jit
def _store_sums(y_ptr, partial_ptr, counts_ptr, acc, y_offsets, tile_offsets, tile_size, mask, SPLIT: tl.constexpr):
    """acc (fp32 sums) into y in y's dtype. With SPLIT programs a row tile, each stores its partial sums in its own
    slice of partial_ptr (tile_size elements a split) and counts itself in; the last to arrive adds the slices in
    split order, stores y and resets the count for the next launch. Unlike atomic adds into a zeroed fp32 y, this
    needs no fill and no cast kernel around the launch, and gives the same sums every run."""
    if SPLIT == 1:
        tl.store(y_ptr + y_offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + tl.program_id(1) * tile_size + tile_offsets, acc, mask=mask)
        tl.debug_barrier()  # every thread's stores before the count, which the atomic (acq_rel, gpu) releases
        count = counts_ptr + tl.program_id(0)
        if tl.atomic_add(count, 1) == SPLIT - 1:
            total = tl.load(partial_ptr + tile_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            for split in tl.static_range(1, SPLIT):  # .cg: from L2, where the other programs' stores are
                total += tl.load(partial_ptr + split * tile_size + tile_offsets, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptr + y_offsets, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count, 0)


@triton.jit
def _gemv_kernel(x_ptr, y_ptr, partial_ptr, counts_ptr, gain_ptr, res_ptr, words_ptr, exps_ptr, table_ptr, masks_ptr,
                 rows, cols, bpr, ebpr, steps_per_split, inv_scale, eps, C: tl.constexpr, P: tl.constexpr,
                 K: tl.constexpr, STREAM: tl.constexpr, TAPS: tl.constexpr, INV: tl.constexpr, LOW: tl.constexpr,
                 XBITS: tl.constexpr, GBITS: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr, EVEN: tl.constexpr,
                 X_WORDS: tl.constexpr, G_WORDS: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
                 NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                 BY_STATE: tl.constexpr, SHARED_TABLES: tl.constexpr):
    """y = W x for one row of x (for a one-hot x still a single rounding of decode's weight), `rows` outputs. The
    fused variants round where `raytrain/infer/gemv_kernel.py` does: NORM scales the sums by x's rsqrt(mean square +
    eps) at the end (x times the gain in fp32); SWIGLU reads up rows r + rows after gate rows r and gives silu(gate)
    * up of the two rounded to y's dtype; RESIDUAL adds the residual row to the rounded y in fp32. With PDL the
    words of the first step are loaded before waiting for the previous kernel; x, the gain and the residual after."""
    dtype = y_ptr.dtype.element_ty
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    if PDL:  # let the next kernel's programs start: they load their words while this one drains
        tl.extra.cuda.gdc_launch_dependents()
    masks = _load_masks(masks_ptr)
    start = tl.program_id(1) * steps_per_split * NB
    end = tl.minimum(start + steps_per_split * NB, bpr)
    lane = tl.arange(0, NB)[None, :]
    w_next, e_next = _first_blocks(words_ptr, exps_ptr, r[:, None], lane, start, rows, bpr, ebpr, P, EVEN, NB,
                                   PREFETCH)
    if SWIGLU:  # the up half: the same row tiles, `rows` rows further on
        up_words, up_exps = words_ptr + rows * bpr, exps_ptr + rows * ebpr
        wu_next, eu_next = _first_blocks(up_words, up_exps, r[:, None], lane, start, rows, bpr, ebpr, P, EVEN, NB,
                                         PREFETCH)
    if PDL:  # x and the residual are the previous kernels' outputs; every store comes after this wait
        tl.extra.cuda.gdc_wait()
    y, squares = _row_sums(x_ptr, gain_ptr, words_ptr, exps_ptr, table_ptr, masks, r, start, end, w_next, e_next, rows,
                           cols, bpr, ebpr, C, P, K, STREAM, TAPS, INV, LOW, XBITS, GBITS, NB, EVEN, X_WORDS, G_WORDS,
                           NORM, PREFETCH, BY_STATE, SHARED_TABLES)
    y = y * inv_scale
    if NORM:
        scale = tl.rsqrt(squares / cols + eps)
        y = y * scale
    if SWIGLU:  # gate and up rounded as the unfused projection's output is, the product in fp32
        up = _row_sums(x_ptr, gain_ptr, up_words, up_exps, table_ptr, masks, r, start, end, wu_next, eu_next, rows,
                       cols, bpr, ebpr, C, P, K, STREAM, TAPS, INV, LOW, XBITS, GBITS, NB, EVEN, X_WORDS, G_WORDS, NORM,
                       PREFETCH, BY_STATE, SHARED_TABLES)[0] * inv_scale
        if NORM:
            up = up * scale
        gate = y.to(dtype).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up.to(dtype).to(tl.float32)
    if RESIDUAL:
        y = y.to(dtype).to(tl.float32) + tl.load(res_ptr + r, mask=r < rows, other=0.0).to(tl.float32)
    _store_sums(y_ptr, partial_ptr, counts_ptr, y, r, r, rows, r < rows, SPLIT)


@triton.jit
def _weight_stack(w, s, off, scale, masks, c0: tl.constexpr, STRIDE: tl.constexpr, N: tl.constexpr, C: tl.constexpr,
                  P: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr):
    """Weights c0, c0 + STRIDE, .. (N of them, N a power of two; zeros past C) times scale, joined along new
    trailing dimensions (BM, NB, 2, .., 2) that a row-major reshape flattens in that order. tl.join keeps each new
    dimension in the thread's registers, so the C weights of a block stay together."""
    if N == 1:
        if c0 < C:
            d = _weight(w, s, off, masks, c0, P, K, LOW) * scale
        else:
            d = tl.zeros_like(off)
    else:
        d = tl.join(_weight_stack(w, s, off, scale, masks, c0, 2 * STRIDE, N // 2, C, P, K, LOW),
                    _weight_stack(w, s, off, scale, masks, c0 + STRIDE, 2 * STRIDE, N // 2, C, P, K, LOW))
    return d


@triton.jit
def _fragment_order(BM: tl.constexpr, NB: tl.constexpr):
    """Rows (BM*NB, 1) and block columns (BM*NB, 1) of a step's blocks, dealt to threads in the order that puts each
    block's C = 8 rebuilt weights where an MMA's A operand (m16 x k16 per warp, BM/16 warps along the rows) wants
    them: lane 4g + q holds rows g and g + 8 and, per 16-column chunk, columns 2q, 2q + 1, 2q + 8, 2q + 9. The flat
    index e = q + 4g + 32w + BM*2 h + BM*4 jj (lane, warp, then each thread's registers) holds row g + 8h + 16w and
    block column q + 4jj, whose weights go to k = 32jj + 16c2 + 8c1 + 2q + c0 (`_fragment_tile`)."""
    e = tl.arange(0, BM * NB)
    q, g, w = e % 4, e // 4 % 8, e // 32 % (BM // 16)
    h, jj = e // (2 * BM) % 2, e // (4 * BM)
    return (g + 8 * h + 16 * w)[:, None], (q + 4 * jj)[:, None]


@triton.jit
def _fragment_tile(wt, BM: tl.constexpr, NB: tl.constexpr):
    """(BM*NB, 1, 2, 2, 2) weights in `_fragment_order` -> the (BM, NB*8) A tile in k order: the same registers,
    relabelled, so the MMA takes them without a trip through shared memory."""
    t = tl.reshape(wt, (NB // 4, 2, BM // 16, 8, 4, 2, 2, 2))  # jj, h, w, g, q, c2, c1, c0
    return tl.reshape(tl.permute(t, (2, 1, 3, 0, 5, 6, 4, 7)), (BM, NB * 8))  # rows (w, h, g), k (jj, c2, c1, q, c0)


@triton.jit
def _fragment_x(x_ptr, j0, n, batch, stride_x, cols, NB: tl.constexpr, EVEN: tl.constexpr):
    """x's (NB*8, BATCH) tile in `_fragment_tile`'s k order, read as whole blocks (8 contiguous columns)."""
    blk, c = tl.arange(0, NB), tl.arange(0, 8)
    col = (j0 + blk)[:, None, None] * 8 + c[None, :, None]
    ok = (n < batch)[None, None, :]
    if not EVEN:
        ok = ok & (col < cols)
    t = tl.load(x_ptr + n[None, None, :] * stride_x + col, mask=ok, other=0.0)
    t = tl.reshape(t, (NB // 4, 4, 2, 2, 2, n.shape[0]))  # jj, q, c2, c1, c0, batch
    return tl.reshape(tl.permute(t, (0, 2, 3, 1, 4, 5)), (NB * 8, n.shape[0]))


@triton.jit
def _dot_kernel(x_ptr, y_ptr, partial_ptr, counts_ptr, words_ptr, exps_ptr, table_ptr, masks_ptr, rows, cols, bpr, ebpr,
                steps_per_split, batch, stride_x, stride_y, inv_scale, C: tl.constexpr, P: tl.constexpr,
                K: tl.constexpr, STREAM: tl.constexpr, TAPS: tl.constexpr, INV: tl.constexpr, LOW: tl.constexpr,
                BM: tl.constexpr,
                NB: tl.constexpr, BATCH: tl.constexpr, EVEN: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                PREFETCH: tl.constexpr, FRAGMENT: tl.constexpr, SHARED_TABLES: tl.constexpr):
    """Y = X W^T for 2..16 rows of x: each step's rebuilt (BM, NB * C) tile, rounded to x's dtype, goes through
    one tl.dot with x's matching columns, fp32 accumulation (what F.linear does with the dense weights). With
    FRAGMENT (C = 8, BM = 16 x warps, NB a multiple of 4) the blocks are dealt in `_fragment_order` and the dot's k
    is permuted to match, in the tile and in x alike."""
    CP: tl.constexpr = triton.next_power_of_2(C)
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.arange(0, BATCH)
    if FRAGMENT:
        tile_rows, lane = _fragment_order(BM, NB)
        tile_rows += tl.program_id(0) * BM
    else:
        tile_rows, lane = r[:, None], tl.arange(0, NB)[None, :]
    masks = _load_masks(masks_ptr)
    acc = tl.zeros((BM, BATCH), tl.float32)
    start = tl.program_id(1) * steps_per_split * NB
    end = tl.minimum(start + steps_per_split * NB, bpr)
    w_next, e_next = _first_blocks(words_ptr, exps_ptr, tile_rows, lane, start, rows, bpr, ebpr, P, EVEN, NB,
                                   PREFETCH)
    for j0 in range(start, end, NB):
        w, e, w_next, e_next = _next_blocks(words_ptr, exps_ptr, tile_rows, lane, j0, end, w_next, e_next, rows, bpr,
                                            ebpr, P, EVEN, NB, PREFETCH)
        s, exp2, off = _block_terms(w, e, table_ptr, masks, C, P, K, STREAM, TAPS, INV, LOW, SHARED_TABLES)
        wt = _weight_stack(w, s, off, exp2 * inv_scale, masks, 0, 1, CP, C, P, K, LOW)
        if FRAGMENT:
            xt = _fragment_x(x_ptr, j0, n, batch, stride_x, cols, NB, EVEN)
            wt = _fragment_tile(wt.to(xt.dtype), BM, NB)
        else:
            k = tl.arange(0, NB * CP)
            col = (j0 + k // CP) * C + k % CP
            x_ok = (n < batch)[None, :]
            if CP != C or not EVEN:  # EVEN and C a power of two: no column mask (a compare and an add per element)
                x_ok = x_ok & ((k % CP < C) & (col < cols))[:, None]
            xt = tl.load(x_ptr + n[None, :] * stride_x + col[:, None], mask=x_ok, other=0.0)
            wt = tl.reshape(wt, (BM, NB * CP)).to(xt.dtype)
        if IEEE:
            acc = tl.dot(wt, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(wt, xt, acc)
    mask = (r < rows)[:, None] & (n < batch)[None, :]
    _store_sums(y_ptr, partial_ptr, counts_ptr, acc, n[None, :] * stride_y + r[:, None], n[None, :] * rows + r[:, None],
                batch * rows, mask, SPLIT)


@triton.jit
def _dense_kernel(out_ptr, words_ptr, exps_ptr, table_ptr, masks_ptr, rows, cols, bpr, ebpr, inv_scale,
                  C: tl.constexpr, P: tl.constexpr, K: tl.constexpr, STREAM: tl.constexpr, TAPS: tl.constexpr,
                  INV: tl.constexpr, LOW: tl.constexpr, OBITS: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr,
                  EVEN_M: tl.constexpr, O_WORDS: tl.constexpr, SHARED_TABLES: tl.constexpr):
    """W in out's dtype (bitwise seedlm.decode in fp32, then rounded): each block's C weights packed into 8-byte
    words when the row is whole words, else stored one by one."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    j = tl.program_id(1) * NB + tl.arange(0, NB)
    masks = _load_masks(masks_ptr)
    w, e = _load_blocks(words_ptr, exps_ptr, r[:, None], j[None, :], rows, bpr, ebpr, P, EVEN_M and O_WORDS)
    s, exp2, off = _block_terms(w, e, table_ptr, masks, C, P, K, STREAM, TAPS, INV, LOW, SHARED_TABLES)
    scale = exp2 * inv_scale
    row_ok = (r < rows)[:, None]
    PER: tl.constexpr = 64 // OBITS
    word = tl.zeros_like(s)
    for c in tl.static_range(C):
        v = (_weight(w, s, off, masks, c, P, K, LOW) * scale).to(out_ptr.dtype.element_ty)
        if O_WORDS:
            if OBITS == 32:
                word |= v.to(tl.uint32, bitcast=True).to(tl.int64) << (32 * (c % PER))
            else:
                word |= v.to(tl.uint16, bitcast=True).to(tl.int64) << (16 * (c % PER))
            if c % PER == PER - 1:  # stored as a 1-D tile: no dimension is contiguous (see _block_terms)
                ptrs = out_ptr.to(tl.pointer_type(tl.int64)) + r[:, None] * (bpr * C // PER) + j[None, :] * (C // PER)
                if EVEN_M:
                    tl.store(tl.reshape(ptrs + c // PER, (BM * NB,)), tl.reshape(word, (BM * NB,)))
                else:
                    tl.store(tl.reshape(ptrs + c // PER, (BM * NB,)), tl.reshape(word, (BM * NB,)),
                             mask=tl.reshape(row_ok & (j >= 0)[None, :], (BM * NB,)))
                word = tl.zeros_like(s)
        else:
            col = j[None, :] * C + c
            tl.store(out_ptr + r[:, None] * cols + col, v, mask=row_ok & (j < bpr)[None, :] & (col < cols))


# ---- launchers -------------------------------------------------------------------------------------------------

def _common_args(weight: SeedLMWeight) -> tuple:
    return (weight.words, weight.exps, weight.table, weight.masks)


def _exps_row_bytes(weight: SeedLMWeight) -> int:
    return weight.exps.shape[1] if weight.P > 3 else 0


def _even_k(weight: SeedLMWeight, block_n: int) -> bool:
    """Rows of whole blocks in whole steps: no masks along the row."""
    bpr = weight.blocks_per_row
    return bpr % block_n == 0 and weight.cols == bpr * weight.C


def _whole_words(weight: SeedLMWeight, t: torch.Tensor, block_n: int) -> bool:
    """x (or the output) can be read (written) as the 8-byte words that hold each block's C elements."""
    return (_even_k(weight, block_n) and (weight.C * t.element_size()) % 8 == 0 and t.data_ptr() % 8 == 0
            and (t.ndim == 1 or t.stride(0) * t.element_size() % 8 == 0))


def _check_x(x: torch.Tensor, weight: SeedLMWeight) -> None:
    batch, cols = x.shape
    if cols != weight.cols:
        raise ValueError(f"x has {cols} features, the weight {weight.cols}")
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"the fused kernel takes 1..{MAX_BATCH} rows of x (decode); got {batch}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the fused kernel takes fp32, bf16 or fp16 x, not {x.dtype}")


def fragment_fits(C: int, cfg: KernelConfig) -> bool:
    """The batched tile can be dealt in `_fragment_order`: 8-weight blocks, 16 rows a warp, whole groups of 4
    blocks."""
    return cfg.fragment_order and C == 8 and cfg.block_m == 16 * cfg.num_warps and cfg.block_n % 4 == 0


def _steps(weight: SeedLMWeight, cfg: KernelConfig) -> int:
    """Steps of block_n blocks per program along a row."""
    return triton.cdiv(triton.cdiv(weight.blocks_per_row, cfg.block_n), cfg.split_k)


def _common_constexprs(weight: SeedLMWeight, cfg: KernelConfig, rows: int) -> dict:
    even = rows % cfg.block_m == 0 and _even_k(weight, cfg.block_n)
    launch = {"maxnreg": cfg.max_registers} if cfg.max_registers else {}
    return dict(C=weight.C, P=weight.P, **weight.stream_args, BM=cfg.block_m, NB=cfg.block_n, EVEN=even,
                SPLIT=cfg.split_k, PREFETCH=cfg.prefetch, SHARED_TABLES=cfg.shared_tables and weight.stream == "bytes",
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch)


def _outputs(x: torch.Tensor, weight: SeedLMWeight, rows: int, cfg: KernelConfig) -> tuple[torch.Tensor, ...]:
    """y (batch, rows) in x's dtype, the split programs' fp32 partial sums (split_k, batch, rows; y itself when
    split_k is 1) and the weight's arrival counts (`_store_sums`)."""
    y = torch.empty(x.shape[0], rows, device=x.device, dtype=x.dtype)
    partial = y if cfg.split_k == 1 else torch.empty(cfg.split_k, x.shape[0], rows, device=x.device,
                                                     dtype=torch.float32)
    return y, partial, weight.split_counts


def _gemv(x: torch.Tensor, weight: SeedLMWeight, cfg: KernelConfig, norm: torch.Tensor | None = None,
          eps: float = 0.0, swiglu: bool = False, residual: torch.Tensor | None = None,
          dependent_launch: bool = False) -> torch.Tensor:
    """The batch-1 kernel on a checked, contiguous x (1, cols) -> y (1, rows, or rows / 2 with swiglu)."""
    n = fused_outputs(weight.rows, swiglu, "seedlm_gemv")
    y, partial, counts = _outputs(x, weight, n, cfg)
    gain = norm if norm is not None else x
    _gemv_kernel[(triton.cdiv(n, cfg.block_m), cfg.split_k)](
        x, y, partial, counts, gain, residual if residual is not None else y, *_common_args(weight), n, weight.cols,
        weight.blocks_per_row, _exps_row_bytes(weight), _steps(weight, cfg), weight.inv_scale, eps,
        XBITS=8 * x.element_size(), GBITS=8 * gain.element_size(), X_WORDS=_whole_words(weight, x, cfg.block_n),
        G_WORDS=norm is not None and _whole_words(weight, norm, cfg.block_n), NORM=norm is not None, SWIGLU=swiglu,
        RESIDUAL=residual is not None, PDL=dependent_launch, launch_pdl=dependent_launch,
        BY_STATE=_steps(weight, cfg) >= BY_STATE_STEPS, **_common_constexprs(weight, cfg, n))
    return y


def seedlm_matmul(x: torch.Tensor, weight: SeedLMWeight, config: KernelConfig | None = None) -> torch.Tensor:
    """x (batch, cols) with batch <= 16 -> y (batch, rows) = x @ W^T in x's dtype (fp32 accumulation)."""
    _check_x(x, weight)
    batch = x.shape[0]
    cfg = config or default_config(batch, weight.rows, weight.blocks_per_row)
    x = x.contiguous()
    if batch == 1:
        return _gemv(x, weight, cfg)
    y, partial, counts = _outputs(x, weight, weight.rows, cfg)
    _dot_kernel[(triton.cdiv(weight.rows, cfg.block_m), cfg.split_k)](
        x, y, partial, counts, *_common_args(weight), weight.rows, weight.cols, weight.blocks_per_row,
        _exps_row_bytes(weight), _steps(weight, cfg), batch, x.stride(0), y.stride(0), weight.inv_scale,
        BATCH=max(16, triton.next_power_of_2(batch)), IEEE=x.dtype == torch.float32,
        FRAGMENT=fragment_fits(weight.C, cfg), **_common_constexprs(weight, cfg, weight.rows))
    return y


@torch.compiler.disable
def seedlm_gemv(x: torch.Tensor, weight: SeedLMWeight, norm: torch.Tensor | None = None, eps: float = 0.0,
                swiglu: bool = False, residual: torch.Tensor | None = None, dependent_launch: bool = False,
                config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., cols) holding one row -> (..., rows) = x W^T in x's dtype, with `raytrain.infer.gemv_kernel.gemv`'s
    fused variants and rounding: `norm` (cols,) the RMSNorm gain applied to x first (with `eps`); `swiglu`: W holds
    (gate, up) halves of n rows each and the result is silu(gate) * up, (..., n); `residual` (..., rows or n): added
    to the result. `dependent_launch` (CUDA, sm90+): a programmatic dependent launch, reading x, the gain and the
    residual only after waiting for the previous kernel. The fused variants need `config.split_k == 1`."""
    cols = x.shape[-1]
    if x.shape[:-1].numel() != 1:
        raise ValueError(f"seedlm_gemv takes one row of x; got shape {tuple(x.shape)}")
    row = x.reshape(1, cols)
    _check_x(row, weight)
    n = fused_outputs(weight.rows, swiglu, "seedlm_gemv")
    cfg = config or default_config(1, n, weight.blocks_per_row)
    if cfg.split_k > 1 and (norm is not None or swiglu or residual is not None):
        raise ValueError(f"seedlm_gemv's norm, swiglu and residual need the whole row in one program; got "
                         f"split_k={cfg.split_k}")
    if norm is not None and norm.shape != (cols,):
        raise ValueError(f"the norm gain must be ({cols},); got {tuple(norm.shape)}")
    if residual is not None and residual.numel() != n:
        raise ValueError(f"the residual must hold one row of {n}; got shape {tuple(residual.shape)}")
    y = _gemv(row.contiguous(), weight, cfg, norm.contiguous() if norm is not None else None, eps, swiglu,
              residual.contiguous() if residual is not None else None, dependent_launch)
    return y.view(*x.shape[:-1], n)


def seedlm_dense(weight: SeedLMWeight, dtype: torch.dtype = torch.float32, config: KernelConfig | None = None
                 ) -> torch.Tensor:
    """W (rows, cols) in `dtype`: bitwise `seedlm.decode` in fp32, rounded to nearest even for 16-bit dtypes."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"seedlm_dense writes fp32, bf16 or fp16, not {dtype}")
    cfg = config or KernelConfig(block_m=4, block_n=128)
    out = torch.empty(weight.rows, weight.cols, device=weight.words.device, dtype=dtype)
    bpr = weight.blocks_per_row
    obits = 8 * out.element_size()
    grid = (triton.cdiv(weight.rows, cfg.block_m), triton.cdiv(bpr, cfg.block_n))
    _dense_kernel[grid](out, *_common_args(weight), weight.rows, weight.cols, bpr, _exps_row_bytes(weight),
                        weight.inv_scale, C=weight.C, P=weight.P, **weight.stream_args, OBITS=obits,
                        BM=cfg.block_m, NB=cfg.block_n, EVEN_M=weight.rows % cfg.block_m == 0,
                        O_WORDS=_whole_words(weight, out, cfg.block_n),
                        SHARED_TABLES=cfg.shared_tables and weight.stream == "bytes", num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages)
    return out

