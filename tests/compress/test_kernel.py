"""The SeedLM Triton kernels against the reference decoder. Without a GPU they run under Triton's interpreter at
shapes small enough for it (TRITON_INTERPRET=1, which tests/conftest.py sets before triton is first imported:
triton.language decorates its own helpers then). The weights hold
random codes (every seed, exponent and coefficient value is valid), which exercise the decoder more than searched ones;
the batch-1 kernel's fused variants (RMSNorm, SwiGLU, residual: `seedlm_gemv`) are compared with the decoder's ops on
searched codes, whose weights have an LLM's magnitudes. Triton 3.9's interpreter truncates fp32 -> bf16, so bf16
outputs are checked bitwise on GPUs only."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from raytrain.compress.format import CompressedTensor, compress_tensor
from raytrain.compress.lfsr import LFSRConfig, emit, stream_bits
from raytrain.compress.seedlm import EXPONENT_RULES, SeedLMConfig, decode, search_torch
from raytrain.models import ops
from tests.conftest import triton_device

DEVICE = triton_device("the kernel needs triton (pip install 'raytrain[kernels]')")

from raytrain.compress.kernels import seedlm_matmul as kernel  # noqa: E402
from raytrain.compress.kernels import seedlm_search  # noqa: E402
from raytrain.compress.kernels.seedlm_matmul import KernelConfig  # noqa: E402

K8 = {"K": 8, "taps": [0, 2, 3, 4]}
# (bits, lfsr, stream, shape, tile): whole tiles (8-byte words of x and of the output), rows and row lengths that are
# not whole tiles, partial last blocks (37 % 8, 50 % 12), 3-bit blocks (P = 4, exponents in their own array), and
# the next step's words prefetched: whole tiles split over programs (each split's last step prefetches inside its
# range; a split with no step), and partial ones; programs of one step (batch 1 sums a weight at a time) and of two
# or more (grouped by state, `BY_STATE_STEPS`), for 4- and 3-bit blocks; the byte stream built on the word (4-bit,
# K = 16 and 8) and from bit 0 (3-bit: its 64 stream bits leave no room, `stream_low`), its tables gathered through
# L1 and from shared memory (`shared_tables`)
CASES = [
    (4, {}, "lfsr", (8, 64), KernelConfig(block_m=4, block_n=4)),
    (4, {}, "lfsr", (8, 64), KernelConfig(block_m=4, block_n=2, split_k=2, prefetch=True)),
    (4, {}, "table", (8, 64), KernelConfig(block_m=2, block_n=2, split_k=3, prefetch=True)),  # the last split: none
    (4, {}, "table", (8, 64), KernelConfig(block_m=2, block_n=8)),
    (4, K8, "lfsr", (6, 37), KernelConfig(block_m=4, block_n=2, split_k=2, prefetch=True)),
    (4, K8, "table", (6, 37), KernelConfig(block_m=1, block_n=8)),
    (3, {}, "lfsr", (5, 50), KernelConfig(block_m=2, block_n=4, split_k=3)),
    (4, {}, "bytes", (8, 64), KernelConfig(block_m=4, block_n=2, split_k=2, prefetch=True)),
    (4, {}, "bytes", (6, 37), KernelConfig(block_m=4, block_n=4, prefetch=True, shared_tables=True)),
    (4, K8, "bytes", (6, 37), KernelConfig(block_m=2, block_n=8)),
    (3, {}, "bytes", (5, 50), KernelConfig(block_m=2, block_n=4)),
]
IDS = [f"{bits}bit-K{lf.get('K', 16)}-{stream}-{shape[0]}x{shape[1]}-n{tile.block_n}s{tile.split_k}"
       f"{'-prefetch' if tile.prefetch else ''}{'-shared' if tile.shared_tables else ''}"
       for bits, lf, stream, shape, tile in CASES]



def test_the_cases_run_both_batch_one_block_sums_and_byte_stream_places() -> None:
    """Each of `_weight_sums` and `_state_sums` is checked below, for both block sizes, and the byte stream both
    built on the word (bit 0 at SEED_BIT) and from bit 0 (`stream_low`), its tables read both ways."""
    sums, places, gathers = set(), set(), set()
    for bits, lfsr, stream, shape, tile in CASES:
        weight = kernel.SeedLMWeight.from_compressed(random_weight(bits, lfsr, shape), DEVICE, stream)
        sums.add((bits, kernel._steps(weight, tile) >= kernel.BY_STATE_STEPS))
        if stream == "bytes":
            places.add(weight.stream_args["LOW"])
            gathers.add(tile.shared_tables)
    assert sums == {(4, True), (4, False), (3, True), (3, False)}
    assert places == {0, kernel.SEED_BIT} and gathers == {False, True}


def random_weight(bits: int, lfsr: dict, shape: tuple[int, int], seed: int = 0) -> CompressedTensor:
    cfg = SeedLMConfig.for_bits(bits, **lfsr)
    g = torch.Generator().manual_seed(seed)
    rows, bpr = shape[0], math.ceil(shape[1] / cfg.C)
    codes = {"offsets": torch.randint(0, cfg.lfsr.period, (rows, bpr), generator=g, dtype=torch.int32),
             "exponents": torch.randint(-8, 8, (rows, bpr), generator=g, dtype=torch.int8),
             "coefficients": torch.randint(-8, 8, (rows, bpr, cfg.P), generator=g, dtype=torch.int8)}
    return CompressedTensor.from_codes("seedlm", cfg, codes, shape, torch.float32)


@pytest.mark.parametrize("bits, lfsr, stream, shape, tile", CASES, ids=IDS)
def test_dense_decode_is_bitwise_the_reference(bits, lfsr, stream, shape, tile) -> None:
    ct = random_weight(bits, lfsr, shape)
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE, stream)
    assert torch.equal(kernel.seedlm_dense(weight, torch.float32, tile).cpu(), ct.dense())


def test_dense_decode_rounds_to_half_precision_like_the_reference() -> None:
    ct = random_weight(4, {}, (8, 64), seed=1)
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE)
    dtypes = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    for dtype in dtypes:
        assert torch.equal(kernel.seedlm_dense(weight, dtype, KernelConfig(block_m=4, block_n=4)).cpu(),
                           ct.dense().to(dtype))


@pytest.mark.parametrize("bits, lfsr, stream, shape, tile", CASES, ids=IDS)
def test_fused_matmul_rebuilds_the_weights_bitwise(bits, lfsr, stream, shape, tile) -> None:
    """One-hot rows of x pick single columns of W: exact equality with the reference decoder through the batch-1
    kernel (first column, last column of the last, padded block) and the tl.dot kernel (16 columns at once), with
    its tile in row order and, for 8-weight blocks, in the MMA fragment order (16 rows over one warp); a random x
    agrees with the float64 product to fp32 rounding."""
    ct = random_weight(bits, lfsr, shape)
    dense = ct.dense()
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE, stream)
    eye = torch.eye(shape[1], device=DEVICE)
    for col in (0, shape[1] - 1):
        assert torch.equal(kernel.seedlm_matmul(eye[col:col + 1], weight, tile)[0].cpu(), dense[:, col])
    dot_tile = KernelConfig(block_m=16, block_n=tile.block_n, split_k=tile.split_k, prefetch=tile.prefetch,
                            shared_tables=tile.shared_tables)
    fragment_tile = dataclasses.replace(dot_tile, block_n=4 * -(-tile.block_n // 4), num_warps=1)
    assert kernel.fragment_fits(weight.C, fragment_tile) == (weight.C == 8)
    assert not kernel.fragment_fits(weight.C, dot_tile)
    for cfg in (dot_tile, fragment_tile):
        assert torch.equal(kernel.seedlm_matmul(eye[-16:], weight, cfg).T.cpu(), dense[:, -16:])
    g = torch.Generator().manual_seed(2)
    for batch, cfg in ((1, tile), (3, dot_tile), (5, fragment_tile)):
        x = torch.randn(batch, shape[1], generator=g)
        y = kernel.seedlm_matmul(x.to(DEVICE), weight, cfg).cpu().double()
        torch.testing.assert_close(y, x.double() @ dense.double().T, rtol=2e-6, atol=2e-6 * y.abs().max().item())
    assert not weight.split_counts.any()  # each split launch's last program reset its row tile's count


def test_split_rows_sum_in_order_the_same_every_launch() -> None:
    """With split_k > 1 the last program of a row tile adds the partial sums in split order: two launches give the
    same bits (atomic adds need not), equal to one program's sum up to rounding, and leave the counts at 0."""
    weight = kernel.SeedLMWeight.from_compressed(random_weight(4, {}, (8, 64), seed=4), DEVICE)
    g = torch.Generator().manual_seed(5)
    for batch, split in ((1, KernelConfig(block_m=4, block_n=2, split_k=3)),
                         (3, KernelConfig(block_m=16, block_n=2, split_k=3))):
        x = torch.randn(batch, 64, generator=g).to(DEVICE)
        first, second = kernel.seedlm_matmul(x, weight, split), kernel.seedlm_matmul(x, weight, split)
        assert torch.equal(first, second)
        whole = kernel.seedlm_matmul(x, weight, dataclasses.replace(split, split_k=1))
        torch.testing.assert_close(first, whole, rtol=1e-6, atol=1e-6 * whole.abs().max().item())
        assert not weight.split_counts.any()


def test_the_default_tiles_rebuild_the_weights_bitwise() -> None:
    """default_config(1) (prefetch; 8 rows from 8,192 rows up, with the byte tables in shared memory, else 4; 8 warps
    along short, long weights: 8 rows up to 2,048 rows, 4 above; 8 rows over 8 warps for rows of more than 1,024
    blocks) and default_config(16) (64 rows by 8 blocks, prefetch, each row split over 8 programs; 16 blocks and 16
    programs above 1,024 blocks) on a weight whose rows and blocks fill no whole tile."""
    ct = random_weight(4, {}, (45, 8 * 80 - 3), seed=3)
    weight, dense = kernel.SeedLMWeight.from_compressed(ct, DEVICE), ct.dense()
    assert kernel.default_config(1, 8192) == KernelConfig(block_m=8, prefetch=True, shared_tables=True)
    assert [kernel.default_config(1, rows, 128).block_m for rows in (8184, 4096, 2304, 45)] == [4, 4, 4, 4]
    assert kernel.default_config(1, 2048, 129).num_warps == 8 and kernel.default_config(1, 2048, 128).num_warps == 4
    wide = [kernel.default_config(1, rows, 256) for rows in (2048, 3328, 3584)]
    assert [(c.block_m, c.num_warps) for c in wide] == [(8, 8), (4, 8), (4, 4)]
    long_rows = [kernel.default_config(1, rows, blocks) for rows, blocks in ((4096, 1792), (14336, 512))]
    assert [(c.block_m, c.num_warps, c.shared_tables) for c in long_rows] == [(8, 8, False), (8, 4, True)]
    batched = kernel.default_config(16, weight.rows, weight.blocks_per_row)
    assert (batched.block_m, batched.block_n, batched.split_k, batched.prefetch) == (64, 8, 8, True)
    assert [(c.block_n, c.split_k) for c in (kernel.default_config(8, 4096, b) for b in (1024, 1025, 1792, 40))] == [
        (8, 8), (16, 16), (16, 16), (8, 5)]
    eye = torch.eye(dense.shape[1], device=DEVICE)
    capped = kernel.KernelConfig(block_m=4, prefetch=True, max_registers=64)  # a launch option: the same sums
    for col in (0, dense.shape[1] - 1):
        for tile in (None, kernel.default_config(1, 8192), *wide[:2], capped):
            assert torch.equal(kernel.seedlm_matmul(eye[col:col + 1], weight, tile)[0].cpu(), dense[:, col])
    assert torch.equal(kernel.seedlm_matmul(eye[-16:], weight).T.cpu(), dense[:, -16:])


def test_byte_tables_xor_to_each_seeds_stream() -> None:
    """Stream bits K.. of a seed (the top bits of the states it emits) are the XOR of its bytes' entries: int32 for
    (8,3)'s 24 bits, int64 for (12,4)'s 48."""
    cfg = LFSRConfig()
    for nbits, dtype in ((24, torch.int32), (48, torch.int64)):
        tables = kernel.byte_tables(cfg, nbits)
        assert tables.dtype == dtype and tables.shape == (512,)
        for seed in (1, 0x1234, 0x8000, 0xFFFF):
            expected = sum(((state >> (cfg.K - 1)) & 1) << k for k, state in enumerate(emit(seed, nbits, cfg)))
            assert int(tables[seed & 255]) ^ int(tables[256 + (seed >> 8)]) == expected


def test_the_default_stream_gathers_for_large_weights() -> None:
    assert [kernel.default_stream(*shape) for shape in ((4096, 4096), (4095, 4096), (14336, 4096))] == [
        "bytes", "lfsr", "bytes"]
    assert kernel.SeedLMWeight.from_compressed(random_weight(4, {}, (8, 64)), DEVICE).stream == "lfsr"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_x_is_read_from_whole_words(dtype: torch.dtype) -> None:
    """With rows of whole tiles, x is read as the 8-byte words holding each block and widened in registers; the
    result is x @ W^T rounded once to x's dtype."""
    ct = random_weight(4, {}, (8, 64), seed=3)
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = kernel.seedlm_matmul(x.to(DEVICE), weight, KernelConfig(block_m=4, block_n=4)).cpu()
    reference = x.double() @ ct.dense().double().T
    assert y.dtype == dtype and ((y.double() - reference).abs().max() / reference.abs().max()) < 2 ** -7


# (bits, stream, shape, tile) of the fused batch-1 variants: whole tiles (x and the gain read as words; with swiglu 8
# rows a half), rows and swiglu halves that are not whole tiles with partial last blocks (14 and 7 rows, 37 % 8),
# and 3-bit blocks (their exponents' array offset for the up half) at the default tile (8 rows, prefetch); the
# byte tables from shared memory
FUSED_CASES = [
    (4, "lfsr", (16, 64), KernelConfig(block_m=4, block_n=4)),
    (4, "table", (14, 37), KernelConfig(block_m=4, block_n=2, prefetch=True)),
    (3, "lfsr", (10, 50), None),
    (4, "bytes", (14, 37), KernelConfig(block_m=4, block_n=2, prefetch=True, shared_tables=True)),
]
FUSED_IDS = [f"{bits}bit-{stream}-{shape[0]}x{shape[1]}" for bits, stream, shape, _ in FUSED_CASES]


@pytest.mark.parametrize("variant", ["norm", "swiglu", "residual", "norm+swiglu"])
@pytest.mark.parametrize("bits, stream, shape, tile", FUSED_CASES, ids=FUSED_IDS)
def test_fused_gemv_variants_equal_the_unfused_ops(variant, bits, stream, shape, tile) -> None:
    """seedlm_gemv with RMSNorm, SwiGLU and residual against the decoder's ops on `seedlm.decode`'s weight, in fp32
    to summation order and in bf16 to a few of its roundings (the reference rounds the weight, the normalised x and
    each op's output to bf16; the interpreter's kernel truncates its conversions)."""
    ct = compress_tensor(torch.randn(*shape, generator=torch.Generator().manual_seed(bits)) / shape[1] ** 0.5,
                         "seedlm", SeedLMConfig.for_bits(bits, **K8))
    weight, dense = kernel.SeedLMWeight.from_compressed(ct, DEVICE, stream), ct.dense()
    norm, swiglu, residual = "norm" in variant, "swiglu" in variant, "residual" in variant
    g = torch.Generator().manual_seed(7)
    x, gain = torch.randn(1, 1, shape[1], generator=g), 1 + 0.5 * torch.randn(shape[1], generator=g)
    res = torch.randn(1, 1, shape[0] // 2 if swiglu else shape[0], generator=g)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        xs, gs, rs = x.to(dtype), gain.to(dtype), res.to(dtype)
        want = F.linear(ops.rms_norm(xs, gs, 1e-5) if norm else xs, dense.to(dtype))
        if swiglu:
            want = ops.swiglu(want)
        if residual:
            want = rs + want
        got = kernel.seedlm_gemv(xs.to(DEVICE), weight, gs.to(DEVICE) if norm else None, 1e-5, swiglu,
                                 rs.to(DEVICE) if residual else None, config=tile).cpu()
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("bits, stream, shape, tile", FUSED_CASES, ids=FUSED_IDS)
def test_fused_gemv_without_its_variants_is_the_batch_one_kernel(bits, stream, shape, tile) -> None:
    """Flags off: a one-hot x picks decode's column bitwise, a random x gives seedlm_matmul's y bitwise."""
    ct = random_weight(bits, K8, shape)
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE, stream)
    assert torch.equal(kernel.seedlm_gemv(torch.eye(shape[1], device=DEVICE)[-1], weight, config=tile).cpu(),
                       ct.dense()[:, -1])
    x = torch.randn(1, shape[1], device=DEVICE)
    assert torch.equal(kernel.seedlm_gemv(x, weight, config=tile), kernel.seedlm_matmul(x, weight, tile))


def test_fused_gemv_refuses_what_it_cannot_do() -> None:
    weight = kernel.SeedLMWeight.from_compressed(random_weight(4, K8, (7, 16)), DEVICE)
    x = torch.randn(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="split_k=2"):
        kernel.seedlm_gemv(x, weight, norm=torch.ones(16, device=DEVICE), config=KernelConfig(split_k=2))
    with pytest.raises(ValueError, match="odd 7 rows"):
        kernel.seedlm_gemv(x, weight, swiglu=True)
    with pytest.raises(ValueError, match="one row of x"):
        kernel.seedlm_gemv(torch.randn(2, 16, device=DEVICE), weight)


def test_stream_tables_and_shifts_reproduce_the_lfsr_stream() -> None:
    """The table stream (windows of the m-sequence) and the register stream (next K bits as XORs of shifted copies)
    both give the LFSR's output bits, for the spec's tap sets."""
    for cfg in (LFSRConfig(), LFSRConfig(8, (0, 2, 3, 4)), LFSRConfig(12, (0, 1, 2, 8)), LFSRConfig(3, (0, 1))):
        bits = stream_bits(cfg, cfg.period + 64)
        table = kernel.stream_table(cfg)
        shifts = kernel.inverse_shifts(cfg)
        for o in (0, 1, 7, cfg.period // 3, cfg.period - 1):
            assert (int(table[o >> 4]) >> (o & 15)) % (1 << 49) == _bits(bits, o, 49)
            t = 0
            for tap in cfg.taps:
                t ^= _bits(bits, o, cfg.K) >> tap
            following = 0
            for k in shifts:
                following ^= t << k
            assert following % (1 << cfg.K) == _bits(bits, o + cfg.K, cfg.K)


def _bits(stream, start: int, n: int) -> int:
    """Stream bits start .. start+n-1 as an integer, the first in bit 0 (periodic: the m-sequence repeats)."""
    period = len(stream) - 64
    return sum(int(stream[(start + i) % period]) << i for i in range(n))


def test_kernel_refuses_what_it_cannot_do() -> None:
    ct = random_weight(4, K8, (4, 8))
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE)
    with pytest.raises(ValueError, match="1..16 rows"):
        kernel.seedlm_matmul(torch.randn(17, 8, device=DEVICE), weight)
    with pytest.raises(ValueError, match="features"):
        kernel.seedlm_matmul(torch.randn(1, 9, device=DEVICE), weight)
    with pytest.raises(ValueError, match="needs stream='lfsr'"):
        kernel.SeedLMWeight.from_compressed(random_weight(3, {}, (2, 12)), DEVICE, "table")
    with pytest.raises(ValueError, match="K <= 16"):
        kernel.check_supported(SeedLMConfig(K=24, taps=[0, 1, 2, 7]), "lfsr")


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("rule", EXPONENT_RULES)
def test_fused_search_finds_what_the_pytorch_search_finds(bits: int, rule: str) -> None:
    """Same blocks (one all-zero, one tiny), same codes, for every exponent rule; with search3 an exact tie may be
    broken the other way, so there the reconstruction error is compared. A 3-bit register (7 candidates) keeps the
    interpreter fast; the search logic does not depend on the candidate count."""
    cfg = SeedLMConfig.for_bits(bits, K=3, taps=[0, 1], exponent_rule=rule)
    blocks = torch.randn(40, cfg.C, generator=torch.Generator().manual_seed(bits))
    blocks[3] = 0
    blocks[7] *= 1e-4
    got = seedlm_search.search(blocks.to(DEVICE), cfg, block_b=16)
    want = search_torch(blocks, cfg)
    errors = [(_reconstruction(codes, cfg) - blocks).square().sum(1) for codes in (got, want)]
    assert torch.equal(errors[0], errors[1])
    if rule != "search3":
        assert all(torch.equal(got[k], want[k]) for k in want)


def _reconstruction(codes: dict[str, torch.Tensor], cfg: SeedLMConfig) -> torch.Tensor:
    nb = codes["offsets"].shape[0]
    return decode({k: v[None] for k, v in codes.items()}, cfg, nb * cfg.C).view(nb, cfg.C)


@pytest.mark.skipif(DEVICE == "cpu", reason="the compressed layer runs the kernels on CUDA only")
def test_compressed_linear_matches_the_dense_layer_for_decode_and_prefill() -> None:
    from raytrain.compress.linear import CompressedLinear

    ct = random_weight(4, {}, (256, 512), seed=5)
    layer = CompressedLinear(ct, DEVICE)
    weight = ct.dense().to(DEVICE, torch.bfloat16)
    for rows in (1, 8, 40):
        x = torch.randn(rows, 512, device=DEVICE, dtype=torch.bfloat16)
        reference = x.float() @ weight.float().T
        y = layer(x).float()
        assert ((y - reference).abs().max() / reference.abs().max()) < 1e-2
