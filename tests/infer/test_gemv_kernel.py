"""The Triton GEMV against `F.linear`, and the decoder's projections routed through it for single rows only.
Without a GPU it runs under Triton's interpreter (tests/conftest.py switches it on before triton is imported)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raytrain.models import ops
from tests.conftest import triton_device

DEVICE = triton_device("the GEMV kernel needs triton")

from raytrain.infer.gemv_kernel import block_shape, gemv  # noqa: E402 (under the interpreter)


@pytest.mark.parametrize("block", [None, (4, 256), (16, 128)])
def test_the_kernel_equals_linear_with_ragged_blocks(block) -> None:
    torch.manual_seed(0)
    weight, x = torch.randn(70, 300), torch.randn(1, 1, 300)  # neither size a multiple of a block
    got = gemv(x.to(DEVICE), weight.to(DEVICE), block).cpu()
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-5)


def test_block_shapes_and_a_bad_shape() -> None:
    assert block_shape(2048, 5632) == (4, 512) and block_shape(11264, 2048) == (16, 256)
    with pytest.raises(ValueError, match="one row of 300"):
        gemv(torch.randn(2, 300, device=DEVICE), torch.randn(70, 300, device=DEVICE))


def test_single_16_bit_rows_take_the_kernel_and_batches_do_not(micro_model) -> None:
    model = micro_model.to(DEVICE, torch.bfloat16)
    tokens = torch.arange(3, 11, device=DEVICE)[None]
    calls = []
    try:
        ops.use_gemv_kernel(True)
        original = ops._gemv
        ops._gemv = lambda x, w: calls.append(x.shape) or original(x, w)
        one_row = model(tokens[:, :1])
        assert calls and all(shape[:-1].numel() == 1 for shape in calls)
        calls.clear()
        batch = model(tokens)
        assert not calls
    finally:
        ops.use_gemv_kernel(False)
    torch.testing.assert_close(one_row.float(), model(tokens[:, :1]).float(), atol=0.1, rtol=0.05)
    assert torch.equal(batch, model(tokens))
