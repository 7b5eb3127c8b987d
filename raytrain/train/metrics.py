"""Evaluation metrics for the image tasks (plain PyTorch): multi-label mean average precision and the accuracy of
a linear probe on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes with at least one positive of the average precision of ranking the samples by score.
    scores, targets (N, C); chance level is about the mean positive rate of those classes."""
    order = scores.float().argsort(dim=0, descending=True)  # (N, C)
    hits = targets.float().gather(0, order)  # positives in ranked order
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, device=hits.device)[:, None]
    positives = hits.sum(0)
    valid = positives > 0
    ap = (precision * hits).sum(0)[valid] / positives[valid]
    return float(ap.mean()) if valid.any() else float("nan")


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, classes: int, steps: int = 300, weight_decay: float = 1e-4) -> float:
    """Top-1 accuracy on `test` of a softmax classifier fitted on standardised frozen `train` features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    head = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return float((head(test_x).argmax(-1) == test_y).float().mean())
