"""The Triton GEMV against `F.linear` (its fused variants: tests/infer/test_fused_decode.py).
Without a GPU it runs under Triton's interpreter (tests/conftest.py switches it on before triton is imported)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import triton_device

DEVICE = triton_device("the GEMV kernel needs triton")

from raytrain.infer.gemv_kernel import block_shape, gemv  # noqa: E402 (under the interpreter)


@pytest.mark.parametrize("block", [None, (4, 256, 4), (16, 128, 4)])
def test_the_kernel_equals_linear_with_ragged_blocks(block) -> None:
    torch.manual_seed(0)
    weight, x = torch.randn(70, 300), torch.randn(1, 1, 300)  # neither size a multiple of a block
    got = gemv(x.to(DEVICE), weight.to(DEVICE), block).cpu()
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-5)


def test_block_shapes_and_a_bad_shape() -> None:
    assert block_shape(2048, 5632) == (2, 1024, 4) and block_shape(11008, 4096, swiglu=True) == (4, 512, 4)
    with pytest.raises(ValueError, match="one row of 300"):
        gemv(torch.randn(2, 300, device=DEVICE), torch.randn(70, 300, device=DEVICE))
