"""Training losses (plain PyTorch)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Next-token cross-entropy plus z-loss, `z_loss * mean(logsumexp(logits)^2)`, both over positions whose label
    is not IGNORE_INDEX (the reference counts pad positions in the logged z-loss; we mask them, spec section 2.5).

    logits (B, T, V), labels (B, T) -> (total, cross_entropy, z_term), computed in fp32.
    """
    logits = logits.float().flatten(0, 1)  # (N, V)
    labels = labels.flatten()
    valid = labels != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    target = logits.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    n = valid.sum().clamp_min(1)
    ce = ((lse - target) * valid).sum() / n
    z = z_loss * (lse.square() * valid).sum() / n
    return ce + z, ce.detach(), z.detach()


def cosine_distillation(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over masked rows of 1 - cos(pred, target): feature distillation as in OpenScene (UP-VL's point head).

    pred, target (N, D); mask (N,) bool selects the rows with a teacher feature (camera-visible points).
    """
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum().clamp_min(1)
