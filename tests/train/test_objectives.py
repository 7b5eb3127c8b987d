"""Cross-entropy + z-loss (OpenELM spec 2.5 and 5.3) and the AFM distillation target."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raytrain.train.objectives import IGNORE_INDEX, distill_loss, lm_loss


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


# ---- distillation (spec 2.3) -----------------------------------------------------------------------------------

def test_a_teacher_equal_to_the_student_gives_the_mix_of_its_top1_and_the_label() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 13)
    labels = torch.randint(0, 13, (2, 6))
    labels[0, 4:] = IGNORE_INDEX
    total, ce, z, distill = distill_loss(logits, labels, logits, z_loss=0.0)
    keep = labels != IGNORE_INDEX
    own_top1 = F.cross_entropy(logits[keep], logits[keep].argmax(-1))
    assert distill.item() == pytest.approx(own_top1.item(), rel=1e-6)
    assert total.item() == pytest.approx(0.9 * own_top1.item() + 0.1 * ce.item(), rel=1e-6)
    target = 0.9 * F.one_hot(logits[keep].argmax(-1), 13) + 0.1 * F.one_hot(labels[keep], 13)  # the spec's y
    soft_ce = -(target * F.log_softmax(logits[keep], -1)).sum(-1).mean()
    assert total.item() == pytest.approx(soft_ce.item(), rel=1e-6)
    agree, *_ = distill_loss(logits, logits.argmax(-1), logits, z_loss=0.0)  # label = teacher top-1: plain CE
    assert agree.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), logits.argmax(-1).flatten()).item(),
                                         rel=1e-6)


def test_full_distribution_kl_of_a_teacher_equal_to_the_student_is_zero_with_zero_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    total, ce, z, kl = distill_loss(logits, labels, logits.detach(), z_loss=1e-2, target="kl")
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(0.1 * ce.item() + z.item(), rel=1e-6)
    teacher_only, *_ = distill_loss(logits, labels, logits.detach(), z_loss=0.0, teacher_weight=1.0, target="kl")
    teacher_only.backward()
    assert logits.grad.abs().max().item() < 1e-7  # at the teacher's distribution the KL term is stationary


def test_kl_to_another_teacher_matches_torch_kl_div() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    labels = torch.randint(0, 7, (1, 4))
    _, _, _, kl = distill_loss(student, labels, teacher, z_loss=0.0, target="kl")
    expected = F.kl_div(F.log_softmax(student[0], -1), F.log_softmax(teacher[0], -1), log_target=True,
                        reduction="batchmean")
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
