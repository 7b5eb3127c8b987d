"""Training losses: cross-entropy + z-loss (OpenELM spec 2.5 and 5.3), the AFM distillation target, CatLIP's BCE,
CLIP's InfoNCE (hand cases and the gathered form over 2 workers), EMA, Speculative Streaming's n-gram loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raytrain.train.objectives import IGNORE_INDEX, distill_loss, lm_loss, ngram_loss, ngram_targets


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


# ---- CatLIP and CLIP losses ------------------------------------------------------------------------------------

def test_bce_batch_mean_zero_logits_and_hand_case() -> None:
    import math

    from raytrain.train.objectives import multilabel_bce

    targets = torch.zeros(3, 24320)
    targets[0, 5] = 1
    assert multilabel_bce(torch.zeros(3, 24320), targets).item() == pytest.approx(16857.3394, rel=1e-6)  # fp32 sum
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: -log sigmoid(-x)
    by_hand = (sp(-2.0) + sp(-1.0) + sp(0.0) + sp(-3.0)) / 2  # summed over classes and batch, / batch size
    assert multilabel_bce(logits, t).item() == pytest.approx(by_hand, rel=1e-6)


def test_info_nce_hand_case() -> None:
    import math

    from raytrain.train.objectives import info_nce

    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # image->text logits (scale 2): row0 [2, 1.2], row1 [0, 1.6]; text->image: row0 [2, 0], row1 [1.2, 1.6]
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))  # noqa: E731
    i2t = (lse(2, 1.2) - 2 + lse(0, 1.6) - 1.6) / 2
    t2i = (lse(2, 0) - 2 + lse(1.2, 1.6) - 1.6) / 2
    assert info_nce(image, text, torch.tensor(2.0)).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def _gathered_worker(rank: int, port: int, image: torch.Tensor, text: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    from raytrain.train.objectives import info_nce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mine = slice(2 * rank, 2 * rank + 2)
    img, txt = image[mine].clone().requires_grad_(), text[mine].clone().requires_grad_()
    loss = info_nce(img, txt, torch.tensor(3.0))
    loss.backward()
    out[rank] = (loss.item(), img.grad, txt.grad)
    dist.destroy_process_group()


def test_gathered_info_nce_over_two_workers_equals_one_process() -> None:
    import socket

    import torch.multiprocessing as mp

    from raytrain.train.objectives import info_nce

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_gathered_worker, args=(port, image, text, out), nprocs=2, start_method="spawn")
    img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
    single = info_nce(img, txt, torch.tensor(3.0))
    single.backward()
    assert (out[0][0] + out[1][0]) / 2 == pytest.approx(single.item(), rel=1e-6)
    # each rank's feature gradients, averaged over ranks as data parallelism does, equal the one-process ones
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]) / 2, img.grad, atol=1e-6)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]) / 2, txt.grad, atol=1e-6)


def test_ema_follows_the_recipe_formula() -> None:
    from raytrain.train.ema import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, 0.0005)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert ema.state["weight"][0, 0].item() == pytest.approx(0.9995 * 1 + 0.0005 * 3)
    assert math.log(0.5) / math.log(1 - 0.0005) == pytest.approx(1386, abs=1)  # half-life in steps


def test_ema_averages_batchnorm_statistics_as_corenet_does() -> None:
    """corenet's EMA averages every state entry, BatchNorm running statistics included (integer counters by the
    same formula, truncated); copying them instead would pair averaged weights with the last step's statistics."""
    from raytrain.models.vit import ConvStem, ViTConfig
    from raytrain.train.ema import EMA

    torch.manual_seed(0)
    stem = ConvStem(ViTConfig(name="s", d_model=64, n_heads=2))
    m = 0.1
    ema = EMA(stem, m)
    before = {k: v.clone() for k, v in ema.state.items()}
    stem.train()
    for _ in range(3):
        stem(torch.rand(4, 3, 32, 32) * 3)  # moves running_mean / running_var / num_batches_tracked
    with torch.no_grad():
        stem.conv1.weight.add_(1.0)
    ema.update(stem)
    now = dict(stem.state_dict())
    for name in ("norm1.running_mean", "norm1.running_var", "norm2.running_var", "conv1.weight", "norm1.weight"):
        torch.testing.assert_close(ema.state[name], (1 - m) * before[name] + m * now[name].float(), rtol=1e-6,
                                   atol=1e-6, msg=name)
    assert not torch.equal(ema.state["norm1.running_mean"], now["norm1.running_mean"])  # averaged, not copied
    assert now["norm1.num_batches_tracked"].item() == 3
    assert ema.state["norm1.num_batches_tracked"].item() == int((1 - m) * 0 + m * 3)  # 0.3 truncated, as corenet


def test_ngram_targets_shift_the_labels_by_each_stream() -> None:
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX]])
    assert ngram_targets(labels, 2)[0].tolist() == [[5, 6, 7], [6, 7, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX],
                                                    [IGNORE_INDEX] * 3]


@pytest.mark.parametrize("gamma", [1, 4])
def test_ngram_loss_is_c_times_one_plus_a_tenth_gamma_when_every_head_has_cross_entropy_c(gamma: int) -> None:
    """Spec section 5: alpha_0 = 1, alpha_j = 0.1, every head at the same CE c -> L = c (1 + 0.1 gamma) per position;
    the LM head runs on labelled rows only."""
    vocab, labels = 11, torch.tensor([[3, 1, IGNORE_INDEX, 4, 9, 2]])
    hidden = [torch.zeros(1, 6, vocab) for _ in range(gamma + 1)]  # uniform logits: CE = log(vocab) everywhere
    targets = ngram_targets(labels, gamma).unbind(-1)
    seen = []
    loss, parts = ngram_loss(hidden, list(targets), lambda h: seen.append(h.shape[0]) or h, [1.0] + [0.1] * gamma)
    c = math.log(vocab)
    assert loss.item() == pytest.approx(c * (1 + 0.1 * gamma), rel=1e-6)
    assert parts.tolist() == pytest.approx([c] * (gamma + 1), rel=1e-6)
    assert seen == [int((t != IGNORE_INDEX).sum()) for t in targets]
