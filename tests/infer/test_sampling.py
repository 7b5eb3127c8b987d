"""Sampling filters and parameters; the KV cache against full recomputation."""

from __future__ import annotations

import pytest
import torch

from raytrain.config import RaytrainError
from raytrain.infer.sampling import SamplingParams, filter_logits, next_token, penalize_repetition
from raytrain.models.kv_cache import KVCache


def test_cache_logits_match_full_forward_for_every_step(micro_model) -> None:
    tokens = torch.randint(0, 97, (2, 16))
    cache = KVCache(len(micro_model.layers), 16)
    with torch.no_grad():
        full = micro_model(tokens)
        chunks = [micro_model(tokens[:, :5], cache=cache), micro_model(tokens[:, 5:9], cache=cache)]
        chunks += [micro_model(tokens[:, i:i + 1], cache=cache) for i in range(9, 16)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [16, 16] and cache.seen == 16


def test_left_padded_rows_match_their_unpadded_logits(micro_model) -> None:
    short, long = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    cache = KVCache(len(micro_model.layers), 12, pad=torch.tensor([4, 0]))
    with torch.no_grad():
        both = micro_model(torch.cat([padded, long]), cache=cache)
        step = micro_model(torch.tensor([[3], [4]]), cache=cache)
        torch.testing.assert_close(both[0, 4:], micro_model(short)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[1], micro_model(long)[0], rtol=1e-5, atol=1e-5)
        alone = micro_model(torch.cat([short, torch.tensor([[3]])], dim=1))[0, -1]
        torch.testing.assert_close(step[0, 0], alone, rtol=1e-5, atol=1e-5)


def test_cache_refuses_to_overflow(micro_model) -> None:
    cache = KVCache(len(micro_model.layers), 4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        micro_model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, True, False, False]]
    # nucleus: 0.5 + 0.25 reaches 0.7, so the third token is outside
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.8)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.1)).tolist() == [[True, False, False, False]]


def test_sampling_is_seeded_and_respects_top_k() -> None:
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0, top_k=3)
    draws = {next_token(logits, params, torch.Generator().manual_seed(i)) for i in range(200)}
    assert draws <= set(torch.topk(logits, 3).indices.tolist()) and len(draws) > 1
    again = [next_token(logits, params, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert len(set(again)) == 1


def test_repetition_penalty_follows_the_ctrl_rule() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = penalize_repetition(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert next_token(logits, SamplingParams(temperature=0, repetition_penalty=4.0), None, torch.tensor([0])) == 2


@pytest.mark.parametrize("kwargs, field", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                           ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop"),
                                           ({"repetition_penalty": 0}, "repetition_penalty")])
def test_invalid_sampling_parameters_are_named(kwargs, field) -> None:
    with pytest.raises(RaytrainError, match=field):
        SamplingParams(**kwargs)
