"""Palettization: weights are table entries, k-means against the uniform grid, exact bits per weight, row ranges,
the mixed-bits allocation, bit packing, and palettized checkpoints loaded densely and kept compressed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raytrain.checkpoint.hf import (embedding_weight_names, linear_weight_names, load_pretrained, model_state,
                                    read_weights, save_compressed, save_pretrained)
from raytrain.compress import palettize
from raytrain.compress.bits import pack_bits, packed_size, unpack_bits
from raytrain.compress.format import compress_tensor, relative_error
from raytrain.compress.palettize import Candidate, PalettizeConfig, allocate, decode, encode
from raytrain.compress.rtn import RTNConfig
from raytrain.data.tokenizer import to_files
from raytrain.models.decoder import build_decoder
from tests.conftest import preset


def weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a few heavy-tailed ones, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[::7] = torch.distributions.StudentT(3.0).sample((len(w[::7]), cols)) * 0.5
    return w


def group_sse(w: torch.Tensor, approx: torch.Tensor, group: int) -> torch.Tensor:
    """Squared error per group of `group` rows (the last may be shorter)."""
    return torch.stack([(w[r:r + group] - approx[r:r + group]).double().square().sum()
                        for r in range(0, len(w), group)])


@pytest.mark.parametrize("bits", [4, 2])
def test_every_weight_is_an_entry_of_its_groups_table(bits: int) -> None:
    cfg = PalettizeConfig(bits=bits)
    w = weights(50, 24)  # 3 full groups of 16 rows and a last group of 2
    codes = encode(w, cfg)
    lut, dense = codes["lut"], decode(codes, cfg, 24)
    assert lut.shape == (4, 2 ** bits) and lut.dtype == torch.float16
    assert torch.equal(lut, lut.sort(dim=1).values)
    for row in range(50):
        assert torch.isin(dense[row], lut[row // 16].float()).all()
        assert not torch.isin(dense[row], lut[(row // 16 + 1) % 4].float()).all()  # another group's table differs


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_kmeans_is_never_worse_than_the_uniform_grid_on_the_same_group(bits: int) -> None:
    cfg = PalettizeConfig(bits=bits)
    w = weights(80, 40, seed=bits)
    kmeans = group_sse(w, decode(encode(w, cfg), cfg, 40), 16)
    uniform = []
    for r in range(0, 80, 16):
        g = w[r:r + 16]
        grid = torch.linspace(float(g.min()), float(g.max()), 2 ** bits).half().float()
        uniform.append(grid[(g[..., None] - grid).abs().argmin(-1)])
    uniform = group_sse(w, torch.cat(uniform), 16)
    assert (kmeans <= uniform).all()
    assert kmeans.sum() < 0.8 * uniform.sum()  # and clearly better over the whole tensor


@pytest.mark.parametrize("bits, low, high", [(4, 0.09, 0.105), (2, 0.33, 0.355)])
def test_error_on_gaussian_weights_reaches_the_lloyd_max_quantiser(bits: int, low: float, high: float) -> None:
    """Lloyd-Max for N(0,1): MSE 0.009497 at 16 levels and 0.1175 at 4, relative error 0.0975 and 0.343."""
    w = torch.randn(64, 384, generator=torch.Generator().manual_seed(0))
    assert low < relative_error(w, compress_tensor(w, "palettize", PalettizeConfig(bits=bits)).dense()) < high


@pytest.mark.parametrize("rows, cols, bits, group", [(64, 96, 4, 16), (37, 13, 3, 16), (50, 24, 2, 8)])
def test_bits_per_weight_count_indices_and_tables_exactly(rows: int, cols: int, bits: int, group: int) -> None:
    cfg = PalettizeConfig(bits=bits, group_size=group)
    ct = compress_tensor(torch.randn(rows, cols), "palettize", cfg)
    groups = -(-rows // group)
    expected = 8 * -(-rows * cols * bits // 8) + groups * 2 ** bits * 16
    assert ct.stored_bytes * 8 == expected == palettize.stored_bits((rows, cols), cfg)
    if (rows, cols, bits, group) == (64, 96, 4, 16):
        assert ct.bits_per_weight == 4 + 256 / (16 * 96)  # 16 fp16 entries per 16 x 96 weights


def test_row_ranges_on_group_boundaries_encode_to_the_whole_tensors_codes() -> None:
    cfg = PalettizeConfig(bits=4, group_size=8)
    w = weights(40, 20)
    whole, top, bottom = encode(w, cfg), encode(w[:16], cfg), encode(w[16:], cfg)
    assert palettize.row_alignment(20, cfg) == 8
    for key in ("indices", "lut"):
        assert torch.equal(whole[key], torch.cat([top[key], bottom[key]]))


def test_allocation_narrows_the_cheapest_per_bit_first_and_meets_the_target() -> None:
    sizes = {"a": 100, "b": 100, "c": 200}
    def options(name: str, cost_2: float) -> list[Candidate]:
        return [Candidate(4, 4 * sizes[name], 0.0), Candidate(2, 2 * sizes[name], cost_2)]

    # "c" saves twice the bits of "a" for 3x the cost: per bit saved "a" (1.0 / 200) is cheapest, then "c"
    candidates = {"a": options("a", 1.0), "b": options("b", 5.0), "c": options("c", 3.0)}
    assert allocate(candidates, sizes, 4.0) == {"a": 4, "b": 4, "c": 4}
    assert allocate(candidates, sizes, 3.5) == {"a": 2, "b": 4, "c": 4}
    assert allocate(candidates, sizes, 3.0) == {"a": 4, "b": 4, "c": 2}  # "a" then "c" narrowed, "a" fits again
    assert allocate(candidates, sizes, 2.6) == {"a": 2, "b": 4, "c": 2}
    assert allocate(candidates, sizes, 2.0) == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="target_bpw=1.5: the narrowest setting already needs 2.0000"):
        allocate(candidates, sizes, 1.5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_packing_is_the_lsb_first_bit_stream(bits: int) -> None:
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37,))
    stream = [(int(v) >> i) & 1 for v in values for i in range(bits)]
    stream += [0] * (-len(stream) % 8)
    expected = torch.tensor([sum(stream[j + i] << i for i in range(8)) for j in range(0, len(stream), 8)],
                            dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == packed_size(37, bits) and torch.equal(packed, expected)
    assert torch.equal(unpack_bits(packed, bits, 37).long(), values)


def test_a_palettized_checkpoint_loads_densely_and_kept_compressed(tokenizer, tmp_path) -> None:
    """What the Ray job writes (done here in-process): 4-bit tables for the linear weights, the embedding as 8-bit
    integers with a scale per row; both loaders compute the same logits."""
    cfg = dataclasses.replace(preset("afm_micro"), vocab_size=512)
    torch.manual_seed(0)
    src = save_pretrained(tmp_path / "src", cfg, model_state(build_decoder(cfg)), to_files(tokenizer))
    state = read_weights(src)
    (embed,) = embedding_weight_names(src)
    compressed = {n: compress_tensor(state[n], "palettize", PalettizeConfig()) for n in linear_weight_names(src)}
    compressed[embed] = compress_tensor(state[embed], "rtn", RTNConfig(bits=8, group_size=cfg.d_model))
    save_compressed(tmp_path / "pal", src, {k: v for k, v in state.items() if k not in compressed}, compressed)
    dense, kept = load_pretrained(tmp_path / "pal").model, load_pretrained(tmp_path / "pal", keep_compressed=True).model
    assert type(kept.layers[0].attn.qkv_proj).__name__ == "CompressedLinear"
    assert torch.equal(dense.embed.weight, compressed[embed].dense())
    assert dense.head.weight is dense.embed.weight  # still tied
    tokens = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(dense(tokens), kept(tokens), rtol=1e-5, atol=1e-5)
    lut = compressed["layers.0.ffn.proj_2.weight"].codes()["lut"]
    assert torch.isin(dense.layers[0].ffn.proj_2.weight[:16], lut[0].float()).all()


def test_the_largest_weight_of_a_heavy_tail_keeps_a_table_entry() -> None:
    """A group of 16 x 1536 Laplace weights (std 0.2) with 30 weights of 1 to 3.5 in magnitude and one at -5, like
    SmolLM2-135M's layer 1 FFN output: from the uniform grid and the quantiles (and with the quantiles stretched to
    [min, max]) Lloyd's steps merged the -5 into an entry near -2.9, with more squared error than the tails start."""
    cfg = PalettizeConfig(bits=4)
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(16, 1536, generator=g) < 0.5, -1.0, 1.0)
    w = torch.empty(16, 1536).exponential_(generator=g) * sign * 0.14
    tail = torch.randperm(w.numel(), generator=g)[:30]
    w.view(-1)[tail] = (torch.rand(30, generator=g) * 2.5 + 1.0) * torch.where(
        torch.rand(30, generator=g) < 0.5, -1.0, 1.0)
    w.view(-1)[tail[0]] = -5.0
    dense = decode(encode(w, cfg), cfg, 1536)
    assert abs(float(dense.view(-1)[tail[0]]) + 5.0) < 0.1
