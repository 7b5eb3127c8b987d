"""Optimizers and LR schedules (plain PyTorch): AdamW with OpenELM's decay groups, corenet's warmup + cosine."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from raytrain.config import ConfigError
from raytrain.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Matrices decay, vectors (norm gains) don't; the embedding decays unless `decay_embeddings` is off."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions are flat; ds_shape is the real shape
        exempt = ndim < 2 or (id(p) in embedding_ids and not cfg.decay_embeddings)
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name={cfg.name!r} is unknown; known: adamw")
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused or None)


def cosine_lr(step: int, peak: float, cfg: ScheduleConfig, total_steps: int) -> float:
    """corenet's schedule: linear warmup from `init_lr`, then cosine to `min_lr_ratio * peak` over a period of
    `total - warmup + 1` steps (the +1 is the reference's)."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio * peak
    if step < warmup:
        return cfg.init_lr + step * (peak - cfg.init_lr) / warmup
    progress = (step - warmup) / (total_steps - warmup + 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, peak: float, cfg: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if cfg.name != "cosine":
        raise ConfigError(f"schedule.name={cfg.name!r} is unknown; known: cosine")
    factor: Callable[[int], float] = lambda step: cosine_lr(step, peak, cfg, total_steps) / peak  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
