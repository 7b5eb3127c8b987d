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


def windows(docs: list[str], tokenizer, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random 17-token windows of the documents' token stream: (inputs, labels) of 16 tokens each."""
    stream = torch.tensor([t for d in docs for t in tokenizer.encode(d)])
    starts = torch.randint(0, stream.numel() - 17, (n,), generator=generator)
    rows = torch.stack([stream[s:s + 17] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def test_learned_masks_generalise_to_held_out_text_better_than_magnitude(source, tokenizer) -> None:
    """Masks learned on one set of documents lower the loss on other documents (never seen by the mask training)
    below the magnitude baseline's: they fit the text, not the batches they were trained on."""
    from raytrain.data.corpus import documents

    torch.manual_seed(0)
    docs = documents()[:20]
    g = torch.Generator().manual_seed(0)
    train = [windows(docs[:10], tokenizer, 4, g) for _ in range(16)]
    held_out = windows(docs[10:], tokenizer, 32, g)
    target = dataclasses.replace(preset("afm_micro"), q_heads=6, kv_heads=2)

    def held_out_loss(ffn: list[torch.Tensor]) -> float:
        with torch.no_grad(), masked(source, *hard_masks(source, ffn)):
            return lm_loss(source(held_out[0]), held_out[1], 0.0)[0].item()

    masks = learn_masks(source, target, iter(train), PruneConfig(steps=16, lr=0.2, temperature=[0.5, 0.05]))
    learned, _ = masks.keep()
    baseline, _ = magnitude_keep(source, target, heads=False)
    assert [len(k) for k in learned] == [168, 168]
    assert held_out_loss(learned) < held_out_loss(baseline) - 0.02  # 6.63 vs 6.69 (the same-seed run)


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
