"""RangeAugment (Mehta et al., arXiv 2212.10553), as corenet's CatLIP recipes use it: learned augmentation ranges.

Brightness, contrast and additive noise each draw a magnitude per image from a uniform range whose two ends are
learnt (6 scalars in all), squashed by sigmoids into corenet's bounds. In each training step the three are applied
in random order, each to a random half of the batch, and the result is clipped to [0, 1]; the classifier sees the
augmented images, so its loss pulls the ranges one way. `range_augment_loss` pulls them the other: a smooth-L1
between each augmented image's MSE to its original (0-255 scale) and a target MSE that follows a cosine from PSNR
40 dB (MSE 6.5025) to 20 dB (MSE 650.25) over training, scaled by alpha / 65025 (alpha = 100), as in corenet's
`neural_augmentation` loss. This is corenet's "distribution" mode (`DistributionNeuralAugmentor`).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

MAX_MSE = 255.0 ** 2  # the largest possible per-pixel squared error on the 0-255 scale


class UniformRange(nn.Module):
    """A magnitude drawn uniformly from [low, high], each end a learnt scalar squashed into its (min, max) bounds."""

    def __init__(self, low: float, high: float, low_bounds: tuple[float, float],
                 high_bounds: tuple[float, float]) -> None:
        super().__init__()
        # shape (1,), not 0-d: DeepSpeed broadcasts parameters through byte views, which 0-d tensors cannot take
        self.low_raw = nn.Parameter(torch.tensor([float(low)]))
        self.high_raw = nn.Parameter(torch.tensor([float(high)]))
        self.low_bounds, self.high_bounds = low_bounds, high_bounds

    @property
    def low(self) -> torch.Tensor:
        return _squash(self.low_raw, *self.low_bounds)

    @property
    def high(self) -> torch.Tensor:
        return _squash(self.high_raw, *self.high_bounds)

    def forward(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, 1, 1, 1) magnitudes."""
        u = torch.rand(n, 1, 1, 1, device=like.device, dtype=like.dtype)
        return self.low + u * (self.high - self.low)


def _squash(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.sigmoid(x) * (hi - lo) + lo


class RangeAugment(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> augmented images, same shape (training only; the caller decides)."""

    def __init__(self) -> None:
        super().__init__()
        self.brightness = UniformRange(0.5, 1.5, (0.1, 0.9), (1.1, 10.0))
        self.contrast = UniformRange(0.5, 1.5, (0.1, 0.9), (1.1, 10.0))
        self.noise = UniformRange(0.0, 0.1, (0.0, 5e-5), (1e-4, 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        n = max(1, x.shape[0] // 2)
        for apply in random.sample([self._brightness, self._contrast, self._noise], 3):
            picked = torch.randperm(x.shape[0], device=x.device)[:n]
            x = x.index_copy(0, picked, apply(x.index_select(0, picked)))
        return x.clamp(0.0, 1.0)

    def _brightness(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.brightness(x.shape[0], x)

    def _contrast(self, x: torch.Tensor) -> torch.Tensor:
        m = self.contrast(x.shape[0], x)
        return (1 - m) * x.mean(dim=(-1, -2), keepdim=True) + m * x

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x) * self.noise(x.shape[0], x)


def target_mse(step: int, total_steps: int, start_psnr: float = 40.0, end_psnr: float = 20.0) -> float:
    """corenet's cosine curriculum, in MSE (not dB): 6.5025 at step 0 to 650.25 at the end."""
    start, end = (MAX_MSE * 10 ** (-psnr / 10) for psnr in (start_psnr, end_psnr))
    step = min(step, total_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / (total_steps + 1)))


def range_augment_loss(images: torch.Tensor, augmented: torch.Tensor, target: float,
                       alpha: float = 100.0) -> torch.Tensor:
    """smooth-L1 between each image's MSE to its augmented version (0-255 scale) and the target MSE, x alpha/65025."""
    mse = ((augmented.float() - images.float()) * 255.0).square().mean(dim=(1, 2, 3))  # (B,)
    return F.smooth_l1_loss(mse, torch.full_like(mse, target)) * (alpha / MAX_MSE)
