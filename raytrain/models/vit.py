"""Vision transformer as CatLIP trains it: corenet's ViT variant (plain PyTorch, no Ray).

Differences from the original ViT (spec `catlip.md` section 2.3): a convolutional stem of three convolutions (kernel
= stride = 4, 2, 2; the first two with BatchNorm and GELU) instead of one patchify layer; the learned positional
embedding is added to the patch tokens only and is bilinearly resized for other input sizes; the CLS token is
prepended after it. Pre-norm blocks with biases, LayerNorm in fp32 (eps 1e-6), GELU MLP, SDPA attention, no dropout.
The head is final LN -> CLS -> Linear(d, num_classes); with `num_classes=0` the model returns CLS features (the
CLIP image tower). With `range_augment` the model carries RangeAugment's 6 learnt range scalars
(`range_augment.py`) and, in training mode, classifies augmented images. Presets: `conf/model/vit_*.yaml`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.models.range_augment import RangeAugment

PATCH = 16  # total stride of the stem
BASE_GRID = 14  # the positional embedding is learnt for 224 / 16 = 14 patches per side


@dataclass
class ViTConfig:
    name: str = "vit"
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 3072
    num_classes: int = 24320  # classifier rows (CatLIP: the synset vocabulary); 0 = no head, features out
    image_size: int = 224  # training resolution; other sizes resize the positional embedding
    pos_grid: int = BASE_GRID  # patches per side the positional embedding is stored for
    norm_eps: float = 1e-6
    range_augment: bool = False  # learnt brightness / contrast / noise ranges applied in training (CatLIP recipes)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.image_size % PATCH:
            raise ValueError(f"image_size={self.image_size} must be a multiple of {PATCH}")

    @property
    def stem_channels(self) -> int:
        return max(32, self.d_model // 4)


class LayerNorm(nn.LayerNorm):
    """Normalised in fp32 whatever the activation dtype (bf16 statistics drift)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, d, H/16, W/16)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        c = cfg.stem_channels
        self.conv1 = nn.Conv2d(3, c, 4, stride=4, bias=False)
        self.norm1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 2, stride=2, bias=False)
        self.norm2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, cfg.d_model, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attn_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ViT(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> logits (B, num_classes), or CLS features (B, d) when num_classes = 0."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.stem = ConvStem(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, d, cfg.pos_grid, cfg.pos_grid))
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else None
        self.augment = RangeAugment() if cfg.range_augment else None
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=self.cfg.d_model ** -0.5)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def init_buffers(self) -> None:
        """Nothing derived to recompute (BatchNorm statistics are loaded with the weights)."""

    def tie_weights(self) -> None:
        """No tied weights."""

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The positional embedding for an (h, w) patch grid: (1, h*w, d)."""
        pos = self.pos_embed
        if tuple(pos.shape[-2:]) != grid:
            pos = F.interpolate(pos, size=grid, mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def tokens(self, images: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + h*w, d): CLS then the patch tokens (row-major) after the first `blocks` blocks
        (None: all of them), before the final norm."""
        x = self.stem(images)  # (B, d, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2) + self.positions(grid).to(x.dtype)  # (B, h*w, d)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + h*w, d)
        for block in self.layers[:blocks]:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final-norm CLS vector (B, d)."""
        return self.norm(self.tokens(images)[:, 0])

    def forward(self, images: torch.Tensor, return_augmented: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """`return_augmented`: also the images the model saw (RangeAugment's in training, else the inputs)."""
        if self.augment is not None and self.training:
            images = self.augment(images)
        cls = self.features(images)
        out = self.head(cls) if self.head is not None else cls
        return (out, images) if return_augmented else out

    def param_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        total = count(self)
        head = count(self.head) if self.head is not None else 0
        return {"params_total": total, "params_stem": count(self.stem), "params_per_block": count(self.layers[0]),
                "params_trunk": total - head, "params_head": head}


def build_vit(cfg: ViTConfig, device: torch.device | str | None = None) -> ViT:
    """Build on `device` ("meta" builds shapes only)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return ViT(cfg)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) as Ray Data delivers them -> float (B, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def training_flops_per_image(cfg: ViTConfig, image_size: int) -> float:
    """Forward + backward FLOPs per image: 6 per weight-activation product of the blocks and head, plus attention
    (12 * T^2 * d per layer over T = 1 + (side/16)^2 tokens); the stem's convolutions are counted too."""
    T = 1 + (image_size // PATCH) ** 2
    d, c = cfg.d_model, cfg.stem_channels
    block = 4 * d * d + 2 * d * cfg.ffn_dim
    stem = (image_size // 4) ** 2 * 48 * c + (image_size // 8) ** 2 * 4 * c * c + (image_size // 16) ** 2 * 4 * c * d
    return 6 * (T * cfg.n_layers * block + stem + d * cfg.num_classes) + 12 * cfg.n_layers * T * T * d
