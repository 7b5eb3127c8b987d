"""Training losses (plain PyTorch): next-token cross-entropy with z-loss, and AFM's distillation target.

Every loss is computed in fp32 over the positions whose label is not IGNORE_INDEX, and returns the total to
backpropagate with its detached parts for logging (their names: `METRICS`).
"""

from __future__ import annotations

import torch
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
