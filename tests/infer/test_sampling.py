"""Batched sampling: filters, the repetition penalty, seeded draws that follow the distribution, parameter
validation; the KV cache against full recomputation."""

from __future__ import annotations

import pytest
import torch

from raytrain.config import RaytrainError
from raytrain.infer.sampling import SamplingParams, exponential_noise, filter_logits, penalize_repetition, select_tokens
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


def kept(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> list[list[bool]]:
    return torch.isfinite(filter_logits(logits, torch.tensor(top_k), torch.tensor(top_p))).tolist()


def test_top_k_and_top_p_keep_the_right_tokens_per_row() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]])).expand(5, 4)
    # nucleus: 0.5 + 0.25 reaches 0.7, so the third token is outside; top-p applies to the top-k distribution
    assert kept(logits, [2, 0, 0, 0, 3], [1.0, 0.7, 0.8, 0.1, 0.6]) == [
        [True, True, False, False], [True, True, False, False], [True, True, True, False],
        [True, False, False, False], [True, True, False, False]]
    assert kept(logits[:1], [0], [1.0]) == [[True] * 4]


def reference_allowed(row: torch.Tensor, k: int, p: float) -> set[int]:
    """The allowed set by the definitions, one row at a time: top-k by value, then the smallest nucleus of the
    tempered distribution (temperature applies first, as in vLLM and transformers)."""
    order = row.argsort(descending=True).tolist()
    order = order[:k] if k else order
    probs = torch.softmax(row[order], 0).tolist()
    allowed, mass = set(), 0.0
    for token, prob in zip(order, probs):
        if mass >= p and allowed and p < 1:
            break
        allowed.add(token)
        mass += prob
    return allowed


def test_sampled_tokens_never_leave_the_allowed_set() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        B, V = 6, 50
        logits = torch.randn(B, V, generator=gen) * 3
        top_k = torch.randint(0, 8, (B,), generator=gen)
        top_p = torch.rand(B, generator=gen) * 0.9 + 0.1
        seed = torch.randint(0, 2 ** 32, (B, 2), generator=gen)
        tokens = select_tokens(logits, torch.full((B,), 1.5), top_k, top_p, torch.ones(B), seed,
                               torch.full((B,), trial), None)
        for b in range(B):
            assert tokens[b].item() in reference_allowed(logits[b] / 1.5, int(top_k[b]), float(top_p[b]))


def test_seeded_draws_follow_the_distribution_and_repeat_per_seed() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 4000
    logits = probs.log().expand(n, 4)
    seed = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], 1)
    draws = select_tokens(logits, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n), torch.ones(n),
                          seed, torch.zeros(n, dtype=torch.long), None)
    freq = torch.bincount(draws, minlength=4).float() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 4 * sigma).all(), freq
    again = select_tokens(logits, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n), torch.ones(n),
                          seed, torch.zeros(n, dtype=torch.long), None)
    assert torch.equal(draws, again)
    noise = exponential_noise(seed[:2], torch.tensor([0, 1]), 1000)
    assert abs(noise.mean().item() - 1.0) < 0.1 and not torch.equal(noise[0], noise[1])


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    logits = torch.randn(3, 20)
    tokens = select_tokens(logits, torch.tensor([0.0, 1.0, 0.0]), torch.zeros(3, dtype=torch.long), torch.ones(3),
                           torch.ones(3), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), None)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_repetition_penalty_follows_the_ctrl_rule() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False], [True, False, False, False]])
    out = penalize_repetition(logits, seen, torch.tensor([2.0, 4.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5], [0.5, -2.0, 1.0, 0.5]]
    greedy = select_tokens(logits, torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.ones(2),
                           torch.tensor([1.0, 4.0]), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                           seen, sampled=False)
    assert greedy.tolist() == [0, 2]


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"seed": 2 ** 64}, "seed"), ({"seed": -2 ** 63 - 1}, "seed"), ({"seed": True}, "seed")])
def test_invalid_sampling_parameters_are_named(kwargs, field) -> None:
    with pytest.raises(RaytrainError, match=field):
        SamplingParams(**kwargs)


def test_tiny_temperatures_are_greedy_and_extreme_seeds_are_accepted() -> None:
    assert SamplingParams(temperature=1e-300).greedy and not SamplingParams(temperature=1e-3).greedy
    SamplingParams(seed=2 ** 64 - 1), SamplingParams(seed=-2 ** 63)
