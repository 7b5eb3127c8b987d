"""The fused Triton SeedLM kernel against dense reconstruction. Without a GPU it runs under Triton's interpreter at
shapes small enough for it: TRITON_INTERPRET=1 must be set before triton is first imported (triton.language decorates
its own helpers then), so this module sets it at collection and removes it when its tests are done. Triton 3.9's
interpreter gets bf16 wrong (`tl.dot` and the fp32 -> bf16 rounding), so bf16 inputs are checked on GPUs only."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from raytrain.compress.format import compress_tensor
from raytrain.compress.seedlm import SeedLMConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if importlib.util.find_spec("triton") is None:
    pytest.skip("the kernel needs triton (pip install 'raytrain[kernels]')", allow_module_level=True)
if DEVICE == "cpu":
    if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

from raytrain.compress.kernels import seedlm_matmul as kernel  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _interpreter_only_here():
    yield
    if DEVICE == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.mark.parametrize("bits, shape", [(4, (24, 40)), (3, (20, 50))])
def test_kernel_matches_dense_reconstruction(bits: int, shape: tuple[int, int]) -> None:
    """50 columns at C=12 leave a partial block per row: the padding must not leak into y."""
    cfg = SeedLMConfig.for_bits(bits, K=8, taps=[0, 2, 3, 4])
    g = torch.Generator().manual_seed(bits)
    ct = compress_tensor(torch.randn(*shape, generator=g), "seedlm", cfg)
    dense = ct.dense().double()
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE)
    for batch in (1, 3, 16):
        x = torch.randn(batch, shape[1], generator=g)
        y = kernel.seedlm_matmul(x.to(DEVICE), weight, kernel.KernelConfig(block_m=16, blocks=4))
        torch.testing.assert_close(y.double().cpu(), x.double() @ dense.T, rtol=1e-5, atol=1e-5)


def test_kernel_rebuilds_the_weights_bitwise() -> None:
    """One-hot rows of x pick single columns of W: exact equality with the reference decoder, K=16."""
    ct = compress_tensor(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)), "seedlm",
                         SeedLMConfig.for_bits(4, seed_chunk=4096))
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE)
    y = kernel.seedlm_matmul(torch.eye(16, device=DEVICE), weight, kernel.KernelConfig(block_m=16, blocks=2))
    assert torch.equal(y.T.cpu(), ct.dense())
    assert torch.equal(kernel.seedlm_matmul(torch.eye(16, device=DEVICE)[3:4], weight)[0].cpu(), ct.dense()[:, 3])


@pytest.mark.skipif(DEVICE == "cpu", reason="Triton's interpreter does not round bf16 like a GPU")
@pytest.mark.parametrize("batch", [1, 8])
def test_bf16_inputs_match_the_bf16_dense_matmul(batch: int) -> None:
    ct = compress_tensor(torch.randn(256, 512), "seedlm", SeedLMConfig.for_bits(4, K=8, taps=[0, 2, 3, 4]))
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE)
    x = torch.randn(batch, 512, device=DEVICE, dtype=torch.bfloat16)
    y = kernel.seedlm_matmul(x, weight)
    reference = x.float() @ ct.dense().to(DEVICE, torch.bfloat16).float().T  # bf16 weights, fp32 accumulation
    assert y.dtype == torch.bfloat16 and (y.float() - reference).abs().max() <= 1e-2 * reference.abs().max()


def test_kernel_refuses_prefill_sized_inputs() -> None:
    ct = compress_tensor(torch.randn(4, 8), "seedlm", SeedLMConfig.for_bits(4, K=8, taps=[0, 2, 3, 4]))
    weight = kernel.SeedLMWeight.from_compressed(ct, DEVICE)
    with pytest.raises(ValueError, match="1..16 rows"):
        kernel.seedlm_matmul(torch.randn(17, 8, device=DEVICE), weight)
