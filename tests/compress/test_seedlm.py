"""The SeedLM codec against the spec's verification facts (§5): decode vector, exact recovery of representable
blocks, relative error on standard-normal matrices for both configs, padding, zero blocks, determinism."""

from __future__ import annotations

import pytest
import torch

from raytrain.compress.format import relative_error
from raytrain.compress.lfsr import centred_table, matrices
from raytrain.compress.seedlm import SeedLMConfig, decode, encode, pack, unpack, with_cycle_offsets

K8 = {"K": 8, "taps": [0, 2, 3, 4]}  # 255 candidates: the same search, 257x cheaper, for tests of mechanics


def test_decode_vector_of_the_spec() -> None:
    cfg = SeedLMConfig()
    codes = {"offsets": torch.tensor([[0]]), "exponents": torch.tensor([[-2]], dtype=torch.int8),
             "coefficients": torch.tensor([[[3, -5, 7]]], dtype=torch.int8)}
    window = centred_table(cfg.lfsr, 24)[:24].view(8, 3).long()
    assert (window @ torch.tensor([3, -5, 7])).tolist() == [-90112, -203776, 85120, -124528, -134350, -61849,
                                                            78281, 177721]
    expected = torch.tensor([-0.687520981, -1.554734947, 0.649433882, -0.950102237, -1.025040437, -0.471884823,
                             0.597254860, 1.355945006])
    torch.testing.assert_close(decode(codes, cfg, 8)[0], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 3])
def test_blocks_built_from_a_seed_are_recovered_exactly(bits: int) -> None:
    """w = U(o) q 2^e with q in [-7, 7]^P comes back to fp32 precision (the seed may differ: neighbouring windows
    can give the same block, so the reconstruction is asserted, never the seed)."""
    cfg = SeedLMConfig.for_bits(bits)
    g = torch.Generator().manual_seed(bits)
    n = 12
    offsets = torch.randint(0, 65535, (n,), generator=g)
    q = torch.randint(-7, 8, (n, cfg.P), generator=g).double()
    q[q.abs().sum(1) == 0, 0] = 3
    e = torch.randint(-6, 5, (n, 1), generator=g).double()
    blocks = (matrices(offsets, cfg.C, cfg.P, cfg.lfsr) @ (q * 2 ** e)[:, :, None])[..., 0]  # (n, C)
    weight = blocks.float().reshape(2, -1)
    approx = decode(encode(weight, cfg), cfg, weight.shape[1])
    assert relative_error(weight, approx) < 1e-6


@pytest.mark.parametrize("bits, low, high", [(4, 0.118, 0.128), (3, 0.218, 0.232)])
def test_relative_error_on_a_standard_normal_matrix_is_in_the_spec_range(bits: int, low: float, high: float) -> None:
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))  # 6144 weights
    cfg = SeedLMConfig.for_bits(bits)
    assert low <= relative_error(weight, decode(encode(weight, cfg), cfg, 96)) <= high


def test_rows_are_padded_to_whole_blocks_and_zero_blocks_get_the_lowest_exponent() -> None:
    cfg = SeedLMConfig.for_bits(4, **K8)
    weight = torch.randn(5, 13, generator=torch.Generator().manual_seed(1))
    weight[2] = 0
    codes = encode(weight, cfg)
    assert codes["offsets"].shape == (5, 2) and codes["coefficients"].shape == (5, 2, 3)
    assert (codes["exponents"][2] == -8).all() and (codes["coefficients"][2] == 0).all()
    approx = decode(codes, cfg, 13)
    assert approx.shape == (5, 13) and (approx[2] == 0).all()
    assert relative_error(weight, approx) < 0.5


def test_stored_arrays_round_trip_in_both_seed_conventions() -> None:
    weight = torch.randn(6, 24, generator=torch.Generator().manual_seed(2))
    for convention in ("lfsr_state", "cycle_offset"):
        cfg = SeedLMConfig.for_bits(3, seed_convention=convention, **K8)
        codes = encode(weight, cfg)
        arrays = pack(codes, cfg)
        assert arrays["seeds"].dtype == torch.uint16 and arrays["exponents"].numel() == 6  # 12 blocks, 2 per byte
        assert arrays["coefficients"].numel() == 24  # 12 blocks x 4 nibbles
        back = unpack(arrays, cfg, (6, 24))
        assert all(torch.equal(back[k], codes[k]) for k in codes)
        offset_arrays, offset_cfg = with_cycle_offsets(arrays, cfg)  # what the kernel path converts to
        assert offset_cfg.seed_convention == "cycle_offset" and offset_arrays["seeds"].dtype == torch.uint16
        assert torch.equal(unpack(offset_arrays, offset_cfg, (6, 24))["offsets"], codes["offsets"])


def test_exponent_rules_order_as_in_the_spec() -> None:
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(3))
    err = {rule: relative_error(weight, decode(encode(weight, cfg := SeedLMConfig(exponent_rule=rule, **K8)), cfg,
                                                96))
           for rule in ("range75", "literal", "search3")}
    assert err["literal"] > 1.2 * err["range75"]  # the printed rule only uses mantissas -2..2 (1.5x at K=16)
    assert err["search3"] <= err["range75"] + 1e-7  # it also tries the range-filling exponent


def test_the_search_is_deterministic_and_independent_of_chunking() -> None:
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(4))
    a = encode(weight, SeedLMConfig(**K8))
    b = encode(weight, SeedLMConfig(seed_chunk=7, block_chunk=5, **K8))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_configs_are_named() -> None:
    with pytest.raises(ValueError, match="exponent_rule='floor'"):
        SeedLMConfig(exponent_rule="floor")
    with pytest.raises(ValueError, match="P <= min"):
        SeedLMConfig(C=8, P=6)
    with pytest.raises(ValueError, match="bits=5"):
        SeedLMConfig.for_bits(5)
