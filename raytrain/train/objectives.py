"""Training losses (plain PyTorch): language modelling, CatLIP's multi-label BCE, CLIP's contrastive loss and
classification."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F

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


def multilabel_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CatLIP's loss: BCE-with-logits summed over classes and batch, divided by the batch size (corenet's
    `batch_mean`, not a mean over B x V). logits (B, V), multi-hot targets (B, V) -> scalar, in fp32."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
             gather: bool = True) -> torch.Tensor:
    """CLIP's symmetric contrastive loss for this rank's rows against every rank's features.

    image, text (B, e) unit features; scale the logit scale. With `gather` under torch.distributed, features of all
    ranks are all-gathered with gradients flowing back to their owners, the local rows are scored against the
    global batch and each rank's loss is the mean over its rows: the average over ranks equals the loss of the
    whole global batch in one process, and so do the gradients once they are averaged over ranks.
    """
    rank, world = 0, 1
    all_image, all_text = image, text
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        all_image = torch.cat(dist_nn.all_gather(image.contiguous()))  # (world*B, e)
        all_text = torch.cat(dist_nn.all_gather(text.contiguous()))
    targets = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_image = scale * image.float() @ all_text.float().T  # (B, world*B)
    logits_text = scale * text.float() @ all_image.float().T
    return (F.cross_entropy(logits_image, targets) + F.cross_entropy(logits_text, targets)) / 2


def label_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing (the fine-tune recipe's 0.1), fp32. logits (B, C), labels (B,)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def cosine_distillation(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over masked rows of 1 - cos(pred, target): feature distillation as in OpenScene (UP-VL's point head).

    pred, target (N, D); mask (N,) bool selects the rows with a teacher feature (camera-visible points).
    """
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum().clamp_min(1)
