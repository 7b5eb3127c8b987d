"""corenet's warmup + cosine schedule (spec 5.4 values) and OpenELM's weight-decay groups."""

from __future__ import annotations

import pytest

from raytrain.models.decoder import build_decoder
from raytrain.train.config import OptimConfig, ScheduleConfig
from raytrain.train.optim import build_optimizer, build_scheduler, cosine_lr, param_groups

REFERENCE = ScheduleConfig(warmup_steps=5000, init_lr=1e-6, min_lr_ratio=0.1)


@pytest.mark.parametrize("step, lr", [(0, 1e-6), (1, 2.0598e-6), (2500, 2.6505e-3), (5000, 5.3e-3),
                                      (177_500, 2.91501086e-3), (350_000, 5.300000001e-4)])
def test_openelm_270m_schedule_values(step: int, lr: float) -> None:
    assert cosine_lr(step, 5.3e-3, REFERENCE, 350_000) == pytest.approx(lr, rel=1e-6)


def test_scheduler_drives_the_optimizer_lr(micro_model) -> None:
    opt = build_optimizer(micro_model, OptimConfig(lr=1e-2))
    sched = build_scheduler(opt, 1e-2, ScheduleConfig(warmup_steps=10, init_lr=0.0), total_steps=100)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-3) and lrs[10] == pytest.approx(1e-2)


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_norm_gains_never_decay(micro_cfg, decay_embeddings: bool) -> None:
    model = build_decoder(micro_cfg)
    groups = {g["kind"]: g for g in param_groups(model, OptimConfig(decay_embeddings=decay_embeddings))}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in groups["vectors"]["params"])
    assert [id(p) for p in groups["embedding"]["params"]] == [id(model.embed.weight)]
    assert groups["vectors"]["weight_decay"] == 0.0 and groups["blocks"]["weight_decay"] == 0.1
    assert groups["embedding"]["weight_decay"] == (0.1 if decay_embeddings else 0.0)
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # the tied head is counted once


def test_unknown_optimizer_is_named(micro_model) -> None:
    from raytrain.config import ConfigError

    with pytest.raises(ConfigError, match="optim.name='sgdx'"):
        build_optimizer(micro_model, OptimConfig(name="sgdx"))
