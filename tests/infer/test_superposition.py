"""Superposition prompting, against the spec's verification facts (section 5): equilibrium positions, float RoPE,
the path-wise computation equal to the single-sequence DAG-mask oracle (scores, postamble, every decode step),
pruning equal to masking, order invariance, path isolation, document likelihoods, top-k selection, the path cache
(hits bitwise equal to recomputation, a bounded LRU), iterative hops, the engine's decode batch, and bad input."""

from __future__ import annotations

import pytest
import torch

from raytrain.commands.generate import print_answer
from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.forkjoin import (ForkJoinPrompt, MaskedAttention, fork_positions, oracle_layout, oracle_logits,
                                     prompt_cache_layout)
from raytrain.infer.model_runner import ModelRunner, bucket
from raytrain.infer.path_cache import PathCache
from raytrain.infer.path_forward import KVLayout, Segment
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.superposition import Superposer, SuperpositionConfig, top_k

ATOL = 1e-4
GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


def random_prompt(lengths: list[int], seed: int = 1, p: int = 5, q: int = 4, t: int = 3) -> ForkJoinPrompt:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(4, 512, (n,), generator=g).tolist()

    return ForkJoinPrompt(ids(p), [ids(n) for n in lengths], ids(q), ids(t))


def mean_logprob(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean log p(ids[j] | ...) over j >= 1 from the logits of the rows of `ids`."""
    logp = logits[:-1].float().log_softmax(-1)
    return float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())


def oracle_scores(model, prompt: ForkJoinPrompt) -> torch.Tensor:
    layout = oracle_layout(prompt)
    logits = oracle_logits(model, layout)
    return torch.tensor([mean_logprob(logits[layout.spans["query", i]], prompt.query)
                         + mean_logprob(logits[layout.spans["document", i]], d)
                         for i, d in enumerate(prompt.documents)])


def superposer(model, **config) -> Superposer:
    return Superposer(model, SuperpositionConfig(enabled=True, **config))


# ---- positions ------------------------------------------------------------------------------------------------

def test_equilibrium_positions_of_the_worked_examples() -> None:
    prompt = ForkJoinPrompt([1] * 4, [[1] * 3, [1] * 4, [1] * 6], [1] * 3, [1] * 2)
    layout = oracle_layout(prompt, response=[1])

    def at(kind: str, i: int = 0) -> list[float]:
        return layout.positions[layout.spans[kind, i]].tolist()

    assert at("preamble") == [0, 1, 2, 3]
    assert at("document", 0) == pytest.approx([4, 5.3333, 6.6667], abs=1e-4)
    assert at("document", 1) == [4, 5, 6, 7]
    assert at("document", 2) == pytest.approx([4, 4.6667, 5.3333, 6, 6.6667, 7.3333], abs=1e-4)
    assert all(at("query", i) == pytest.approx([8, 9, 10]) for i in range(3))
    assert at("postamble") == pytest.approx([11, 12, 13])  # t, then the first response token at 13
    fork = fork_positions(4, [2, 6])
    assert fork.query_start == pytest.approx(7)
    assert fork.paths[0].tolist() == [4, 5.5] and fork.paths[1].tolist() == [4, 4.5, 5, 5.5, 6, 6.5]


def test_every_path_spans_the_harmonic_mean_of_the_lengths() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 60, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        fork = fork_positions(9.0, lengths)
        span = fork.query_start - 9.0
        assert min(lengths) - 1e-9 <= span <= sum(lengths) / len(lengths) + 1e-9
        for path, step in zip(fork.paths, fork.steps):
            assert fork.query_start - float(path[0]) == pytest.approx(span)
            assert float(path[-1]) + step == pytest.approx(fork.query_start)


def test_one_document_or_equal_lengths_give_the_classical_integer_positions() -> None:
    one = oracle_layout(random_prompt([7]), response=[1, 2])
    assert torch.equal(one.positions, torch.arange(len(one.tokens), dtype=torch.float64))
    equal = fork_positions(5, [4, 4, 4])
    aligned = fork_positions(5, [4, 4, 4], "left_aligned")
    assert equal.query_start == aligned.query_start == 9
    assert all(torch.equal(a, b) and torch.equal(a, a.round()) for a, b in zip(equal.paths, aligned.paths))


def test_float_rope_equals_the_table_at_integers_and_moves_between_them(lm) -> None:
    positions = torch.arange(60)[None]
    for table, computed in zip(lm.rope(positions), lm.rope(positions.float())):
        torch.testing.assert_close(computed, table, rtol=0, atol=1e-6)
    tokens = torch.randint(4, 512, (1, 10))
    with torch.no_grad():
        plain = lm(tokens)
        torch.testing.assert_close(lm(tokens, positions=torch.arange(10.0)[None]), plain, rtol=0, atol=1e-5)
        shifted = lm(tokens, positions=(torch.arange(10.0) + torch.tensor([0.0] * 9 + [0.5]))[None])
    assert (shifted[0, -1] - plain[0, -1]).abs().max() > 1e-3  # a non-integer position changes the output


# ---- the path-wise computation against the oracle ---------------------------------------------------------------

def decode_against_oracle(model, prompt: ForkJoinPrompt, context, kept: list[int] | None, steps: int,
                          layout=None) -> list[int]:
    """Greedy decode from `context` in a one-slot model runner (the engine's decode path), each step's logits
    checked against the oracle's with the response so far (`layout(response)`, by default the superposition DAG's
    with `kept`); returns the tokens."""
    layout = layout or (lambda response: oracle_layout(prompt, kept=kept, response=response))
    runner = ModelRunner(model, 1, 128, cuda_graphs=False, key_bias=context.key_bias is not None)
    n = len(context.tokens)
    runner.install(0, context.keys, context.values, 0, n, context.key_bias)
    token = context.logits.argmax(-1)
    runner.join(0, token, n, context.rope_offset)
    response = [int(token)]
    for step in range(steps):
        logits = runner.decode(1, bucket(n + step + 1, runner.lengths))[0]
        want = oracle_logits(model, layout(response))[-1]
        torch.testing.assert_close(logits, want, rtol=0, atol=ATOL)
        token = logits.argmax()[None]
        runner.advance(1, token)
        response.append(int(token))
    return response


def test_cached_batched_paths_equal_the_single_sequence_oracle(lm) -> None:
    prompt = random_prompt([3, 7, 4, 6])
    context = superposer(lm, top_k=0).prefill(prompt)
    layout = oracle_layout(prompt)
    logits = oracle_logits(lm, layout)
    torch.testing.assert_close(torch.tensor(context.selection.scores), oracle_scores(lm, prompt), rtol=0, atol=ATOL)
    torch.testing.assert_close(context.logits[0], logits[layout.spans["postamble", 0]][-1], rtol=0, atol=ATOL)
    assert context.next_position == pytest.approx(float(layout.positions[-1]) + 1)
    decode_against_oracle(lm, prompt, context, None, steps=5)


def test_pruning_drops_the_paths_that_masking_hides(lm) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=2)
    context = superposer(lm, top_k=2).prefill(prompt)
    kept = context.selection.kept
    assert kept == sorted(torch.topk(oracle_scores(lm, prompt), 2).indices.tolist())
    assert len(context.tokens) == 5 + sum(len(prompt.documents[i]) + 4 for i in kept) + 3  # p, kept (d, q), t
    layout = oracle_layout(prompt, kept=kept)
    torch.testing.assert_close(context.logits[0], oracle_logits(lm, layout)[-1], rtol=0, atol=ATOL)
    decode_against_oracle(lm, prompt, context, kept, steps=4)


def attenuated_layout(prompt: ForkJoinPrompt, context, temperature: float):
    """The oracle of an attenuated context: its kept paths masked in, each biased by (score - best) / T."""
    kept, scores = context.selection.kept, torch.tensor(context.selection.scores)
    bias = {i: float(scores[i] - scores.max()) / temperature for i in kept}
    return lambda response=None: oracle_layout(prompt, kept=kept, response=response, path_bias=bias)


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_attenuation_biases_the_kept_paths_as_the_oracle_does(lm, temperature: float) -> None:
    """The official code's attenuation (an ablation): from the postamble on, each kept path's document and query
    keys get (score - best) / T added to their attention logits; the postamble's logits and every decode step
    equal the oracle's with that bias, and differ from unattenuated top-2."""
    prompt = random_prompt([3, 7, 4, 6], seed=2)
    context = superposer(lm, top_k=2, attenuation=temperature).prefill(prompt)
    layout = attenuated_layout(prompt, context, temperature)
    assert sorted(layout().bias.unique().tolist())[-1] == 0 and layout().bias.min() < 0
    assert context.key_bias.shape == (len(context.tokens),) and context.key_bias[:5].eq(0).all()
    torch.testing.assert_close(context.logits[0], oracle_logits(lm, layout())[-1], rtol=0, atol=ATOL)
    plain = superposer(lm, top_k=2).prefill(prompt)
    assert plain.selection.kept == context.selection.kept and plain.key_bias is None
    assert not torch.allclose(context.logits, plain.logits, atol=1e-2)
    decode_against_oracle(lm, prompt, context, context.selection.kept, steps=4, layout=layout)


def test_attenuation_changes_nothing_with_one_path_kept(lm) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=2)
    context = superposer(lm, top_k=1, attenuation=0.01).prefill(prompt)
    plain = superposer(lm, top_k=1).prefill(prompt)
    assert context.key_bias.eq(0).all() and torch.equal(context.logits, plain.logits)


def test_path_order_and_document_order_do_not_change_the_answer(lm) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=3)
    order = [2, 0, 3, 1]
    permuted = ForkJoinPrompt(prompt.preamble, [prompt.documents[i] for i in order], prompt.query, prompt.postamble)
    a, b = superposer(lm, top_k=2).prefill(prompt), superposer(lm, top_k=2).prefill(permuted)
    torch.testing.assert_close(torch.tensor(b.selection.scores), torch.tensor(a.selection.scores)[order], rtol=0,
                               atol=1e-5)
    assert sorted(order[i] for i in b.selection.kept) == a.selection.kept
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)  # the kept paths concatenated in another order


def test_changing_one_document_leaves_the_other_paths_untouched(lm) -> None:
    prompt = random_prompt([5, 7, 5, 6], seed=4)
    sp = superposer(lm, cache_policy="off")
    prefix = sp.preamble(prompt.preamble)
    before = sp.fork(prefix, prompt.documents, prompt.query)
    changed = [list(d) for d in prompt.documents]
    changed[2] = [(t + 1) % 512 for t in changed[2]]  # same length: same positions for every path
    after = sp.fork(prefix, changed, prompt.query)
    for i in (0, 1, 3):
        assert after.scores[i] == before.scores[i]
        for a, b in ((after.documents[i].segment, before.documents[i].segment), (after.queries[i], before.queries[i])):
            assert torch.equal(a.kv, b.kv)
    assert after.scores[2] != before.scores[2]


def test_document_likelihood_is_the_shifted_mean_over_its_own_tokens(lm) -> None:
    prompt = random_prompt([3, 7, 1, 6], seed=5)
    sp = superposer(lm)
    result = sp.fork(sp.preamble(prompt.preamble), prompt.documents, prompt.query)
    layout = oracle_layout(prompt)
    logits = oracle_logits(lm, layout)
    for i, d in enumerate(prompt.documents):
        want = mean_logprob(logits[layout.spans["document", i]], d) if len(d) > 1 else 0.0  # first token unscored
        assert result.documents[i].log_likelihood == pytest.approx(want, abs=ATOL)


def test_pruning_keeps_the_highest_scores_with_ties_to_the_lower_index(lm) -> None:
    assert top_k(torch.tensor([0.1, 0.9, 0.5, 0.9]), 1) == [1]
    assert top_k(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2) == [1, 3]
    assert top_k(torch.tensor([0.1, 0.9, 0.5, 0.9]), 0) == [0, 1, 2, 3]
    # constructed: the better of two documents, placed twice after the worse one; both copies score the same
    a, b = random_prompt([6], seed=6).documents[0], random_prompt([6], seed=7).documents[0]
    base = random_prompt([6, 6], seed=8)
    scores = superposer(lm, top_k=0).prefill(ForkJoinPrompt(base.preamble, [a, b], base.query, base.postamble))
    worse, better = (a, b) if scores.selection.scores[0] < scores.selection.scores[1] else (b, a)
    constructed = ForkJoinPrompt(base.preamble, [worse, better, better], base.query, base.postamble)
    context = superposer(lm, top_k=1).prefill(constructed)
    assert context.selection.kept == [1] and context.selection.scores[1] == context.selection.scores[2]


def test_attention_saliency_is_the_query_attention_to_its_document(lm) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=9)
    layout = oracle_layout(prompt)
    mass = torch.zeros(len(prompt.documents))

    class Recording(MaskedAttention):
        def update(self, layer, q, k, v):
            n_kv = k.shape[1]
            scores = torch.einsum("bkgtd,bksd->bkgts", q.unflatten(1, (n_kv, -1)), k) / q.shape[-1] ** 0.5
            probs = scores.masked_fill(~self.mask[:, :, None], float("-inf")).softmax(-1)[0].mean((0, 1))
            for i in range(len(prompt.documents)):
                mass[i] += probs[layout.spans["query", i], layout.spans["document", i]].sum() / len(lm.layers)
            return super().update(layer, q, k, v)

    with torch.no_grad():
        lm(torch.tensor([layout.tokens]), cache=Recording(layout.mask), positions=layout.positions.float()[None])
    context = superposer(lm, saliency="attention", top_k=1).prefill(prompt)
    torch.testing.assert_close(torch.tensor(context.selection.scores), mass, rtol=0, atol=1e-5)
    assert context.selection.kept == [int(mass.argmax())]


def test_factor_one_is_naive_rag(lm) -> None:
    prompt = random_prompt([3, 7, 4], seed=10)
    context = superposer(lm, factor=1).prefill(prompt)
    with torch.no_grad():
        naive = lm(torch.tensor([prompt.flat()]))[0, -1]
    torch.testing.assert_close(context.logits[0], naive, rtol=0, atol=ATOL)
    assert context.tokens == prompt.flat() and context.rope_offset == 0


@pytest.mark.parametrize("attenuation", [None, 1.0])  # attenuated: the last round's kept paths, the moved one not
def test_iterative_superposition_moves_the_best_path_into_the_prefix(lm, attenuation) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=11)
    probe = superposer(lm, cache_policy="off")
    first = probe.fork(probe.preamble(prompt.preamble), prompt.documents, prompt.query)
    best = top_k(first.scores, 1)[0]
    sp = superposer(lm, hops=2, top_k=2, attenuation=attenuation)
    context = sp.prefill(prompt)
    rest = [i for i in range(4) if i != best]
    assert context.selection.moved == [best] and set(context.selection.kept) <= set(rest)
    extended = ForkJoinPrompt(prompt.preamble + prompt.documents[best], [prompt.documents[i] for i in rest],
                              prompt.query, prompt.postamble)
    start = torch.arange(len(prompt.preamble), dtype=torch.float64)
    kept, scores = [rest.index(i) for i in context.selection.kept], context.selection.scores
    bias = {j: (scores[j] - max(scores)) / attenuation for j in kept} if attenuation else None
    assert bias is None or min(bias.values()) < 0 == max(bias.values())
    layout = oracle_layout(extended, kept=kept, preamble_positions=torch.cat([start, first.fork.paths[best]]),
                           path_bias=bias)
    torch.testing.assert_close(context.logits[0], oracle_logits(lm, layout)[-1], rtol=0, atol=ATOL)
    again = sp.prefill(prompt)  # the first round from the cache, the second recomputed: the same answer
    assert (context.selection.cached, again.selection.cached) == (0, 4) and torch.equal(again.logits, context.logits)


# ---- the path cache --------------------------------------------------------------------------------------------

def test_cache_hits_equal_recomputation_bitwise(lm, tokenizer) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=12)
    engine = Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(enabled=True, top_k=2)))
    first, second = (engine.generate([Request(params=GREEDY, forkjoin=prompt)])[0] for _ in range(2))
    assert (first.superposition.cached, second.superposition.cached) == (0, 4)
    assert second.token_ids == first.token_ids
    hit = engine.superposer.prefill(prompt)
    fresh = superposer(lm, top_k=2, cache_policy="off").prefill(prompt)
    assert hit.selection.cached == 4 and fresh.selection.cached == 0
    assert torch.equal(hit.logits, fresh.logits) and hit.selection.scores == fresh.selection.scores
    assert all(torch.equal(a, b) for a, b in zip(hit.keys + hit.values, fresh.keys + fresh.values))
    other = ForkJoinPrompt(prompt.preamble, prompt.documents[:3], prompt.query, prompt.postamble)
    assert engine.superposer.prefill(other).selection.cached == 0  # other lengths: other steps, other keys


def test_random_saliency_is_seeded_by_the_request(lm) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=14)
    a, b = (superposer(lm, top_k=2, saliency="random").prefill(prompt) for _ in range(2))
    scores = torch.tensor(a.selection.scores)
    assert a.selection.scores == b.selection.scores and len(set(a.selection.scores)) == 4
    assert bool(((scores >= 0) & (scores < 1)).all()) and a.selection.kept == top_k(scores, 2)
    other = random_prompt([3, 7, 4, 6], seed=15)
    assert superposer(lm, saliency="random").prefill(other).selection.scores != a.selection.scores


# ---- the Prompt Cache baseline ----------------------------------------------------------------------------------

def test_prompt_cache_equals_its_oracle(lm) -> None:
    """Modules alone at left-aligned positions, one query over all of them: the context, its first logits and every
    decode step equal the single-sequence forward under the baseline's mask."""
    prompt = random_prompt([3, 7, 4, 6], seed=16)
    context = superposer(lm, method="prompt_cache").prefill(prompt)
    layout = prompt_cache_layout(prompt)
    assert context.tokens == layout.tokens and context.selection.kept == [0, 1, 2, 3]
    assert layout.positions[layout.spans["document", 2]].tolist() == [5, 6, 7, 8]  # left-aligned after |p| = 5
    assert layout.positions[layout.spans["query", 0]][0] == 5 + 7
    torch.testing.assert_close(context.logits[0], oracle_logits(lm, layout)[-1], rtol=0, atol=ATOL)
    assert context.next_position == pytest.approx(float(layout.positions[-1]) + 1)
    decode_against_oracle(lm, prompt, context, None, steps=4,
                          layout=lambda response: prompt_cache_layout(prompt, response))


def test_prompt_cache_modules_ignore_the_preamble_and_are_reused_across_preambles(lm, tokenizer) -> None:
    prompt = random_prompt([3, 7, 4, 6], seed=17)
    other = ForkJoinPrompt([9, 10, 11, 12, 13], prompt.documents, prompt.query, prompt.postamble)  # same |p|
    engine = Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(enabled=True,
                                                                                  method="prompt_cache")))
    first, second = (engine.generate([Request(params=GREEDY, forkjoin=p)])[0] for p in (prompt, other))
    assert (first.superposition.cached, second.superposition.cached) == (0, 4)
    fresh = superposer(lm, method="prompt_cache", cache_policy="off").prefill(other)
    hit = engine.superposer.prefill(other)
    assert torch.equal(hit.logits, fresh.logits)
    assert all(torch.equal(a, b) for a, b in zip(hit.keys + hit.values, fresh.keys + fresh.values))
    p, documents = len(prompt.preamble), slice(5, 5 + 20)
    plain = superposer(lm, method="prompt_cache", cache_policy="off").prefill(prompt)
    assert all(torch.equal(a[:, documents], b[:, documents]) for a, b in zip(plain.keys, fresh.keys)) and p == 5
    assert not torch.equal(plain.keys[0][:, :p], fresh.keys[0][:, :p])
    assert second.token_ids == decode_against_oracle(lm, other, fresh, None, steps=5,
                                                     layout=lambda response: prompt_cache_layout(other, response))


def test_generate_says_what_the_prompt_cache_reused(lm, tokenizer, capsys) -> None:
    engine = Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(enabled=True,
                                                                                  method="prompt_cache")))
    request = Request(params=GREEDY, forkjoin=random_prompt([3, 7, 4, 6], seed=18))
    for cached in (0, 4):
        print_answer(engine, request)
        err = capsys.readouterr().err
        assert err == f"prompt cache: 4 documents as modules, {cached} of them from the path cache\n"


def test_the_path_cache_is_a_bounded_lru() -> None:
    cache = PathCache(max_bytes=100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # now b is the least recently used
    cache.put("c", 3, 40)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    cache.put("huge", 4, 101)  # larger than the whole cache: not stored, nothing evicted
    cache.put("a", 5, 10)  # replaced, its bytes recounted
    assert cache.get("huge") is None and cache.get("a") == 5
    assert cache.stats() == {"entries": 2, "bytes": 50, "hits": 4, "misses": 2, "evictions": 1}


# ---- the engine ------------------------------------------------------------------------------------------------

def test_superposed_requests_decode_in_the_batch_without_changing_others(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(enabled=True, top_k=2)))
    prompt = random_prompt([3, 7, 4, 6], seed=13)
    rag = Request(params=GREEDY, forkjoin=prompt)
    plain = [Request("The if statement", GREEDY), Request("A class", SamplingParams(max_new_tokens=4, temperature=0))]
    alone = [engine.generate([r])[0] for r in [*plain, rag]]
    batched = engine.generate([plain[0], rag, plain[1]])
    assert [c.token_ids for c in batched] == [alone[0].token_ids, alone[2].token_ids, alone[1].token_ids]
    context = superposer(lm, top_k=2).prefill(prompt)
    assert alone[2].token_ids == decode_against_oracle(lm, prompt, context, context.selection.kept, steps=5)
    assert alone[2].prompt_tokens == len(prompt.flat()) and alone[0].superposition is None


@pytest.mark.parametrize("interleave", [True, False])
def test_running_requests_decode_between_the_stages_of_a_superposed_prefill(lm, tokenizer, interleave) -> None:
    """A cold superposed prefill has four batched forwards (preamble, documents, query copies, postamble).
    Interleaved, they take four engine steps and a running request gets a token in each; otherwise the prefill takes
    one step. The answer is the oracle's either way."""
    sp = SuperpositionConfig(enabled=True, top_k=1, cache_policy="off", interleave=interleave)
    engine = Engine(lm, tokenizer, EngineConfig(superposition=sp, overlap=False))
    running = engine.add_request(Request("The if statement", SamplingParams(max_new_tokens=20, temperature=0,
                                                                            ignore_eos=True)), lambda items: None)
    engine.step()
    rag = engine.add_request(Request(params=GREEDY, forkjoin=random_prompt([3, 7, 4, 6], seed=13)), lambda items: None)
    prefill_steps, before = 0, len(running.output)
    while rag.context is None:
        engine.step()
        prefill_steps += 1
    assert prefill_steps == (4 if interleave else 1)
    assert len(running.output) - before == prefill_steps  # the running request decoded at every one of those steps
    while engine.has_work():
        engine.step()
    expected = superposer(lm, top_k=1).prefill(rag.forkjoin)
    assert rag.output == decode_against_oracle(lm, rag.forkjoin, expected, expected.selection.kept,
                                               steps=len(rag.output) - 1)


def test_attenuated_requests_decode_in_the_engine_and_leave_their_slot_unbiased(lm, tokenizer) -> None:
    """In the engine's batch (its cache holds the per-key bias) an attenuated request answers as the oracle; when it
    ends its slot's bias is zero again, and a plain request in that slot answers as on an engine without a bias."""
    sp = SuperpositionConfig(enabled=True, top_k=2, attenuation=1.0)
    engine = Engine(lm, tokenizer, EngineConfig(superposition=sp, max_batch_size=1))
    prompt = random_prompt([3, 7, 4, 6], seed=13)
    rag = engine.generate([Request(params=GREEDY, forkjoin=prompt)])[0]
    context = superposer(lm, top_k=2, attenuation=1.0).prefill(prompt)
    assert rag.token_ids == decode_against_oracle(lm, prompt, context, context.selection.kept, steps=5,
                                                  layout=attenuated_layout(prompt, context, 1.0))
    assert not engine.runner.cache.key_bias.any()
    plain = Request("The if statement", GREEDY)
    assert engine.generate([plain])[0].token_ids == Engine(lm, tokenizer).generate([plain])[0].token_ids


def test_a_failed_step_clears_the_attenuated_slots(lm, tokenizer, monkeypatch) -> None:
    """A step that raises ends the requests in flight; their slots' bias is zeroed with them, and the next
    attenuated request answers as on a fresh engine."""
    sp = SuperpositionConfig(enabled=True, top_k=2, attenuation=1.0)
    engine = Engine(lm, tokenizer, EngineConfig(superposition=sp, overlap=False))
    prompt = random_prompt([3, 7, 4, 6], seed=13)
    failing = engine.add_request(Request(params=GREEDY, forkjoin=prompt), lambda items: None)
    while failing.context is None or failing.slot is None or not engine.runner.cache.key_bias.any():
        engine.step()
    monkeypatch.setattr(engine, "_decode", lambda decodes: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate([Request(params=GREEDY, forkjoin=prompt)])
    monkeypatch.undo()
    assert not engine.runner.cache.key_bias.any() and not engine.runner.live.any()
    fresh = Engine(lm, tokenizer, EngineConfig(superposition=sp))
    request = Request(params=GREEDY, forkjoin=prompt)
    assert engine.generate([request])[0].token_ids == fresh.generate([request])[0].token_ids


def test_naive_rag_is_the_flat_prompt_and_superposition_is_per_request(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)  # superposition off: RAG requests read every document in one prompt
    prompt = random_prompt([3, 7, 4], seed=14)
    naive = engine.generate([Request(params=GREEDY, forkjoin=prompt)])[0]
    assert naive.token_ids == engine.generate([Request(prompt.flat(), GREEDY)])[0].token_ids
    assert naive.superposition is None
    prompt.superpose, prompt.top_k = True, 1
    superposed = engine.generate([Request(params=GREEDY, forkjoin=prompt)])[0]
    assert len(superposed.superposition.kept) == 1


def test_bad_superposition_input_fails_before_any_compute(lm, tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"generation\.superposition\.top_k=-1 must be >= 0"):
        Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(top_k=-1)))
    with pytest.raises(ConfigError, match=r"generation\.superposition\.positions='middle' is unknown"):
        Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(positions="middle")))
    with pytest.raises(ConfigError, match=r"generation\.superposition\.method='prompt_caching' is unknown"):
        Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(method="prompt_caching")))
    with pytest.raises(ConfigError, match=r"generation\.superposition\.hops=2: method=prompt_cache has no hops"):
        Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(method="prompt_cache", hops=2)))
    with pytest.raises(ConfigError, match=r"generation\.superposition\.graph_tokens=-1 must be >= 0"):
        Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(graph_tokens=-1)))
    with pytest.raises(ConfigError, match=r"generation\.superposition\.attenuation=0\.0 must be > 0"):
        Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(attenuation=0.0)))
    with pytest.raises(ConfigError, match=r"superposition\.attenuation=1\.0: method=prompt_cache scores no paths"):
        Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(method="prompt_cache", attenuation=1.0)))
    engine = Engine(lm, tokenizer, EngineConfig(superposition=SuperpositionConfig(enabled=True, hops=3)))
    prompt = random_prompt([3, 7, 4])
    cases = {r"documents\[1\]: the segment is empty": ForkJoinPrompt([5], [[6], []], [7], [8]),
             r"query: token ids must be integers in \[0, 512\)": ForkJoinPrompt([5], [[6]], [512], [8]),
             "documents: a fork-join prompt needs at least one document": ForkJoinPrompt([5], [], [7], [8]),
             "hops=3 needs at least 3": ForkJoinPrompt([5], [[6], [7]], [7], [8]),
             "beyond the model's context window of 256": ForkJoinPrompt(prompt.preamble, [[9] * 250] * 3, [7], [8])}
    for message, bad in cases.items():
        with pytest.raises(RaytrainError, match=message):
            engine.generate([Request(params=GREEDY, forkjoin=bad)])
    with pytest.raises(RaytrainError, match="a prompt or a forkjoin prompt, not both"):
        engine.generate([Request("text", GREEDY, forkjoin=prompt)])
    assert engine.steps == 0 and engine.superposer.cache.stats()["misses"] == 0


def test_segments_concatenate_along_the_sequence() -> None:
    a = Segment([1, 2], torch.tensor([0.0, 1.0]), torch.zeros(2, 16))
    b = Segment([3], torch.tensor([2.5]), torch.ones(1, 16))
    joined = Segment.cat([a, b])
    assert joined.tokens == [1, 2, 3] and joined.positions.tolist() == [0, 1, 2.5]
    assert joined.kv.shape == (3, 16) and joined.nbytes == a.nbytes + b.nbytes and joined.kv[2].all()


def test_kv_layout_splits_a_row_into_disjoint_layers_of_different_head_counts(lm) -> None:
    """Keys and values written through each layer's split views all survive (the views do not overlap), whatever
    the layer's KV head count (OpenELM's layers differ), they fill the row, and unpack gives every layer of one
    packed segment."""
    layout = KVLayout(lm)
    assert len({n for n, _ in layout.sizes}) > 1  # the fixture's layers do differ
    keys = [torch.randn(3, n, 5, hd) for n, hd in layout.sizes]
    values = [torch.randn(3, n, 5, hd) for n, hd in layout.sizes]
    kv = torch.full((3, 5, layout.width), float("nan"))
    for layer, (k, v) in enumerate(zip(keys, values)):
        split_k, split_v = layout.split(kv, layer)
        split_k.copy_(k)
        split_v.copy_(v)
    assert not kv.isnan().any()
    for layer, (k, v) in enumerate(zip(keys, values)):
        split_k, split_v = layout.split(kv, layer)
        assert torch.equal(split_k, k) and torch.equal(split_v, v)
    row_keys, row_values = layout.unpack(kv[1])
    assert all(torch.equal(a, b[1]) for a, b in zip(row_keys + row_values, keys + values))
