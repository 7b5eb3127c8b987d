"""A linear layer whose weight stays compressed in memory (the serving path).

On CUDA with at most 16 input rows (decode) a SeedLM weight in row blocking goes through the fused Triton kernel,
which never materialises the weight. Anything else (prefill, larger batches, CPU, flat blocking, RTN weights)
rebuilds the dense weight for the call and runs a regular matmul: compute-bound shapes gain nothing from on-the-fly
decoding (spec §2.6).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.compress import seedlm
from raytrain.compress.format import CompressedTensor


class CompressedLinear(nn.Module):
    def __init__(self, weight: CompressedTensor, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.device = torch.device(device)
        if weight.method == "seedlm" and weight.config.blocking == "row" and self.device.type == "cuda":
            from raytrain.compress.kernels.seedlm_matmul import SeedLMWeight

            # cycle offsets in place of seeds: the kernel and the dense fallback share one copy of the arrays
            arrays, cfg = seedlm.with_cycle_offsets(weight.arrays, weight.config)
            self.weight_ct = dataclasses.replace(weight, arrays=arrays, config=cfg).to(device)
            self.kernel_weight = SeedLMWeight.from_compressed(self.weight_ct, self.device)
        else:
            self.weight_ct = weight.to(device)
            self.kernel_weight = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.weight_ct.method}, "
                f"bits_per_weight={self.weight_ct.bits_per_weight:.3f}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_weight is not None:
            from raytrain.compress.kernels.seedlm_matmul import MAX_BATCH, seedlm_matmul

            rows = x.reshape(-1, self.in_features)
            if rows.shape[0] <= MAX_BATCH:
                return seedlm_matmul(rows, self.kernel_weight).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight_ct.dense().to(x.dtype))


def replace_linears(model: nn.Module, compressed: dict[str, CompressedTensor], device: torch.device | str) -> None:
    """Swap each module whose `<name>.weight` is in `compressed` for a CompressedLinear."""
    for name, ct in compressed.items():
        module_name = name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CompressedLinear(ct, device))
