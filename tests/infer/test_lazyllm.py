"""LazyLLM against the verification facts of the spec (section 5), an explicit-attention reference of the selection,
the Aux Cache's bookkeeping, decode reading the cache in place, and the never-slower fallback."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raytrain.config import ConfigError
from raytrain.infer import lazyllm
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.lazyllm import LazyConfig, LazySequence, last_row_scores, select
from raytrain.infer.model_runner import PlainSequence
from raytrain.infer.sampling import SamplingParams

PROMPT_LEN = 40
EVERY_LAYER = {1: 0.5, 2: 0.5, 3: 0.5}


def lazy(lm, keep: float, **kwargs) -> LazySequence:
    torch.manual_seed(1)
    prompt = torch.randint(4, 512, (PROMPT_LEN,)).tolist()
    config = LazyConfig(layers={1: keep, 2: keep, 3: keep}, never_slower=False, **kwargs)
    return LazySequence(lm, prompt, config, PROMPT_LEN + 16, count_computations=True)


def greedy_steps(seq, logits: torch.Tensor, steps: int):
    """Yield (logits, token) for `steps` decode steps after prefill."""
    for _ in range(steps):
        token = logits[0].argmax().view(1)
        logits = seq.decode(token)
        yield logits, token


def test_selection_toy_from_the_spec() -> None:
    kept, parked = select(torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15]), 0.6)
    assert kept.tolist() == [1, 3, 4] and sorted(parked.tolist()) == [0, 2]


def test_selection_keeps_the_last_token_and_breaks_ties_by_position() -> None:
    assert select(torch.tensor([0.5, 0.5, 0.5, 0.0]), 0.5)[0].tolist() == [0, 3]
    assert select(torch.rand(10), 0.7)[0].numel() == 7  # ceil(0.7 * 10) is 7, not 8
    assert select(torch.rand(3), 0.01)[0].tolist() == [2]
    # protected tokens (generated ones, with protect_generated) survive and count toward the kept number
    assert select(torch.tensor([0.9, 0.8, 0.0, 0.0, 0.0]), 0.4, protected=3)[0].tolist() == [2, 3, 4]
    assert select(torch.tensor([0.9, 0.8, 0.1, 0.0, 0.0]), 0.6, protected=2)[0].tolist() == [0, 3, 4]


def test_keep_one_equals_the_plain_engine_at_every_step(lm) -> None:
    seq = lazy(lm, 1.0)
    plain = PlainSequence(lm, seq.prompt.tolist(), len(seq.prompt) + 16)
    a, b = seq.prefill(), plain.prefill()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for _ in range(10):
        token = a[0].argmax().view(1)
        a, b = seq.decode(token), plain.decode(token)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    n = seq.length
    for layer in range(4):
        torch.testing.assert_close(seq.store.keys[layer][0, :, :n], plain.cache.keys[layer][0, :, :n],
                                   rtol=1e-5, atol=1e-5)
    assert seq.prompt_fraction_computed() == 1.0


def test_token_sets_are_nested_with_the_scheduled_sizes(lm) -> None:
    seq = lazy(lm, 0.6)
    logits = seq.prefill()
    for _ in range(4):
        sets = seq.key_sets
        for layer in (1, 2, 3):
            assert set(sets[layer].tolist()) <= set(sets[layer - 1].tolist())
            assert sets[layer].numel() == max(1, math.ceil(0.6 * sets[layer - 1].numel() - 1e-9))
            assert int(sets[layer][-1]) == seq.length - 1  # the last token is always kept
        logits, _ = next(greedy_steps(seq, logits, 1))


def explicit_lazy_prefill(lm, prompt: torch.Tensor, schedule: dict[int, float]) -> dict[str, list]:
    """The spec's prefill (section 2.3) with attention written out: full causal softmax maps over the surviving
    tokens (original RoPE positions), the head-mean last row of layer b-1 ranking the tokens entering b."""
    X, h = torch.arange(prompt.numel()), lm.embed(prompt)[None]
    out: dict[str, list] = {"sets": [], "scores": [], "q_last": [], "keys": []}
    for layer, block in enumerate(lm.layers):
        if layer in schedule:
            s = out["scores"][-1].clone()
            s[-1] = math.inf  # the last token always stays
            m = max(1, math.ceil(schedule[layer] * X.numel() - 1e-9))
            kept = sorted(sorted(range(X.numel()), key=lambda i: (-float(s[i]), i))[:m])
            X, h = X[kept], h[:, kept]
        cos, sin = lm.rope(X[None])
        q, k, v = block.attn.project(block.attn_norm(h), cos, sin)
        group = q.shape[1] // k.shape[1]
        k_all, v_all = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # KV head j serves 2j, 2j+1
        logits = q @ k_all.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = logits.masked_fill(~torch.ones(X.numel(), X.numel(), dtype=torch.bool).tril(), -math.inf).softmax(-1)
        y = (probs @ v_all).transpose(1, 2).reshape(1, X.numel(), -1)
        h = h + block.attn.out_proj(y)
        h = h + block.ffn(block.ffn_norm(h))
        out["sets"].append(X)
        out["scores"].append(probs[0, :, -1].mean(0))  # (|X|,): the last query row, averaged over query heads
        out["q_last"].append(q[0, :, -1])
        out["keys"].append(k)
    return out


@torch.no_grad()
def test_scores_and_selections_follow_explicit_attention_probabilities(lm) -> None:
    """GQA layers (2 query heads per KV head), a boundary at every layer: the scores equal the head-mean of the
    explicit softmax map's last row, the kept sets are the top tokens of those scores, and the keys stored for
    the survivors after each boundary carry their original positions."""
    torch.manual_seed(3)
    prompt = torch.randint(4, 512, (PROMPT_LEN,))
    reference = explicit_lazy_prefill(lm, prompt, EVERY_LAYER)
    for layer in range(4):
        scores = last_row_scores(reference["q_last"][layer], reference["keys"][layer][0])
        torch.testing.assert_close(scores, reference["scores"][layer], rtol=1e-5, atol=1e-7)
    seq = LazySequence(lm, prompt.tolist(), LazyConfig(layers=EVERY_LAYER, never_slower=False), PROMPT_LEN)
    seq.prefill()
    assert [s.tolist() for s in seq.key_sets] == [s.tolist() for s in reference["sets"]]
    assert [s.numel() for s in seq.key_sets] == [40, 20, 10, 5]
    for layer in (1, 2, 3):  # after a boundary the survivors are no longer contiguous: positions must be original
        survivors = reference["sets"][layer]
        assert survivors.tolist() != list(range(survivors.numel()))
        torch.testing.assert_close(seq.store.keys[layer][0, :, survivors], reference["keys"][layer][0],
                                   rtol=1e-5, atol=1e-5)


def test_scores_are_computed_in_fp32_from_low_precision_inputs() -> None:
    torch.manual_seed(0)
    q, keys = torch.randn(4, 64).bfloat16() * 3, torch.randn(2, 300, 64).bfloat16() * 3
    exact = (q.double().view(2, 2, 64) @ keys.double().transpose(1, 2) / 8).softmax(-1).mean((0, 1))
    torch.testing.assert_close(last_row_scores(q, keys).double(), exact, rtol=1e-5, atol=1e-8)


def test_depth_invariants_and_each_pair_computed_at_most_once(lm) -> None:
    seq = lazy(lm, 0.5)
    logits = seq.prefill()
    previous = seq.depth[:PROMPT_LEN].clone()
    for logits, _ in greedy_steps(seq, logits, 12):
        depth = seq.depth[:seq.length]
        assert set(depth[:PROMPT_LEN].tolist()) <= {1, 2, 3, 4}  # a boundary or L
        assert bool((depth[:PROMPT_LEN] >= previous).all())  # never decreases
        for i, d in enumerate(depth.tolist()):  # KV exactly for layers [0, depth)
            assert seq.computed[i, :d].tolist() == [1] * d and seq.computed[i, d:].sum() == 0
        # the Aux Cache holds exactly the tokens below depth L, and its freed entries do not pile up
        assert sorted(seq.aux.parked().tolist()) == (depth < 4).nonzero().flatten().tolist()
        assert seq.aux.states.shape[0] <= 2 * len(seq.aux)
        previous = depth[:PROMPT_LEN].clone()
    assert int(seq.computed.max()) == 1
    assert int(seq.computed.sum()) <= seq.length * 4
    assert seq.revived > 0  # the dynamic schedule did bring parked tokens back
    assert seq.aux.states.shape[0] < PROMPT_LEN - 5  # compacted below what prefill parked


def test_a_revived_token_resumes_from_its_aux_state(lm) -> None:
    seq = lazy(lm, 0.5)
    logits = seq.prefill()
    for _ in range(12):
        depth_before = seq.depth.clone()
        parked = seq.aux.parked()
        aux_before = dict(zip(parked.tolist(), seq.aux.states[seq.aux.row[parked]].clone()))
        logits, _ = next(greedy_steps(seq, logits, 1))
        revived = ((seq.depth > depth_before) & (depth_before > 0)).nonzero().squeeze(1)
        revived = revived[revived < seq.length - 1]
        if revived.numel():
            break
    i = int(revived[0])
    h = aux_before[i].view(1, 1, -1)
    for layer in range(int(depth_before[i]), int(seq.depth[i])):
        block = lm.layers[layer]
        cos, sin = lm.rope(torch.tensor([[i]]))
        keys = seq.key_sets[layer]
        keys = keys[keys <= i]
        with torch.no_grad():
            q, k, v = block.attn.project(block.attn_norm(h), cos, sin)
            torch.testing.assert_close(seq.store.keys[layer][0, :, i], k[0, :, 0], rtol=1e-5, atol=1e-5)
            K, V = seq.store.keys[layer][:, :, keys], seq.store.values[layer][:, :, keys]
            y = torch.nn.functional.scaled_dot_product_attention(q, K, V, enable_gqa=True)
            h = h + block.attn.out_proj(y.transpose(1, 2).reshape(1, 1, -1))
            h = h + block.ffn(block.ffn_norm(h))


def test_layers_before_the_first_boundary_match_the_baseline(lm) -> None:
    seq = lazy(lm, 0.3)
    plain = PlainSequence(lm, seq.prompt.tolist(), len(seq.prompt) + 16)
    seq.prefill(), plain.prefill()
    torch.testing.assert_close(seq.store.keys[0][0, :, :PROMPT_LEN], plain.cache.keys[0][0, :, :PROMPT_LEN],
                               rtol=1e-5, atol=1e-5)  # original positions, so the same RoPE phases


def test_static_ablation_never_revives(lm) -> None:
    seq = lazy(lm, 0.5, dynamic=False)
    logits = seq.prefill()
    after_prefill = seq.depth[:PROMPT_LEN].clone()
    for logits, _ in greedy_steps(seq, logits, 8):
        pass
    assert seq.revived == 0 and torch.equal(seq.depth[:PROMPT_LEN], after_prefill)


def test_protect_generated_keeps_every_generated_token_at_every_layer(lm) -> None:
    """Generated tokens hold KV at every layer (computed whole in their own step), so pruning one only drops it
    from the deeper layers' attended sets; with protect_generated it is never dropped."""
    dropped = {}
    for protect in (False, True):
        seq = lazy(lm, 0.3, protect_generated=protect)
        logits = seq.prefill()
        dropped[protect] = False
        for logits, _ in greedy_steps(seq, logits, 10):
            generated = set(range(PROMPT_LEN, seq.length))
            dropped[protect] |= not all(generated <= set(s.tolist()) for s in seq.key_sets)
            assert (seq.depth[PROMPT_LEN:seq.length] == 4).all()
    assert dropped == {False: True, True: False}  # the spec's default prunes generated tokens too


class _Ops(TorchDispatchMode):
    """Records the shapes of the tensors ops allocate (not views of, or writes into, their inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in [*args, *(kwargs or {}).values()]
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(t.shape)
        return out


def test_no_square_attention_map_in_prefill_or_decode(lm) -> None:
    n = 200
    seq = LazySequence(lm, torch.randint(4, 512, (n,)).tolist(), LazyConfig(layers=EVERY_LAYER, never_slower=False),
                       n + 4)
    with _Ops() as seen:
        logits = seq.prefill()
    token_sets = {200, 100, 50}  # the sizes entering layers 0-2 (and 25 after the last boundary)
    assert not [s for s in seen.shapes if len(s) >= 2 and s[-1] == s[-2] and s[-1] in token_sets]
    for _ in range(3):
        with _Ops() as seen:
            logits = seq.decode(logits[0].argmax().view(1))
        sizes = {k.numel() for k in seq.key_sets}
        assert not [s for s in seen.shapes if len(s) >= 2 and s[-1] == s[-2] and s[-1] in sizes]


def test_decode_attends_over_the_cache_in_place(lm) -> None:
    """No copy of the attended keys and values, before or after a boundary: the only (1, kv heads, s, head dim)
    tensors a decode step makes are those of the tokens it computes (its own, and the ones it revives)."""
    seq = lazy(lm, 0.5)
    logits = seq.prefill()
    for _ in range(6):
        revived = seq.revived
        with _Ops() as seen:
            logits = seq.decode(logits[0].argmax().view(1))
        computed = 1 + seq.revived - revived
        kv_shaped = [s[2] for s in seen.shapes if len(s) == 4 and s[0] == 1 and s[1] in (1, 2) and s[-1] == 16]
        assert kv_shaped and max(kv_shaped) <= computed < seq.length, kv_shaped  # (a copy would be |X| or p + 1)


def test_engine_reports_the_computed_fraction_and_short_prompts_stay_plain(lm, tokenizer) -> None:
    config = EngineConfig(lazy=True, lazyllm=LazyConfig(layers=EVERY_LAYER, min_prompt_tokens=30,
                                                        never_slower=False))
    engine = Engine(lm, tokenizer, config)
    long = Request(torch.randint(4, 512, (60,)).tolist(), SamplingParams(max_new_tokens=5, temperature=0))
    short = Request("The if statement", SamplingParams(max_new_tokens=5, temperature=0))
    outs = engine.generate([long, short])
    assert 0 < outs[0].prompt_fraction_computed < 1 and outs[1].prompt_fraction_computed == 1.0
    assert outs[1].token_ids == Engine(lm, tokenizer).generate([short])[0].token_ids


def test_a_schedule_measured_slower_falls_back_to_the_plain_computation(lm, monkeypatch) -> None:
    """never_slower: the first prompt of each power-of-two length class times the schedule's prefill against the
    plain engine's; where it is not faster, the request runs the plain engine's own sequence (prefill and decode)."""
    lazy_costs = {64: 2.0, 128: 0.5}  # seconds per prefill by length class, against 1.0 for plain
    calls = []

    def fake_prefill_seconds(model, prompt, config):
        calls.append(len(prompt))
        return 1.0 if config is None else lazy_costs[len(prompt)]

    monkeypatch.setattr(lazyllm, "prefill_seconds", fake_prefill_seconds)
    config = LazyConfig(layers=EVERY_LAYER)
    prompts = {n: torch.randint(4, 512, (n,)).tolist() for n in (70, 100, 130)}
    fractions = {}
    for n, prompt in prompts.items():
        seq = LazySequence(lm, prompt, config, n + 2)
        logits = seq.prefill()
        fractions[n] = seq.prompt_fraction_computed()
        if n < 128:  # the plain engine's own computation: identical prefill and decode
            plain = PlainSequence(lm, prompt, n + 2)
            torch.testing.assert_close(logits, plain.prefill(), rtol=0, atol=0)
            token = logits.argmax(-1)
            torch.testing.assert_close(seq.decode(token), plain.decode(token), rtol=0, atol=0)
    assert fractions[70] == fractions[100] == 1.0 and fractions[130] < 1.0
    assert calls == [64] * 8 + [128] * 8  # each class measured once (4 rounds of plain and lazy), then cached


@pytest.mark.parametrize("config, message", [
    (LazyConfig(keep=0.0), "keeps no token"),
    (LazyConfig(layers={0: 0.5}), "boundary at layer 0"),
    (LazyConfig(boundaries=[0.3, 0.6], keep=[0.5]), "1 ratios for 2 boundaries"),
    (LazyConfig(boundaries=[0.1, 0.3, 0.6]), r"map to layers \[1, 1, 2\] of a 4-layer model"),
])
def test_bad_schedules_fail_before_any_request(lm, tokenizer, config: LazyConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Engine(lm, tokenizer, EngineConfig(lazy=True, lazyllm=config))


def test_the_engine_batches_prompts_of_a_length_class_where_lazyllm_measured_slower(lm, tokenizer,
                                                                                     monkeypatch) -> None:
    monkeypatch.setattr(lazyllm, "prefill_seconds", lambda model, prompt, config: 1.0 if config is None else 2.0)
    engine = Engine(lm, tokenizer, EngineConfig(lazy=True, lazyllm=LazyConfig(layers=EVERY_LAYER,
                                                                             min_prompt_tokens=30)))
    request = Request(torch.randint(4, 512, (60,)).tolist(), SamplingParams(max_new_tokens=5, temperature=0))
    engine.add_request(request, lambda deltas: None)
    engine.step()
    assert not engine.lazy_waiting and engine.lazy_running is None and engine.scheduler.has_work()
    assert engine.generate([request])[0].token_ids == Engine(lm, tokenizer).generate([request])[0].token_ids
