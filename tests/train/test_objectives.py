"""Cross-entropy + z-loss (spec 2.5 and 5.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raytrain.train.objectives import IGNORE_INDEX, lm_loss


def test_zero_logits_give_the_spec_values() -> None:
    logits = torch.zeros(2, 3, 32128)
    labels = torch.randint(0, 32128, (2, 3))
    total, ce, z = lm_loss(logits, labels, 1e-4)
    assert ce.item() == pytest.approx(10.377483, abs=1e-5)
    assert z.item() == pytest.approx(0.010769216, rel=1e-5)
    assert total.item() == pytest.approx(math.log(32128) + 1e-4 * math.log(32128) ** 2, rel=1e-6)


def test_ignored_positions_count_in_neither_term() -> None:
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 2:] = IGNORE_INDEX
    total, ce, z = lm_loss(logits, labels, 1e-2)
    keep = labels != IGNORE_INDEX
    assert ce.item() == pytest.approx(F.cross_entropy(logits[keep], labels[keep]).item(), rel=1e-6)
    assert z.item() == pytest.approx(1e-2 * torch.logsumexp(logits[keep], -1).square().mean().item(), rel=1e-6)
    total.backward()
    assert torch.all(logits.grad[1, 2:] == 0)
