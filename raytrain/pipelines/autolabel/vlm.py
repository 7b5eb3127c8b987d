"""The pluggable image-text model: image crops -> D-dim unit features, text prompts -> D-dim unit features.

UP-VL pools a 2D vision-language model's features at projected LiDAR points. Any model with `encode_images` and
`encode_text` plugs in through `BACKENDS` (config key `vlm.backend`); `feature_map` turns a crop encoder into the
dense per-pixel embedding map the projection stage samples (a dense-CLIP-style stand-in: one crop per map cell).

`ClipCrops` (`vlm=clip`) is the CLIP model of `raytrain train job=clip` (`models/clip.py`: ViT image tower, decoder
text tower), loaded with the tokenizer its checkpoint ships; trained on the generator's camera crops
(`raytrain data make=lidar_crops`, `crops.py`) it is the learned image-text model the issue asks for.

`LookPrototypes` (`vlm=look_prototypes`, the default because it needs no checkpoint) is a FALLBACK, not a learned
vision-language model: its image feature is a centre-weighted soft colour histogram of the crop, and its text encoder
maps a prompt naming one of the synthetic generator's classes to the histogram of that class's look
(`lidar_scenes.LOOKS`). It knows only those classes; any other prompt gets a fixed pseudo-random unit vector, so it
matches nothing. It lets the pipeline run and be tested end to end without weights; its labels say nothing about how
a real VLM would do on real images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from raytrain.data.lidar_scenes import LOOKS
from raytrain.data.tokenizer import caption_tokens
from raytrain.pipelines.autolabel.config import VLMConfig


class ImageTextModel(Protocol):
    dim: int

    def encode_images(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float RGB in [0, 1] -> (B, D) unit-norm features."""
        ...

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Q prompts -> (Q, D) unit-norm features in the image features' space."""
        ...


class DenseImageTextModel(ImageTextModel, Protocol):
    """A model that computes `feature_map`'s crop features for a whole image at once (OpenSeg-like, or faster)."""

    def encode_dense(self, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D, H', W'), cell (i, j) being the crop centred on (stride*(i+.5), ...)."""
        ...


class LookPrototypes:
    """Fallback image-text model: soft colour histograms matched against the generator's class looks (see above)."""

    def __init__(self, levels: int = 4, sigma: float = 0.12):
        grid = torch.linspace(0, 1, levels)
        self.anchors = torch.cartesian_prod(grid, grid, grid)  # (D, 3) RGB anchor colours
        self.sigma = sigma
        self.dim = len(self.anchors)

    def _soft_bins(self, rgb: torch.Tensor) -> torch.Tensor:
        """(..., 3) colours -> (..., D) soft assignments to the anchor colours."""
        d2 = (rgb ** 2).sum(-1, keepdim=True) - 2 * rgb @ self.anchors.T + (self.anchors ** 2).sum(-1)
        return torch.softmax(-d2 / (2 * self.sigma ** 2), dim=-1)

    @staticmethod
    def _centre_weights(size: int) -> torch.Tensor:
        """(S, S) Gaussian weights (sigma = S/4), so a crop's feature is mostly its centre's."""
        r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        return torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (size / 4) ** 2))

    def encode_images(self, crops: torch.Tensor) -> torch.Tensor:
        soft = self._soft_bins(crops.float().permute(0, 2, 3, 1))  # (B, S, S, D)
        hist = (soft * self._centre_weights(crops.shape[-1])[:, :, None]).sum((1, 2))
        return F.normalize(hist.sqrt(), dim=-1)

    def encode_dense(self, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, H', W'): `encode_images` of the crops `feature_map` cuts, computed by convolution."""
        soft = self._soft_bins(images.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, D, H, W)
        kernel = self._centre_weights(crop).expand(self.dim, 1, crop, crop)
        hist = F.conv2d(soft, kernel, stride=stride, groups=self.dim)
        return F.normalize(hist.clamp_min(0).sqrt(), dim=1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self._prompt(p) for p in prompts])

    def _prompt(self, prompt: str) -> torch.Tensor:
        words = prompt.lower().replace(",", " ").split()
        known = [w for w in words if w in LOOKS]
        if known:
            colours = torch.tensor(LOOKS[known[-1]], dtype=torch.float32)  # (parts, 3)
            return F.normalize(self._soft_bins(colours).sum(0).sqrt(), dim=0)
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        return F.normalize(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)), dim=0)


class ClipCrops:
    """A `raytrain train job=clip` checkpoint (run directory or checkpoint directory) as the image-text model:
    crops are resized to the image tower's training size, prompts tokenized as the training captions were."""

    def __init__(self, cfg: VLMConfig):
        from raytrain.checkpoint.hf import load_pretrained
        from raytrain.models.clip import Clip

        if not cfg.checkpoint:
            raise ValueError("vlm.backend=clip needs vlm.checkpoint=DIR (a `raytrain train job=clip` run or its "
                             "checkpoint)")
        loaded = load_pretrained(cfg.checkpoint, device=cfg.device)
        if not isinstance(loaded.model, Clip):
            raise ValueError(f"vlm.checkpoint={cfg.checkpoint}: a {type(loaded.model).__name__}, not a CLIP model")
        if loaded.tokenizer is None:
            raise ValueError(f"vlm.checkpoint={cfg.checkpoint}: ships no tokenizer (tokenizer.json)")
        self.model, self.tokenizer, self.device = loaded.model.float(), loaded.tokenizer, cfg.device
        self.size = loaded.config.image.image_size
        self.text_length = loaded.config.text.max_seq_len
        self.dim = loaded.config.embed_dim

    @torch.no_grad()
    def encode_images(self, crops: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(crops.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model.encode_image(x.to(self.device)).float()  # (B, e)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens, lengths = caption_tokens(self.tokenizer, prompts, self.text_length)
        tokens, lengths = torch.from_numpy(tokens).to(self.device), torch.from_numpy(lengths).to(self.device)
        return self.model.encode_text(tokens, lengths).float().cpu()  # (Q, e)


BACKENDS: dict[str, Callable[[VLMConfig], ImageTextModel]] = {
    "look_prototypes": lambda cfg: LookPrototypes(),
    "clip": ClipCrops,
}


def build_vlm(cfg: VLMConfig) -> ImageTextModel:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"vlm.backend={cfg.backend!r} is unknown; known: {', '.join(BACKENDS)}")
    return BACKENDS[cfg.backend](cfg)


@torch.no_grad()
def feature_map(model: ImageTextModel, image: np.ndarray, cfg: VLMConfig) -> np.ndarray:
    """Dense features of an (H, W, 3) uint8 image: (ceil(H/stride), ceil(W/stride), D), one crop per cell.

    Cell (i, j) is centred on pixel (stride * (i + 0.5), stride * (j + 0.5)); edges are padded by replication.
    """
    h, w, _ = image.shape
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    pad = cfg.crop // 2
    x = F.pad(x, (pad, pad + cfg.stride, pad, pad + cfg.stride), mode="replicate")
    rows, cols = -(-h // cfg.stride), -(-w // cfg.stride)
    offset = cfg.stride // 2
    if hasattr(model, "encode_dense"):
        dense = model.encode_dense(x[:, :, offset:, offset:].to(cfg.device), cfg.crop, cfg.stride)[0].cpu()
        return dense[:, :rows, :cols].permute(1, 2, 0).numpy()
    patches = F.unfold(x[:, :, offset:, offset:], cfg.crop, stride=cfg.stride)  # (1, 3*crop*crop, L)
    n_r = (x.shape[2] - offset - cfg.crop) // cfg.stride + 1
    n_c = (x.shape[3] - offset - cfg.crop) // cfg.stride + 1
    crops = patches[0].T.reshape(n_r, n_c, 3, cfg.crop, cfg.crop)[:rows, :cols].reshape(-1, 3, cfg.crop, cfg.crop)
    feats = torch.cat([model.encode_images(crops[i:i + cfg.batch].to(cfg.device)).cpu()
                       for i in range(0, len(crops), cfg.batch)])
    return feats.reshape(rows, cols, -1).numpy()


def sample_map(fmap: np.ndarray, uv: np.ndarray, stride: int) -> np.ndarray:
    """Bilinear samples of a feature map at (N, 2) pixel coordinates -> (N, D), re-normalised."""
    rows, cols, _ = fmap.shape
    g = uv / stride - 0.5  # map-cell coordinates
    c0 = np.clip(np.floor(g).astype(np.int64), 0, [cols - 1, rows - 1])
    c1 = np.minimum(c0 + 1, [cols - 1, rows - 1])
    t = np.clip(g - c0, 0, 1)
    f = (fmap[c0[:, 1], c0[:, 0]] * ((1 - t[:, 0]) * (1 - t[:, 1]))[:, None]
         + fmap[c0[:, 1], c1[:, 0]] * (t[:, 0] * (1 - t[:, 1]))[:, None]
         + fmap[c1[:, 1], c0[:, 0]] * ((1 - t[:, 0]) * t[:, 1])[:, None]
         + fmap[c1[:, 1], c1[:, 0]] * (t[:, 0] * t[:, 1])[:, None])
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)
