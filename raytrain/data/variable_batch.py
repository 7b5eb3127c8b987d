"""corenet's variable-batch multi-scale sampler (CatLIP spec section 5.4), on the training workers.

The sides are `np.linspace(min_side, max_side, num_scales)` plus the base side, each rounded to a multiple of
`side_divisor` (corenet's `make_divisible`); a side s trains on batches of `max(1, int(round(base^2 * b / s^2, 2)))`
images, so every batch holds about the same number of pixels (B/16 at b = 1024: 13 sides, 3136 images at 128 down to
501 at 320). A new (side, batch) pair is drawn for every batch, from a generator seeded by the epoch, so every rank
draws the same sequence and all ranks take the same number of steps.

Ray Data delivers fixed-size batches of crops at `max_side`; `variable_batches` re-cuts that stream into the drawn
batch sizes and resizes each batch to its side (bilinear, antialiased). corenet crops each image at the batch's side
directly; cropping at the largest side and resizing is the same up to one extra resampling.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from raytrain.models.decoder import make_divisible


def batch_shapes(base_side: int, base_batch: int, min_side: int, max_side: int, num_scales: int,
                 divisor: int) -> list[tuple[int, int]]:
    """(side, batch size) pairs, smallest side first."""
    requested = [*np.linspace(min_side, max_side, num_scales).tolist(), base_side]
    sides = sorted({make_divisible(s, divisor) for s in requested})
    return [(s, max(1, int(round(base_side ** 2 * base_batch / s ** 2, 2)))) for s in sides]


def variable_batches(batches: Iterator[dict[str, torch.Tensor]], shapes: list[tuple[int, int]],
                     seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Re-cut batches (uint8 `image` (B, H, W, 3) and per-sample columns) into batches of the drawn sizes, each
    image resized to the drawn side; a last incomplete batch is dropped."""
    rng = random.Random(seed)
    side, size = rng.choice(shapes)
    pending: dict[str, torch.Tensor] | None = None
    for batch in batches:
        pending = batch if pending is None else {k: torch.cat([pending[k], v]) for k, v in batch.items()}
        while len(pending["image"]) >= size:
            out = {k: v[:size] for k, v in pending.items()}
            pending = {k: v[size:] for k, v in pending.items()}
            out["image"] = resized(out["image"], side)
            yield out
            side, size = rng.choice(shapes)


def resized(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, side, side, 3)."""
    if images.shape[1] == side:
        return images
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(side, side), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
