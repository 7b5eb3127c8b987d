"""A document store sharded over processes (`path_shards.py`), here with every shard in this process: the fork scored
on shards and joined by the engine equals the fork computed in one process (scores, kept paths, context, first logits,
greedy tokens), for each shard count and the superposition factor; only the kept paths' KV leaves a shard; shards
cache their documents; and settings that cannot be sharded are refused naming the key."""

from __future__ import annotations

import pytest
import torch

from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.forkjoin import ForkJoinPrompt
from raytrain.infer.path_shards import PENDING, PathShard, ShardScores, join_kept, prune, shard_ranges
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.superposition import Superposer, SuperpositionConfig

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
ATOL = 1e-5


def random_prompt(lengths: list[int], seed: int) -> ForkJoinPrompt:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(4, 512, (n,), generator=g).tolist()

    return ForkJoinPrompt(ids(5), [ids(n) for n in lengths], ids(4), ids(3))


def shards_of(model, config: SuperpositionConfig, prompt: ForkJoinPrompt, count: int) -> list[PathShard]:
    paths = Superposer(model, config).paths(prompt)
    return [PathShard(model, config, paths, owned) for owned in shard_ranges(len(paths), count)]


def sharded(engine: Engine, shards: list[PathShard], prompt: ForkJoinPrompt, request: str = "r") -> ForkJoinPrompt:
    """The coordinator's steps, as `serving/model.py` runs them against Ray actors."""
    scores = [s.score(request, prompt.preamble, prompt.query) for s in shards]
    kept = prune(scores, engine.superposer.keep(prompt))
    taken = [s.take(request, k) for s, k in zip(shards, kept)]
    return ForkJoinPrompt(prompt.preamble, prompt.documents, prompt.query, prompt.postamble, top_k=prompt.top_k,
                          kept_paths=join_kept(engine.superposer, prompt, scores, kept, taken))


def test_shard_ranges_are_contiguous_and_balanced() -> None:
    assert shard_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert shard_ranges(2, 4) == [range(0, 1), range(1, 2)]
    assert shard_ranges(6, 1) == [range(0, 6)]


@pytest.mark.parametrize("count, top_k, factor, attenuation", [(1, 2, None, None), (2, 2, None, None),
                                                               (3, 1, None, None), (3, 0, None, None),
                                                               (2, 1, 3, None), (3, 2, None, 1.0)])
def test_a_sharded_fork_answers_as_one_process(lm, tokenizer, count, top_k, factor, attenuation) -> None:
    config = SuperpositionConfig(enabled=True, top_k=top_k, factor=factor, attenuation=attenuation)
    prompt = random_prompt([3, 7, 4, 6, 5, 2], seed=20 + count)
    engine = Engine(lm, tokenizer, EngineConfig(superposition=config))
    alone = engine.superposer.prefill(prompt)
    joined = engine.superposer.prefill(sharded(engine, shards_of(lm, config, prompt, count), prompt))
    assert joined.selection.kept == alone.selection.kept and joined.selection.paths == alone.selection.paths
    assert joined.selection.scores == pytest.approx(alone.selection.scores, abs=ATOL)
    assert joined.tokens == alone.tokens and joined.next_position == alone.next_position
    assert torch.allclose(joined.logits, alone.logits, atol=ATOL)
    if attenuation is not None:  # the kept paths' scores came from the shards: the same bias
        assert alone.key_bias.min() < 0 and torch.allclose(joined.key_bias, alone.key_bias, atol=ATOL)
    assert all(torch.allclose(a, b, atol=ATOL) for a, b in zip(joined.keys + joined.values, alone.keys + alone.values))
    tokens = engine.generate([Request(params=GREEDY, forkjoin=prompt)])[0].token_ids
    again = sharded(engine, shards_of(lm, config, prompt, count), prompt)
    assert engine.generate([Request(params=GREEDY, forkjoin=again)])[0].token_ids == tokens


def test_only_the_kept_paths_leave_their_shard(lm) -> None:
    config = SuperpositionConfig(enabled=True, top_k=1)
    prompt = random_prompt([3, 7, 4, 6], seed=31)
    shards = shards_of(lm, config, prompt, 2)
    scores = [s.score("r", prompt.preamble, prompt.query) for s in shards]
    kept = prune(scores, 1)
    taken = [s.take("r", k) for s, k in zip(shards, kept)]
    assert sorted(len(part) for part in taken) == [0, 2]  # one document and its query copy, from one shard
    document, query = next(part for part in taken if part)
    assert document.kv.device.type == "cpu" and len(query.tokens) == len(prompt.query)
    assert not any(s.pending for s in shards)
    with pytest.raises(RaytrainError, match="'r' was not scored on this shard"):
        shards[0].take("r", [])
    owner = next(s for s, part in zip(shards, taken) if part)
    again = owner.take("r", [k for part in kept for k in part], (prompt.preamble, prompt.query))  # scored anew
    assert [s.tokens for s in again] == [document.tokens, query.tokens] and not owner.pending
    assert torch.equal(again[0].kv, document.kv) and torch.equal(again[1].kv, query.kv)


def test_prune_takes_the_top_k_over_all_shards_with_ties_to_the_lower_path() -> None:
    scores = [ShardScores([0.1, 0.5], 0), ShardScores([0.5, 0.9, 0.2], 0), ShardScores([0.3], 0)]
    assert prune(scores, 2) == [[1], [1], []]
    assert prune(scores, 3) == [[1], [0, 1], []]
    assert prune(scores, 0) == [[0, 1], [0, 1, 2], [0]]


def test_shards_cache_their_documents_and_bound_what_they_hold(lm) -> None:
    config = SuperpositionConfig(enabled=True, top_k=1)
    prompt = random_prompt([3, 7, 4, 6], seed=32)
    shard = shards_of(lm, config, prompt, 2)[1]
    first = shard.score("a", prompt.preamble, prompt.query)
    again = shard.score("b", prompt.preamble, prompt.query)
    assert (first.cached, again.cached) == (0, 2) and again.scores == first.scores
    for i in range(PENDING + 1):
        shard.score(f"x{i}", prompt.preamble, prompt.query)
    assert len(shard.pending) == PENDING and "a" not in shard.pending


@pytest.mark.parametrize("field, value, message", [
    ("method", "prompt_cache", "s.method='prompt_cache': only superposition's fork is sharded"),
    ("hops", 2, "s.hops=2: a sharded store runs one round"),
    ("saliency", "random", "s.saliency='random'")])
def test_settings_that_cannot_be_sharded_are_refused_naming_the_key(lm, field, value, message) -> None:
    config = SuperpositionConfig(enabled=True, **{field: value})
    with pytest.raises(ConfigError, match=message):
        PathShard(lm, config, [[5, 6], [7, 8]], range(0, 1), "s")
    with pytest.raises(RaytrainError, match="shard paths 1..2: the store has 2 paths"):
        PathShard(lm, SuperpositionConfig(enabled=True), [[5, 6], [7, 8]], range(1, 3), "s")
