"""CLIP, the contrastive baseline CatLIP is compared with (plain PyTorch, no Ray).

The image tower is the same ViT CatLIP trains (`vit.py`, without its classifier); the text tower is the project's
decoder family (causal, RoPE, SwiGLU) without its LM head, pooled at each caption's last real token (EOS), as CLIP
pools at the end-of-text token. Both features are projected without bias to a shared space and L2-normalised;
a learnt temperature (initialised to 1/0.07, clamped at 100) scales their dot products. The loss is in
`raytrain/train/objectives.py`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.models.decoder import Decoder, DecoderConfig
from raytrain.models.vit import ViT, ViTConfig


def _text_tower() -> DecoderConfig:
    return DecoderConfig(name="clip_text", vocab_size=49408, d_model=512, n_layers=12, head_dim=64, q_heads=8,
                         kv_heads=8, ffn_dim=2048, max_seq_len=77, tie_embeddings=False)


@dataclass
class ClipConfig:
    name: str = "clip"
    image: ViTConfig = field(default_factory=lambda: ViTConfig(num_classes=0))
    text: DecoderConfig = field(default_factory=_text_tower)
    embed_dim: int = 512
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.image.num_classes:
            raise ValueError("image.num_classes must be 0: the CLIP image tower has no classifier")


class Clip(nn.Module):
    """(images (B, 3, H, W), tokens (B, T), lengths (B,)) -> unit image features (B, e), unit text features
    (B, e) and the logit scale."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = ViT(cfg.image)
        self.text = Decoder(cfg.text)
        self.text.head = nn.Identity()  # hidden states out: final RMSNorm, no vocabulary projection
        self.image_proj = nn.Linear(cfg.image.d_model, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.d_model, cfg.embed_dim, bias=False)
        # shape (1,), not a 0-dim tensor: DeepSpeed's ZeRO flattening cannot view 0-dim parameters
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / cfg.init_temperature)]))
        nn.init.normal_(self.image_proj.weight, std=cfg.image.d_model ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.d_model ** -0.5)

    @property
    def layers(self) -> nn.ModuleList:
        """The blocks that activation checkpointing and compilation act on (both towers')."""
        return nn.ModuleList([*self.image.layers, *self.text.layers])

    @property
    def activation_checkpointing(self) -> bool:
        return self.image.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.image.activation_checkpointing = self.text.activation_checkpointing = on

    def init_buffers(self) -> None:
        self.text.init_buffers()

    def tie_weights(self) -> None:
        """No tied weights."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image.features(images)), dim=-1)  # (B, e)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.text(tokens)  # (B, T, d_text); causal, so right padding never reaches a real token
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # (B, d_text)
        return F.normalize(self.text_proj(pooled), dim=-1)  # (B, e)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp().squeeze(0)  # ()
        return self.encode_image(images), self.encode_text(tokens, lengths), scale

    def param_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"params_total": count(self), "params_image": count(self.image), "params_text": count(self.text)}


def build_clip(cfg: ClipConfig, device: torch.device | str | None = None) -> Clip:
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Clip(cfg)
