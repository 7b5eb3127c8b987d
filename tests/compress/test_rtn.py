"""Round-to-nearest baseline: error, exact codes, scales counted in the bits, partial groups."""

from __future__ import annotations

import pytest
import torch

from raytrain.compress.format import compress_tensor, relative_error
from raytrain.compress.rtn import RTNConfig, decode, encode


def test_bits_per_weight_count_the_scales() -> None:
    weight = torch.randn(8, 256)
    assert compress_tensor(weight, "rtn", RTNConfig(bits=4, group_size=128)).bits_per_weight == 4.125
    assert compress_tensor(weight, "rtn", RTNConfig(bits=3, group_size=16)).bits_per_weight == 4.0


def test_values_on_the_grid_come_back_exactly_and_groups_may_be_partial() -> None:
    cfg = RTNConfig(bits=4, group_size=8)
    codes = torch.randint(-7, 8, (3, 20))
    codes[:, ::8] = 7  # every group reaches the top code, so its scale is exactly the grid step
    weight = codes.float() * 0.25
    assert torch.equal(decode(encode(weight, cfg), cfg, 20), weight)
    assert encode(weight, cfg)["scales"].shape == (3, 3)


@pytest.mark.parametrize("bits, bound", [(4, 0.13), (3, 0.30)])
def test_error_on_a_standard_normal_matrix(bits: int, bound: float) -> None:
    """Uniform quantisation of N(0,1) groups of 128 with amax scales: ~0.12 at 4 bits, ~0.28 at 3 bits."""
    weight = torch.randn(64, 384, generator=torch.Generator().manual_seed(0))
    ct = compress_tensor(weight, "rtn", RTNConfig(bits=bits))
    assert 0.5 * bound < relative_error(weight, ct.dense()) < bound


def test_zero_groups_and_bad_configs() -> None:
    assert torch.equal(decode(encode(torch.zeros(2, 10), RTNConfig()), RTNConfig(), 10), torch.zeros(2, 10))
    with pytest.raises(ValueError, match="bits=1"):
        RTNConfig(bits=1)
