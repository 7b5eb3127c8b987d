"""AFM's adastar optimizer (spec 2.2 and 5.2): golden values, a by-hand reference, skipping, decoupled decay, the
axlearn schedule, and the same updates on ZeRO-style flat partitions spread over two processes."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from raytrain.train.config import OptimConfig, ScheduleConfig
from raytrain.train.engine import check_coverage, contiguous_layout, partitioned_layout
from raytrain.train.optim import AdaStar, build_optimizer, build_scheduler, cosine_lr, param_groups

AFM_SCHEDULE = ScheduleConfig(warmup_steps=5000, init_lr=0.0, min_lr_ratio=0.005, convention="axlearn")


def scalar_run(grads: list[float], **kwargs) -> tuple[torch.nn.Parameter, AdaStar]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdaStar([p], **{"lr": 0.01, "weight_decay": 0.0, **kwargs})
    for g in grads:
        p.grad = torch.tensor([g])
        opt.step()
    return p, opt


@pytest.mark.parametrize("t, momentum", [(1, 0.05), (10, 0.401263), (100, 0.994079)])
def test_constant_gradient_gives_unit_updates_and_undebiased_momentum(t: int, momentum: float) -> None:
    _, opt = scalar_run([0.5] * t)
    state = next(iter(opt.state.values()))
    assert state["m"].item() == pytest.approx(1 - 0.95 ** t, abs=1e-6)  # fp32 state
    assert state["m"].item() == pytest.approx(momentum, abs=1e-6)


def test_raw_update_above_rms_one_is_clipped_to_exactly_one() -> None:
    _, unclipped = scalar_run([0.0, 1.0], update_clip=0.0)
    _, clipped = scalar_run([0.0, 1.0])
    # v_2 = 0.05, v_hat = 0.05 / (1 - 0.95^2), u = 1 / sqrt(v_hat) = 1.396424; m_2 = 0.05 u
    assert next(iter(unclipped.state.values()))["m"].item() == pytest.approx(0.05 * 1.396424, rel=1e-6)
    assert next(iter(clipped.state.values()))["m"].item() == pytest.approx(0.05 * 1.0, rel=1e-7)


def test_first_update_uses_s1_of_the_axlearn_schedule() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdaStar([p], lr=0.01, weight_decay=0.0)
    build_scheduler(opt, 0.01, AFM_SCHEDULE, 750_000)
    p.grad = torch.tensor([0.3])
    opt.step()
    assert abs(p.item()) == pytest.approx(1e-7, rel=1e-6)  # s(1) * 0.01 * 0.05, s(1) = 1 / 5000


@pytest.mark.parametrize("grad", [100.0, 250.0, float("nan")])
def test_a_step_whose_gradient_norm_is_not_below_100_changes_nothing(grad: float) -> None:
    p, opt = scalar_run([0.5, 0.5], weight_decay=0.1)
    before_p, before = p.detach().clone(), {k: v if isinstance(v, int) else v.clone()
                                             for k, v in next(iter(opt.state.values())).items()}
    p.grad = torch.tensor([grad])
    opt.step()
    assert torch.equal(p.detach(), before_p)
    state = next(iter(opt.state.values()))
    assert state["step"] == before["step"] == 2
    assert torch.equal(state["m"], before["m"]) and torch.equal(state["v"], before["v"])
    assert opt.skips(grad) and not opt.skips(99.9)


def test_a_skipped_step_does_not_advance_the_lr_schedule() -> None:
    """DeepSpeed steps the scheduler after every optimizer step it did not skip itself; axlearn's schedule counts
    applied updates only. Steps 1 and 3 apply, step 2 is skipped: step 3 runs at s(2), not s(3)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdaStar([p], lr=0.01, weight_decay=0.0)
    schedule = build_scheduler(opt, 0.01, AFM_SCHEDULE, 750_000, opt.last_step_skipped)
    lrs = []
    for grad in (0.3, 500.0, 0.3):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.tensor([grad])
        opt.step()
        schedule.step()  # what DeepSpeed does after the optimizer step
    assert lrs == pytest.approx([0.01 / 5000, 0.01 * 2 / 5000, 0.01 * 2 / 5000], rel=1e-9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 3 / 5000, rel=1e-9)
    assert "skipped" not in schedule.state_dict()  # checkpoints hold no reference to the optimizer


def test_weight_decay_follows_the_schedule_not_the_peak_lr() -> None:
    """At s = 1 decay alone scales p by (1 - 3.16e-4), whatever the peak LR; at s = 0.5 by (1 - 1.58e-4)."""
    for peak in (0.01, 1e-4):
        p = torch.nn.Parameter(torch.full((3,), 2.0))
        opt = AdaStar([p], lr=peak, weight_decay=3.16e-4)
        p.grad = torch.zeros(3)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 3.16e-4)), rtol=0, atol=1e-7)
        opt.param_groups[0]["lr"] = peak / 2
        opt.step()
        torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 * (1 - 3.16e-4) * (1 - 1.58e-4)), rtol=0,
                                   atol=1e-7)


class ReferenceAdaStar:
    """The spec's pseudo-code (section 2.2) on whole tensors in float64, written out independently of `AdaStar`:
    global-norm clip to 1, v with eps inside, bias-corrected v only, per-tensor RMS clip, undebiased momentum,
    decay decoupled from the peak LR (both scaled by the schedule's multiplier s)."""

    def __init__(self, params: list[torch.Tensor], lr: float, wd: float, scales: list[float], clip: float,
                 grad_clip: float | None = 1.0, b1: float = 0.95, b2: float = 0.95) -> None:
        self.params = [p.detach().double().clone() for p in params]
        self.v, self.m = [torch.zeros_like(p) for p in self.params], [torch.zeros_like(p) for p in self.params]
        self.lr, self.wd, self.scales, self.clip, self.grad_clip = lr, wd, scales, clip, grad_clip
        self.b1, self.b2, self.t = b1, b2, 0

    def step(self, grads: list[torch.Tensor], s: float = 1.0) -> None:
        self.t += 1
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        factor = min(1.0, self.grad_clip / norm) if self.grad_clip else 1.0
        for i, g in enumerate(grads):
            g = g.double() * factor
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * (g * g + 1e-30)
            u = g / (self.v[i] / (1 - self.b2 ** self.t)).sqrt()
            u = u / max(1.0, math.sqrt(float(u.square().mean())) / self.clip)
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * u  # no bias correction
            self.params[i] = self.params[i] - s * (self.lr * self.scales[i] * self.m[i] + self.wd * self.params[i])


def reference_adastar(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, wd: float,
                      scales: list[float], clip: float) -> list[torch.Tensor]:
    reference = ReferenceAdaStar(params, lr, wd, scales, clip)
    for step_grads in grads:
        reference.step(step_grads)
    return reference.params


def test_update_matches_the_spec_computed_by_hand() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(2, 3), torch.randn(3)
    grads = [[torch.randn(2, 3) * 0.8, torch.randn(3) * 0.8] for _ in range(4)]
    grads[1][0][0, 0] = 5.0  # a global-norm clip and a per-tensor clip on the second step
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = AdaStar([{"params": [pw], "update_scale": 0.25}, {"params": [pb]}], lr=0.01, weight_decay=3.16e-4,
                  update_clip=0.5)
    for step_grads in grads:
        pw.grad, pb.grad = step_grads
        opt.step()
    ew, eb = reference_adastar([w, b], grads, lr=0.01, wd=3.16e-4, scales=[0.25, 1.0], clip=0.5)
    torch.testing.assert_close(pw.detach().double(), ew, rtol=0, atol=1e-6)  # fp32 vs float64
    torch.testing.assert_close(pb.detach().double(), eb, rtol=0, atol=1e-6)


def per_tensor_reference(groups: list[tuple[list[torch.Tensor], float, float]], grads: list[list[list[torch.Tensor]]],
                         lr: float, update_clip: float, b1: float = 0.95, b2: float = 0.95,
                         eps: float = 1e-8) -> list[list[torch.Tensor]]:
    """The spec's step one tensor at a time, in float64: `groups` of (tensors, update_scale, weight_decay),
    `grads[step][group][tensor]`, a constant LR (so the decay is wd itself), global-norm clip to 1."""
    ps = [[p.double().clone() for p in tensors] for tensors, _, _ in groups]
    vs, ms = [[torch.zeros_like(p) for p in g] for g in ps], [[torch.zeros_like(p) for p in g] for g in ps]
    for t, step in enumerate(grads, start=1):
        clip = min(1.0, 1.0 / math.sqrt(sum(float(g.double().square().sum()) for gs in step for g in gs)))
        for k, (_, scale, wd) in enumerate(groups):
            for i, g in enumerate(step[k]):
                g = g.double() * clip
                vs[k][i] = b2 * vs[k][i] + (1 - b2) * (g * g + eps)
                u = g / (vs[k][i] / (1 - b2 ** t)).sqrt()
                u = u / max(1.0, float(u.square().mean().sqrt()) / update_clip)
                ms[k][i] = b1 * ms[k][i] + (1 - b1) * u
                ps[k][i] = ps[k][i] - lr * scale * ms[k][i] - wd * ps[k][i]
    return ps


def test_the_foreach_step_equals_the_per_tensor_reference(micro_model) -> None:
    """A decoder's 3 groups (block matrices x 0.25, embedding, norm gains), 3 steps with the global clip and every
    tensor's update clip active."""
    cfg = OptimConfig(name="adastar", lr=0.01, betas=[0.95, 0.95], weight_decay=3.16e-4, decay_norms=True,
                      mup_base_dim=16, update_clip=0.5)
    opt = build_optimizer(micro_model, cfg)
    groups = [([p.detach().clone() for p in g["params"]], g["update_scale"], g["weight_decay"])
              for g in opt.param_groups]
    gen = torch.Generator().manual_seed(0)
    grads = [[[torch.randn(p.shape, generator=gen) for p in g["params"]] for g in opt.param_groups]
             for _ in range(3)]
    for step in grads:
        for g, step_grads in zip(opt.param_groups, step):
            for p, grad in zip(g["params"], step_grads):
                p.grad = grad
        opt.step()
    expected = per_tensor_reference(groups, grads, lr=0.01, update_clip=0.5, eps=cfg.eps)
    for g, tensors in zip(opt.param_groups, expected):
        for p, e in zip(g["params"], tensors):
            torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=1e-6)


def test_adastar_groups_scale_block_matrices_and_decay_everything(micro_cfg) -> None:
    from raytrain.models.decoder import build_decoder

    model = build_decoder(micro_cfg)
    cfg = OptimConfig(name="adastar", lr=0.01, weight_decay=3.16e-4, decay_norms=True, mup_base_dim=16)
    groups = {g["kind"]: g for g in param_groups(model, cfg)}
    assert groups["blocks"]["update_scale"] == 0.25 and groups["embedding"]["update_scale"] == 1.0
    assert {g["weight_decay"] for g in groups.values()} == {3.16e-4}
    assert [id(p) for p in groups["embedding"]["params"]] == [id(model.embed.weight)]
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, AdaStar) and opt.skip_grad_norm is None


@pytest.mark.parametrize("step, s", [(0, 0.0), (2500, 0.5), (5000, 1.0), (377_500, 0.5025), (750_000, 0.005)])
def test_axlearn_schedule_values(step: int, s: float) -> None:
    assert cosine_lr(step, 1.0, AFM_SCHEDULE, 750_000) == pytest.approx(s, abs=1e-12)
    assert cosine_lr(750_000, 0.01, AFM_SCHEDULE, 750_000) == pytest.approx(5e-5, rel=1e-9)


# ---- flat partitions spread over two ranks ---------------------------------------------------------------------

SHAPES = [(3, 5), (7,), (3, 3)]
NUMELS = [15, 7, 9]


def _tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _flatten_at(tensors: list[torch.Tensor], offsets: list[int], total: int) -> torch.Tensor:
    flat = torch.zeros(total)
    for t, o in zip(tensors, offsets):
        flat[o:o + t.numel()] = t.reshape(-1)
    return flat


def _zero2(rank: int) -> tuple[Any, Any]:
    """End to end with alignment gaps, 34 elements cut into 2 x 17: tensor 1 straddles the two ranks."""
    offsets, size = [0, 16, 24], 17
    return (lambda ts: _flatten_at(ts, offsets, 2 * size)[rank * size:(rank + 1) * size],
            contiguous_layout(offsets, NUMELS, size, rank, world=2))


def _zero3(rank: int) -> tuple[Any, Any]:
    """Every tensor cut into 2 padded halves; this rank's halves concatenated."""
    parts = [math.ceil(n / 2) for n in NUMELS]
    return (lambda ts: torch.cat([F.pad(t.reshape(-1), (0, 2 * p - t.numel()))[rank * p:(rank + 1) * p]
                                  for t, p in zip(ts, parts)]),
            partitioned_layout(NUMELS, parts, rank, world=2))


@pytest.fixture
def two_ranks(monkeypatch):
    """Run a function as 2 ranks in 2 threads whose `torch.distributed.all_reduce` sums across the threads."""
    slots, barrier, local = [None, None], threading.Barrier(2), threading.local()

    def all_reduce(tensor: torch.Tensor, group: Any = None) -> None:
        slots[local.rank] = tensor.clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        tensor.copy_(total)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)

    def run(fn: Any) -> list[Any]:
        results: list[Any] = [None, None]

        def target(rank: int) -> None:
            local.rank = rank
            results[rank] = fn(rank)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results

    return run


def _whole_tensor_steps(update_clip: float) -> list[torch.Tensor]:
    whole = [torch.nn.Parameter(t) for t in _tensors(0)]
    opt = AdaStar(whole, lr=0.01, weight_decay=0.1, update_clip=update_clip, grad_clip=0.0)
    for seed in (1, 2, 3):
        for p, g in zip(whole, _tensors(seed)):
            p.grad = g
        opt.step()
    return [p.detach() for p in whole]


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_flat_partitions_over_two_ranks_step_like_whole_tensors(kind: str, two_ranks) -> None:
    def rank_steps(rank: int) -> torch.Tensor:
        flat_of, layout = (_zero2 if kind == "zero2" else _zero3)(rank)
        flat = torch.nn.Parameter(flat_of(_tensors(0)))
        check_coverage({flat: layout})
        opt = AdaStar([flat], lr=0.01, weight_decay=0.1, update_clip=0.3)
        opt.attach(lambda: 1.0, {flat: layout})
        for seed in (1, 2, 3):
            flat.grad = flat_of(_tensors(seed))
            opt.step()
        return flat.detach()

    parts = two_ranks(rank_steps)
    whole, unclipped = (_whole_tensor_steps(clip) for clip in (0.3, 0.0))
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(whole, unclipped))  # the clip is active in every tensor
    reference = ReferenceAdaStar(_tensors(0), lr=0.01, wd=0.1, scales=[1.0] * 3, clip=0.3, grad_clip=None)
    for seed in (1, 2, 3):
        reference.step(_tensors(seed))
    for p, r in zip(whole, reference.params):  # the whole-tensor optimizer against the independent float64 one
        torch.testing.assert_close(p.double(), r, rtol=0, atol=1e-6)
    if kind == "zero2":
        got = torch.cat(parts)
        pieces = [got[o:o + n] for o, n in zip([0, 16, 24], NUMELS)]
    else:
        halves = [torch.split(part, [math.ceil(n / 2) for n in NUMELS]) for part in parts]
        pieces = [torch.cat([halves[0][k], halves[1][k]])[:n] for k, n in enumerate(NUMELS)]
    for p, piece in zip(whole, pieces):
        torch.testing.assert_close(piece, p.detach().reshape(-1), rtol=0, atol=1e-6)


def test_a_rank_holding_only_padding_takes_part_in_the_clip(two_ranks) -> None:
    """A small group cut over many ranks can leave a rank nothing but alignment padding: it still joins the
    all-reduce of the per-tensor sums (or the other ranks would wait for it) and changes nothing."""
    start, grads = _tensors(0)[1], [_tensors(seed)[1] for seed in (1, 2)]  # a 7-element tensor

    def rank_steps(rank: int) -> torch.Tensor:
        flat = torch.nn.Parameter(F.pad(start, (0, 1)) if rank == 0 else torch.zeros(8))
        opt = AdaStar([flat], lr=0.01, weight_decay=0.1, update_clip=0.3)
        opt.attach(lambda: 1.0, {flat: contiguous_layout([0], [7], 8, rank, world=2)})  # rank 1: [8, 16)
        for g in grads:
            flat.grad = F.pad(g, (0, 1)) if rank == 0 else torch.zeros(8)
            opt.step()
        return flat.detach()

    held, padding = two_ranks(rank_steps)
    whole = torch.nn.Parameter(start.clone())
    opt = AdaStar([whole], lr=0.01, weight_decay=0.1, update_clip=0.3, grad_clip=0.0)  # as attached: no global clip
    for g in grads:
        whole.grad = g
        opt.step()
    torch.testing.assert_close(held[:7], whole.detach(), rtol=0, atol=1e-7)
    assert torch.equal(padding, torch.zeros(8))


def test_a_layout_that_misses_elements_is_refused(two_ranks) -> None:
    def rank_check(rank: int) -> str:
        _, layout = _zero2(rank)
        layout.segments = layout.segments[:-1]  # a DeepSpeed layout we misread
        try:
            check_coverage({torch.zeros(17): layout})
        except RuntimeError as e:
            return str(e)
        return ""

    assert all("do not tile the parameters" in message for message in two_ranks(rank_check))
