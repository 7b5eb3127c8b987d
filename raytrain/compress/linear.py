"""A linear layer whose weight stays compressed in memory (the serving path).

On CUDA a SeedLM weight is laid out for the Triton kernels once (`SeedLMWeight`, 4 bytes per block as in the file):
up to 16 input rows (decode) go through the fused matmul, which never materialises the weight; more rows (prefill)
rebuild the dense weight in x's dtype with the decode kernel and run a regular matmul, since compute-bound shapes gain
nothing from decoding on the fly (spec §2.6). The forward does no host synchronisation and branches only on the
number of rows, so it can be captured in a CUDA graph; the fused decode step (`raytrain/infer/fused_decode.py`) runs
such a layer's `kernel_weight` through `seedlm_gemv`. Layers on CPU (unless built with `kernel=True`: the kernels then
run under Triton's interpreter, for tests), RTN weights and SeedLM's flat blocking (which the kernels do not read)
rebuild the dense weight per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.compress.format import CompressedTensor


class CompressedLinear(nn.Module):
    def __init__(self, weight: CompressedTensor, device: torch.device | str = "cpu", kernel: bool | None = None,
                 stream: str | None = None) -> None:
        """kernel: lay a SeedLM weight with row blocking out for the Triton kernels (`kernel_weight`); None: on CUDA
        only. True for any other weight is an error. stream: how the kernels regenerate the LFSR bits
        (`seedlm_matmul.STREAMS`; None: `default_stream` of the shape)."""
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.method, self.bits_per_weight = weight.method, weight.bits_per_weight
        self.device = torch.device(device)
        self.kernel_weight = None
        self.weight_ct = None
        readable = weight.method == "seedlm" and weight.config.blocking == "row"
        if kernel and not readable:
            raise ValueError(f"CompressedLinear(kernel=True) takes SeedLM weights with row blocking, not "
                             f"{weight.method}" + (" with flat blocking" if weight.method == "seedlm" else ""))
        if readable and (kernel if kernel is not None else self.device.type == "cuda"):
            from raytrain.compress.kernels.seedlm_matmul import SeedLMWeight

            self.kernel_weight = SeedLMWeight.from_compressed(weight, self.device, stream)
        else:
            self.weight_ct = weight.to(device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
                f"bits_per_weight={self.bits_per_weight:.3f}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_weight is None:
            return F.linear(x, self.weight_ct.dense().to(x.dtype))
        from raytrain.compress.kernels.seedlm_matmul import MAX_BATCH, seedlm_dense, seedlm_matmul

        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= MAX_BATCH:
            return seedlm_matmul(rows, self.kernel_weight).view(*x.shape[:-1], self.out_features)
        return F.linear(x, seedlm_dense(self.kernel_weight, x.dtype))


def replace_linears(model: nn.Module, compressed: dict[str, CompressedTensor], device: torch.device | str,
                    kernel: bool | None = None, stream: str | None = None) -> None:
    """Swap each module whose `<name>.weight` is in `compressed` for a CompressedLinear (`kernel`, `stream`: its
    arguments)."""
    for name, ct in compressed.items():
        module_name = name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CompressedLinear(ct, device, kernel, stream))
