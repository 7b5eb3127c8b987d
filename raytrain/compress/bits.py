"""Packing signed b-bit integers into bytes, LSB first: value n occupies bits n*b .. n*b+b-1 of the byte stream.

With b = 4 this is two values per byte, the first in the low nibble, which is the layout the SeedLM kernel reads.
Widths that divide 8 (1, 2, 4, 8) pack whole values per byte directly; other widths go through a bit stream.
"""

from __future__ import annotations

import torch


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten `values` (two's complement, in [-2^(b-1), 2^(b-1)-1]) into a uint8 stream of ceil(n*b/8) bytes."""
    v = values.reshape(-1).to(torch.int32) & ((1 << bits) - 1)
    if 8 % bits == 0:  # whole values per byte, without the 8x bit stream
        per = 8 // bits
        v = torch.nn.functional.pad(v, (0, -v.numel() % per)).view(-1, per)
        return (v << (_positions(per, v.device) * bits)).sum(1).to(torch.uint8)
    stream = ((v[:, None] >> _positions(bits, v.device)) & 1).reshape(-1)  # (n*b,) bits
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    return (stream.view(-1, 8) << _positions(8, v.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` signed b-bit values of a stream written by `pack_bits`, as int8."""
    if 8 % bits == 0:
        per = 8 // bits
        b = packed.to(torch.int32)[:, None] >> (_positions(per, packed.device) * bits)
        v = (b & ((1 << bits) - 1)).reshape(-1)[:count]
        return (v - ((v >> (bits - 1)) << bits)).to(torch.int8)
    stream = ((packed.to(torch.int32)[:, None] >> _positions(8, packed.device)) & 1).reshape(-1)
    v = (stream[:count * bits].view(count, bits) << _positions(bits, packed.device)).sum(1)
    return (v - ((v >> (bits - 1)) << bits)).to(torch.int8)


def packed_size(count: int, bits: int) -> int:
    """Bytes that `pack_bits` writes for `count` values."""
    return (count * bits + 7) // 8


def _positions(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32, device=device)
