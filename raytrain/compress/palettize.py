"""Palettization (AFM, spec "Adapters and quantization"): every weight is an index into a small look-up table.

A [out, in] weight is cut into groups of `group_size` consecutive rows (output channels; the last group may be
shorter); each group has its own table of 2^bits fp16 values, learned by 1-D k-means (Lloyd's algorithm) over the
group's weights, and every weight stores the b-bit index of its nearest table entry. Stored: the indices packed
(b bits each) and the tables (16 bits per entry), so a weight costs b + 16 * 2^b / (group_size * in) bits
(4.0052 at 4 bits, group 16, in 3072). Codes keep rows first, so row ranges that start on a group boundary
(`row_alignment`) encode separately and concatenate.

k-means runs on the group's sorted values: a cluster of 1-D k-means is an interval, so each Lloyd step is a
binary search of the centroid midpoints in the sorted values plus prefix sums (exact and deterministic, no
scatter). It starts three times, from the uniform grid over [min, max], from the group's quantiles, and from
the tails start: k - 2 entries fitted to the group from its quantiles, plus its minimum and maximum; it keeps the
tables with the lowest error after rounding to fp16. Lloyd's steps never increase the error, so a group's k-means
table is never worse than the uniform grid it started from. The tails start is for pretrained weights: from the
quantiles Lloyd's steps end in a local optimum that merges a heavy tail's few large weights into one entry at
about half their value (SmolLM2-135M), while the uniform grid wastes most entries on the empty tails; on SmolLM2's
groups with the largest weights the tails start lowers the squared error by up to 28% and keeps them.

`allocate` picks the bits of each tensor for a mixed setting (AFM's 2/4-bit mix averaging 3.5 bpw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from raytrain.compress.bits import pack_bits, packed_size, unpack_bits

LUT_DTYPE = torch.float16
Codes = dict[str, torch.Tensor]


@dataclass
class PalettizeConfig:
    bits: int = 4  # index width: a table of 2^bits entries per group
    group_size: int = 16  # consecutive rows (output channels) sharing one table
    iterations: int = 100  # Lloyd steps at most per start (it stops once no centroid moves)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"palettize bits={self.bits}: supported index widths are 1..8")
        if self.group_size < 1 or self.iterations < 0:
            raise ValueError(f"palettize group_size={self.group_size}, iterations={self.iterations}: group_size "
                             "must be positive and iterations not negative")

    @property
    def entries(self) -> int:
        return 1 << self.bits

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "grouping": "rows", "lut_dtype": "float16",
                "iterations": self.iterations}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PalettizeConfig:
        if meta.get("grouping") != "rows" or meta.get("lut_dtype") != "float16":
            raise ValueError(f"grouping={meta.get('grouping')!r}, lut_dtype={meta.get('lut_dtype')!r}: this decoder "
                             "reads row groups with float16 tables")
        return cls(bits=meta["bits"], group_size=meta["group_size"], iterations=meta["iterations"])


def groups_of(rows: int, cfg: PalettizeConfig) -> int:
    return math.ceil(rows / cfg.group_size)


def stored_bits(shape: tuple[int, ...], cfg: PalettizeConfig) -> int:
    """Exact storage of a [rows, cols] weight: the packed indices plus the fp16 tables."""
    return 8 * packed_size(shape[0] * shape[1], cfg.bits) + 16 * groups_of(shape[0], cfg) * cfg.entries


def row_alignment(cols: int, cfg: PalettizeConfig) -> int:
    """Row ranges encoded separately must start on a multiple of this (a table serves a group of rows)."""
    return cfg.group_size


def padding(shape: tuple[int, int], cfg: PalettizeConfig) -> int:
    return 0  # one index per weight; the last group of rows may be short


# ---- k-means ---------------------------------------------------------------------------------------------------

def kmeans(x: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables (G, k) fp16, sorted, and indices (G, n) int64 of the nearest entry for G groups of n values (G, n):
    the best per group of Lloyd's algorithm from the uniform grid, from the quantiles and from the tails start."""
    xs, _ = x.double().sort(dim=1)
    prefix = F.pad(xs.cumsum(1), (1, 0))  # (G, n + 1)
    uniform = torch.lerp(xs[:, :1], xs[:, -1:], torch.linspace(0, 1, k, dtype=xs.dtype, device=xs.device))
    quantile = _quantiles(xs, k)
    starts = [uniform, quantile]
    if k > 2:
        bulk = _lloyd(xs, prefix, _quantiles(xs, k - 2), iterations)
        starts.append(torch.cat([xs[:, :1], bulk, xs[:, -1:]], dim=1))
    best_lut, best_index, best_err = None, None, None
    for start in starts:
        lut = _lloyd(xs, prefix, start, iterations).to(LUT_DTYPE).sort(dim=1).values
        index = nearest(x, lut)
        err = (x.double() - lut.double().gather(1, index)).square().sum(1)
        if best_err is None:
            best_lut, best_index, best_err = lut, index, err
            continue
        better = err < best_err
        best_lut = torch.where(better[:, None], lut, best_lut)
        best_index = torch.where(better[:, None], index, best_index)
        best_err = torch.minimum(err, best_err)
    return best_lut, best_index


def _quantiles(xs: torch.Tensor, k: int) -> torch.Tensor:
    """k values (G, k) of sorted xs (G, n) at the centres of k equal shares."""
    n = xs.shape[1]
    return xs[:, ((torch.arange(k, device=xs.device) + 0.5) * n / k).long().clamp_max(n - 1)]


def _lloyd(xs: torch.Tensor, prefix: torch.Tensor, centroids: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd steps on sorted values xs (G, n) with prefix sums (G, n + 1); an empty cluster keeps its centroid."""
    c = centroids
    for _ in range(iterations):
        mids = (c[:, 1:] + c[:, :-1]) / 2  # a value equal to a midpoint joins the lower cluster, as in `nearest`
        ends = torch.searchsorted(xs, mids, right=True)  # (G, k - 1)
        bounds = F.pad(ends, (1, 0), value=0)
        bounds = torch.cat([bounds, torch.full_like(ends[:, :1], xs.shape[1])], dim=1)  # (G, k + 1)
        counts = bounds[:, 1:] - bounds[:, :-1]
        sums = prefix.gather(1, bounds[:, 1:]) - prefix.gather(1, bounds[:, :-1])
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        if torch.equal(moved, c):
            break
        c = moved
    return c


def nearest(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index (G, n) of the nearest entry of each group's sorted table (G, k); ties go to the lower entry."""
    table = lut.to(x.dtype)
    mids = (table[:, 1:] + table[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous())


# ---- the codec (the interface of raytrain.compress.format) -----------------------------------------------------

def encode(weight: torch.Tensor, cfg: PalettizeConfig, device: str | torch.device = "cpu") -> Codes:
    """indices uint8 (rows, cols) and tables fp16 (groups, 2^bits)."""
    rows, cols = weight.shape
    w = weight.to(device, torch.float32)
    full = rows // cfg.group_size * cfg.group_size
    parts = [w[:full].reshape(-1, cfg.group_size * cols)] if full else []
    if full < rows:
        parts.append(w[full:].reshape(1, -1))
    luts, indices = zip(*(kmeans(p, cfg.entries, cfg.iterations) for p in parts))
    index = torch.cat([i.reshape(-1) for i in indices]).view(rows, cols)
    return {"indices": index.to(torch.uint8).cpu(), "lut": torch.cat(luts).cpu()}


def decode(codes: Codes, cfg: PalettizeConfig, cols: int) -> torch.Tensor:
    index = codes["indices"].long()
    group = torch.arange(index.shape[0], device=index.device) // cfg.group_size
    return codes["lut"].float()[group[:, None], index]


def pack(codes: Codes, cfg: PalettizeConfig) -> dict[str, torch.Tensor]:
    return {"indices": pack_bits(codes["indices"], cfg.bits), "lut": codes["lut"].contiguous()}


def expected_sizes(shape: tuple[int, int], cfg: PalettizeConfig) -> dict[str, int]:
    return {"indices": packed_size(shape[0] * shape[1], cfg.bits), "lut": groups_of(shape[0], cfg) * cfg.entries}


def check_arrays(arrays: dict[str, torch.Tensor], cfg: PalettizeConfig) -> None:
    if arrays["lut"].dtype != LUT_DTYPE or not torch.isfinite(arrays["lut"]).all():
        raise ValueError(f"tables must be finite {LUT_DTYPE}")


def unpack(arrays: dict[str, torch.Tensor], cfg: PalettizeConfig, shape: tuple[int, int]) -> Codes:
    rows, cols = shape
    index = unpack_bits(arrays["indices"], cfg.bits, rows * cols).to(torch.int16) & (cfg.entries - 1)
    return {"indices": index.to(torch.uint8).view(rows, cols), "lut": arrays["lut"].view(-1, cfg.entries)}


# ---- mixed bits ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: its stored bits and its estimated cost (loss increase, or squared error)."""

    bits: int
    stored_bits: int
    cost: float


def allocate(candidates: dict[str, list[Candidate]], weights: dict[str, int], target_bpw: float) -> dict[str, int]:
    """Bits per tensor so that sum(stored bits) / sum(weights) <= target_bpw, starting from every tensor at its
    widest candidate and narrowing, one step at a time, the tensor whose step costs least per bit saved (the
    greedy solution of the knapsack: the least important tensors go to the fewest bits), then widening again the
    narrowed tensors that still fit, most valuable first. Raises ValueError when even the narrowest candidates
    exceed the target."""
    total = sum(weights.values())
    options = {n: sorted(c, key=lambda c: -c.bits) for n, c in candidates.items()}
    level = dict.fromkeys(options, 0)
    stored = sum(options[n][0].stored_bits for n in options)
    while stored > target_bpw * total:
        steps = [((options[n][i + 1].cost - options[n][i].cost)
                  / max(options[n][i].stored_bits - options[n][i + 1].stored_bits, 1), n)
                 for n, i in level.items() if i + 1 < len(options[n])]
        if not steps:
            narrowest = stored / total
            raise ValueError(f"target_bpw={target_bpw}: the narrowest setting already needs {narrowest:.4f} bits "
                             "per weight")
        _, name = min(steps)
        i = level[name]
        stored -= options[name][i].stored_bits - options[name][i + 1].stored_bits
        level[name] = i + 1
    while True:  # the last step may overshoot: widen again, most valuable first, what still fits the target
        fits = [((options[n][i].cost - options[n][i - 1].cost)
                 / max(options[n][i - 1].stored_bits - options[n][i].stored_bits, 1), n)
                for n, i in level.items() if i > 0 and stored + options[n][i - 1].stored_bits
                - options[n][i].stored_bits <= target_bpw * total]
        if not fits:
            return {n: options[n][i].bits for n, i in level.items()}
        _, name = max(fits)
        i = level[name]
        stored += options[name][i - 1].stored_bits - options[name][i].stored_bits
        level[name] = i - 1
