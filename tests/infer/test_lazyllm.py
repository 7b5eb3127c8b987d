"""LazyLLM against the verification facts of the spec (section 5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raytrain.config import ConfigError
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.model_runner import PlainSequence
from raytrain.infer.lazyllm import LazyConfig, LazySequence, select
from raytrain.infer.sampling import SamplingParams

PROMPT_LEN = 40


def lazy(lm, keep: float, **kwargs) -> LazySequence:
    torch.manual_seed(1)
    prompt = torch.randint(4, 512, (PROMPT_LEN,)).tolist()
    return LazySequence(lm, prompt, LazyConfig(layers={1: keep, 2: keep, 3: keep}, **kwargs), PROMPT_LEN + 16)


def greedy_steps(seq, logits: torch.Tensor, steps: int):
    """Yield (logits, token) for `steps` decode steps after prefill."""
    for _ in range(steps):
        token = logits[0].argmax().view(1)
        logits = seq.decode(token)
        yield logits, token


def test_selection_toy_from_the_spec() -> None:
    kept = select(torch.arange(5), torch.tensor([0.10, 0.40, 0.05, 0.30, 0.15]), 0.6)
    assert kept.tolist() == [1, 3, 4]


def test_selection_keeps_the_last_token_and_breaks_ties_by_position() -> None:
    assert select(torch.arange(4), torch.tensor([0.5, 0.5, 0.5, 0.0]), 0.5).tolist() == [0, 3]
    assert select(torch.arange(10), torch.rand(10), 0.7).numel() == 7  # ceil(0.7 * 10) is 7, not 8
    assert select(torch.arange(3), torch.rand(3), 0.01).tolist() == [2]


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


def test_depth_invariants_and_each_pair_computed_at_most_once(lm) -> None:
    seq = lazy(lm, 0.5)
    logits = seq.prefill()
    previous = seq.depth[:PROMPT_LEN].clone()
    for logits, _ in greedy_steps(seq, logits, 12):
        depth = seq.depth[:PROMPT_LEN]
        assert set(depth.tolist()) <= {1, 2, 3, 4}  # a boundary or L
        assert bool((depth >= previous).all())  # never decreases
        for i, d in enumerate(depth.tolist()):  # KV exactly for layers [0, depth)
            assert seq.computed[i, :d].tolist() == [1] * d and seq.computed[i, d:].sum() == 0
        previous = depth.clone()
    assert int(seq.computed.max()) == 1
    assert int(seq.computed.sum()) <= seq.length * 4
    assert seq.revived > 0  # the dynamic schedule did bring parked tokens back


def test_a_revived_token_resumes_from_its_aux_state(lm) -> None:
    seq = lazy(lm, 0.5)
    logits = seq.prefill()
    for _ in range(12):
        depth_before, aux_before = seq.depth.clone(), seq.aux.clone()
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


class _Shapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(t.shape)
        return out


def test_prefill_scoring_never_builds_an_attention_map(lm) -> None:
    n = 200
    seq = LazySequence(lm, torch.randint(4, 512, (n,)).tolist(), LazyConfig(layers={1: 0.5, 2: 0.5, 3: 0.5}), n + 1)
    with _Shapes() as seen:
        seq.prefill()
    token_sets = {200, 100, 50}  # the sizes entering layers 0-2 (and 25 after the last boundary)
    assert not [s for s in seen.shapes if len(s) >= 2 and s[-1] == s[-2] and s[-1] in token_sets]


def test_engine_reports_the_computed_fraction_and_short_prompts_stay_plain(lm, tokenizer) -> None:
    config = EngineConfig(lazy=True, lazyllm=LazyConfig(layers={1: 0.5, 2: 0.5, 3: 0.5}, min_prompt_tokens=30))
    engine = Engine(lm, tokenizer, config)
    long = Request(torch.randint(4, 512, (60,)).tolist(), SamplingParams(max_new_tokens=5, temperature=0))
    short = Request("The if statement", SamplingParams(max_new_tokens=5, temperature=0))
    outs = engine.generate([long, short])
    assert 0 < outs[0].prompt_fraction_computed < 1 and outs[1].prompt_fraction_computed == 1.0
    assert outs[1].token_ids == Engine(lm, tokenizer).generate([short])[0].token_ids


@pytest.mark.parametrize("config, message", [
    (LazyConfig(keep=0.0), "keeps no token"),
    (LazyConfig(layers={0: 0.5}), "boundary at layer 0"),
    (LazyConfig(boundaries=[0.3, 0.6], keep=[0.5]), "1 ratios for 2 boundaries"),
    (LazyConfig(boundaries=[0.1, 0.3, 0.6]), r"map to layers \[1, 1, 2\] of a 4-layer model"),
])
def test_bad_schedules_fail_before_any_request(lm, tokenizer, config: LazyConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Engine(lm, tokenizer, EngineConfig(lazy=True, lazyllm=config))
