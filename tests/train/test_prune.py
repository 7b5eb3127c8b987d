"""Structured pruning (AFM's pruning-based init): the pruned model computes what the masked larger model computes,
soft top-k keeps exactly k with gradients through its threshold, learned masks, and refused targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raytrain.checkpoint.hf import load_pretrained, save_pretrained
from raytrain.models.decoder import build_decoder
from raytrain.train.objectives import lm_loss
from raytrain.train.prune import (PruneConfig, check_target, hard_masks, learn_masks, magnitude_keep, masked,
                                  prune_state, soft_top_k)
from tests.conftest import preset


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return build_decoder(preset("afm_micro_teacher")).eval()


@pytest.mark.parametrize("heads", [False, True])
def test_the_pruned_model_computes_the_masked_larger_model(source, heads: bool, tmp_path) -> None:
    target = preset("afm_micro") if heads else dataclasses.replace(preset("afm_micro"), q_heads=6, kv_heads=2)
    generator = torch.Generator().manual_seed(1)
    ffn = [torch.randperm(672, generator=generator)[:168].sort().values for _ in range(2)]
    groups = [torch.tensor([1]), torch.tensor([0])] if heads else None
    out = save_pretrained(tmp_path / "pruned", target, prune_state(source, ffn, groups))
    pruned = load_pretrained(out).model  # an ordinary checkpoint of the target shape
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad(), masked(source, *hard_masks(source, ffn, groups)):
        expected = source(tokens)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(source(tokens), expected, atol=1e-3)  # the masks did remove something


def test_soft_top_k_keeps_exactly_k_and_passes_gradients_through_the_threshold() -> None:
    torch.manual_seed(0)
    scores = torch.randn(50, requires_grad=True)
    mask = soft_top_k(scores, 12, temperature=0.3)
    assert mask.sum().item() == pytest.approx(12.0, abs=1e-4)
    mask.sum().backward()  # the sum is fixed at k, so its gradient vanishes only if tau's dependence is right
    assert scores.grad.abs().max().item() < 1e-5
    scores.grad = None
    (soft_top_k(scores, 12, temperature=0.3) * torch.arange(50.0)).sum().backward()
    assert scores.grad.abs().max().item() > 1e-3
    cold = soft_top_k(scores.detach(), 12, temperature=1e-3)
    assert set(cold.round().nonzero().flatten().tolist()) == set(scores.detach().topk(12).indices.tolist())


def test_learned_masks_fit_the_data_better_than_magnitude(source) -> None:
    torch.manual_seed(0)
    target = dataclasses.replace(preset("afm_micro"), q_heads=6, kv_heads=2)
    tokens = torch.randint(0, 512, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])

    def loss_with(ffn: list[torch.Tensor]) -> float:
        with torch.no_grad(), masked(source, *hard_masks(source, ffn)):
            return lm_loss(source(batch[0]), batch[1], 0.0)[0].item()

    masks = learn_masks(source, target, iter([batch] * 12), PruneConfig(steps=12, lr=0.2, temperature=[0.5, 0.05]))
    learned, _ = masks.keep()
    baseline, _ = magnitude_keep(source, target, heads=False)
    assert [len(k) for k in learned] == [168, 168]
    assert loss_with(learned) < loss_with(baseline)


@pytest.mark.parametrize("change, heads, message", [
    (dict(ffn_dim=1000), False, "larger than the source"),
    (dict(d_model=32), False, "keeps d_model"),
    (dict(q_heads=3, kv_heads=1), False, "set heads=true"),
    (dict(q_heads=4, kv_heads=2), True, "whole KV groups"),
])
def test_targets_that_are_not_smaller_sources_are_refused(change: dict, heads: bool, message: str) -> None:
    target = dataclasses.replace(preset("afm_micro_teacher"), **{"ffn_dim": 168, **change})
    with pytest.raises(ValueError, match=message):
        check_target(preset("afm_micro_teacher"), target, heads)
