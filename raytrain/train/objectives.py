"""Training losses (plain PyTorch): next-token cross-entropy with z-loss and AFM's distillation target (language
modelling), Speculative Streaming's n-gram objective, CatLIP's multi-label BCE, CLIP's contrastive loss,
classification and feature distillation.

The language-modelling losses are computed in fp32 over the positions whose label is not IGNORE_INDEX, and return
the total to backpropagate with its detached parts for logging (their names: `METRICS`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F

IGNORE_INDEX = -100
METRICS = {"lm": ("ce", "z_loss"), "distill": ("ce", "z_loss", "distill")}
TARGETS = ("top1", "kl")


def next_token_pairs(tokens: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (B, T + 1) -> inputs (B, T) and next-token labels (B, T), pad labels ignored."""
    labels = tokens[:, 1:].clone()
    labels[labels == pad_id] = IGNORE_INDEX
    return tokens[:, :-1], labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """Next-token cross-entropy plus z-loss, `z_loss * mean(logsumexp(logits)^2)`, both over positions whose label
    is not IGNORE_INDEX (the reference counts pad positions in the logged z-loss; we mask them, spec section 2.5).

    logits (B, T, V), labels (B, T) -> (total, cross_entropy, z_term).
    """
    logits, labels, valid, lse = _flat(logits, labels)
    ce = _mean(lse - _pick(logits, labels), valid)
    z = z_loss * _mean(lse.square(), valid)
    return ce + z, ce.detach(), z.detach()


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, z_loss: float,
                 teacher_weight: float = 0.9, target: str = "top1") -> tuple[torch.Tensor, ...]:
    """Cross-entropy against a mix of the teacher and the label, plus z-loss (AFM core pretraining, spec 2.3):

        y = teacher_weight * t + (1 - teacher_weight) * onehot(label)
        t = onehot(argmax teacher)   (target="top1", AFM's)   or   softmax(teacher)   (target="kl")

    CE is linear in the target, so the loss is `w * CE(t, student) + (1 - w) * CE(label, student)`; with "kl" the
    first term differs from KL(teacher || student) by the teacher's entropy, a constant, and the logged `distill`
    part is that KL. logits and teacher_logits (B, T, V), labels (B, T) -> (total, ce, z_term, distill).
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; expected one of {TARGETS}")
    logits, labels, valid, lse = _flat(logits, labels)
    teacher = teacher_logits.float().flatten(0, 1)  # (N, V)
    ce = _mean(lse - _pick(logits, labels), valid)
    z = z_loss * _mean(lse.square(), valid)
    if target == "top1":
        distill = _mean(lse - _pick(logits, teacher.argmax(-1)), valid)
    else:
        log_p = F.log_softmax(teacher, dim=-1)
        distill = _mean((log_p.exp() * (log_p - (logits - lse[:, None]))).sum(-1), valid)
    total = teacher_weight * distill + (1 - teacher_weight) * ce + z
    return total, ce.detach(), z.detach(), distill.detach()


def ngram_targets(labels: torch.Tensor, gamma: int) -> torch.Tensor:
    """Next-token labels (B, T) -> the labels of the main stream and of streams 1..γ, (B, T, 1 + γ): stream j at
    position i predicts the label of position i + j (IGNORE_INDEX past the end)."""
    padded = F.pad(labels, (0, gamma), value=IGNORE_INDEX)
    return torch.stack([padded[:, j:j + labels.shape[1]] for j in range(gamma + 1)], dim=-1)


def ngram_loss(hidden: list[torch.Tensor], targets: list[torch.Tensor], logits: Callable[[torch.Tensor], torch.Tensor],
               weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative Streaming's loss (spec 2.2, Eq. 5): Σ_h w_h · mean CE of head h over its labelled positions.

    Head 0 is the main stream, head j stream j. `hidden[h]` (..., d) and `targets[h]` (...) hold head h's states
    and labels; the LM head (`logits`) runs only on the labelled rows, so no (tokens x γ x vocabulary) tensor is ever
    built. With α_0 = 1 and α_j = 0.1, heads that all reach cross-entropy c give c · (1 + 0.1 γ).
    Returns (total, the detached per-head cross-entropies (1 + γ,))."""
    parts = []
    for h, y in zip(hidden, targets):
        valid = y != IGNORE_INDEX
        rows = logits(h[valid]).float()
        parts.append(F.cross_entropy(rows, y[valid]) if valid.any() else rows.sum() * 0)
    ces = torch.stack(parts)
    return (ces * torch.tensor(weights, device=ces.device)).sum(), ces.detach()


def _flat(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """(B, T, V), (B, T) -> logits (N, V) in fp32, labels (N,), valid mask (N,), logsumexp (N,)."""
    logits = logits.float().flatten(0, 1)
    labels = labels.flatten()
    return logits, labels, labels != IGNORE_INDEX, torch.logsumexp(logits, dim=-1)


def _pick(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, index.clamp_min(0)[:, None]).squeeze(1)


def _mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum() / valid.sum().clamp_min(1)


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
    rank = 0
    all_image, all_text = image, text
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
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
