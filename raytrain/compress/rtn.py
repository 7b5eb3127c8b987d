"""Round-to-nearest baseline: symmetric b-bit integers with one fp16 scale per group of consecutive input weights.

Groups run along each row of a [out, in] weight (the last one of a row may be partial); a group's scale is
amax / (2^(b-1) - 1), rounded to fp16 before use so that decoding reproduces encoding, and codes are round-half-even
of w / scale. The scales are stored and counted: b + 16 / group_size bits per weight (4.125 at b=4, group 128; b=3,
group 16 is exactly 4.0). Codes keep rows first, so row ranges encoded separately concatenate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from raytrain.compress.bits import pack_bits, packed_size, unpack_bits

SCALE_DTYPE = torch.float16
Codes = dict[str, torch.Tensor]


@dataclass
class RTNConfig:
    bits: int = 4  # bits per code (the scales come on top)
    group_size: int = 128  # consecutive input weights sharing a scale

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"rtn bits={self.bits}: supported code widths are 2..8")
        if self.group_size < 1:
            raise ValueError(f"rtn group_size={self.group_size} must be positive")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "scale_dtype": "float16", "rounding": "half_even"}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RTNConfig:
        return cls(bits=meta["bits"], group_size=meta["group_size"])


def groups_per_row(cols: int, cfg: RTNConfig) -> int:
    return math.ceil(cols / cfg.group_size)


def encode(weight: torch.Tensor, cfg: RTNConfig, device: str | torch.device = "cpu") -> Codes:
    """codes int8 (rows, cols), scales fp16 (rows, groups); the last group of a row may be partial (no padding is
    stored)."""
    rows, cols = weight.shape
    groups = groups_per_row(cols, cfg)
    w = F.pad(weight.to(device, torch.float32), (0, groups * cfg.group_size - cols)).view(rows, groups, -1)
    scales = (w.abs().amax(-1) / cfg.qmax).to(SCALE_DTYPE)
    if not torch.isfinite(scales).all():
        raise ValueError(f"weights up to {w.abs().max().item():.3g} overflow the fp16 group scales")
    divisor = torch.where(scales == 0, 1.0, scales.float())[..., None]
    codes = (w / divisor).round().clamp(-cfg.qmax, cfg.qmax).to(torch.int8)
    return {"codes": codes.view(rows, -1)[:, :cols].contiguous().cpu(), "scales": scales.cpu()}


def decode(codes: Codes, cfg: RTNConfig, cols: int) -> torch.Tensor:
    rows, groups = codes["scales"].shape
    q = F.pad(codes["codes"].float(), (0, groups * cfg.group_size - cols)).view(rows, groups, -1)
    return (q * codes["scales"].float()[..., None]).view(rows, -1)[:, :cols]


def pack(codes: Codes, cfg: RTNConfig) -> dict[str, torch.Tensor]:
    return {"codes": pack_bits(codes["codes"], cfg.bits), "scales": codes["scales"].contiguous()}


def expected_sizes(shape: tuple[int, int], cfg: RTNConfig) -> dict[str, int]:
    return {"codes": packed_size(shape[0] * shape[1], cfg.bits), "scales": shape[0] * groups_per_row(shape[1], cfg)}


def check_arrays(arrays: dict[str, torch.Tensor], cfg: RTNConfig) -> None:
    if arrays["scales"].dtype != SCALE_DTYPE or not torch.isfinite(arrays["scales"]).all():
        raise ValueError(f"scales must be finite {SCALE_DTYPE}")


def row_alignment(cols: int, cfg: RTNConfig) -> int:
    """Any row range encodes on its own (groups never cross rows)."""
    return 1


def padding(shape: tuple[int, int], cfg: RTNConfig) -> int:
    return 0  # a row's last group may be partial


def unpack(arrays: dict[str, torch.Tensor], cfg: RTNConfig, shape: tuple[int, int]) -> Codes:
    rows, cols = shape
    codes = unpack_bits(arrays["codes"], cfg.bits, rows * cols)
    return {"codes": codes.view(rows, cols), "scales": arrays["scales"].view(rows, groups_per_row(cols, cfg))}
