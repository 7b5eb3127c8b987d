"""The engine: equals step-by-step full recomputation (raytrain and a Hugging Face Llama), batching is invisible,
streaming and stop strings are exact, bad requests fail before any compute."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raytrain.config import RaytrainError
from raytrain.infer.engine import Delta, Engine, Request
from raytrain.infer.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def full_recompute(forward, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(forward(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_engine_equals_full_recompute(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    prompt = engine.encode(Request("The if statement"))
    out = engine.generate([Request(prompt, GREEDY)])[0]
    assert out.token_ids == full_recompute(lm, prompt, 12)
    assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


def test_hugging_face_llama_runs_through_the_same_engine(tmp_path, tokenizer) -> None:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, rope_theta=5000.0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine.from_checkpoint(tmp_path)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(engine.model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-5)
    prompt = engine.encode(Request("The while statement"))
    out = engine.generate([Request(prompt, GREEDY)])[0]
    assert out.token_ids == full_recompute(lambda t: hf(t).logits, prompt, 12)


def test_batched_equals_unbatched(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    requests = [Request("The if statement", GREEDY), Request("A", SamplingParams(max_new_tokens=5, temperature=0)),
                Request("Assignment statements are used to", SamplingParams(max_new_tokens=9, temperature=0)),
                Request("x", SamplingParams(max_new_tokens=7, temperature=0.9, top_k=20, seed=3))]
    batched = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [len(b.token_ids) for b in batched] == [12, 5, 9, 7]


def test_stream_deltas_join_to_the_completion_and_stop_strings_cut(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    deltas = list(engine.stream([Request("The if statement", params)]))
    full = deltas[-1].completion.text
    assert "".join(d.text for d in deltas) == full and len(deltas) > 1
    stop = full[len(full) // 2: len(full) // 2 + 2]
    stopped = engine.generate([Request("The if statement", SamplingParams(max_new_tokens=40, temperature=0,
                                                                          stop=[stop]))])[0]
    assert stopped.text == full[:full.find(stop)] and stopped.finish_reason == "stop"


def test_eos_ends_a_request(lm, tokenizer) -> None:
    with torch.no_grad():
        lm.head.weight[tokenizer.eos_token_id] = 50 * lm.norm(lm.embed.weight).mean(0)  # make EOS win everywhere
    out = Engine(lm, tokenizer).generate([Request("The if statement", GREEDY)])[0]
    assert out.token_ids == [] and out.finish_reason == "stop"


def test_bad_requests_fail_before_any_compute(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    with pytest.raises(RaytrainError, match="empty"):
        engine.generate([Request("The if", GREEDY), Request("", GREEDY)])
    with pytest.raises(RaytrainError, match="context window of 256 tokens"):
        engine.generate([Request([1] * 250, SamplingParams(max_new_tokens=7))])


def test_ignore_eos_generates_the_full_budget(lm, tokenizer) -> None:
    with torch.no_grad():
        lm.head.weight[tokenizer.eos_token_id] = 50 * lm.norm(lm.embed.weight).mean(0)
    out = Engine(lm, tokenizer).generate([Request("The if", SamplingParams(max_new_tokens=5, temperature=0,
                                                                          ignore_eos=True))])[0]
    assert out.token_ids == [tokenizer.eos_token_id] * 5 and out.finish_reason == "length"


def test_a_cancelled_request_stops_and_leaves_its_batch_unchanged(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    cancel, never = threading.Event(), threading.Event()
    never.set()
    long = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    requests = [Request("The if statement", long, cancel), Request("A class", GREEDY),
                Request("x", GREEDY, never)]
    seen: dict[int, int] = {}
    done = {}
    for delta in engine.stream(requests):
        seen[delta.index] = seen.get(delta.index, 0) + 1
        if delta.index == 0 and seen[0] == 3:
            cancel.set()
        if delta.completion is not None:
            done[delta.index] = delta.completion
    assert done[0].finish_reason == "cancelled" and 0 < len(done[0].token_ids) < 30
    assert done[2].finish_reason == "cancelled" and done[2].token_ids == []  # cancelled before it started
    assert done[1].token_ids == engine.generate([Request("A class", GREEDY)])[0].token_ids


def test_astream_yields_the_deltas_of_stream_and_stops_when_left(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    requests = [Request("The if statement", GREEDY), Request("A", SamplingParams(max_new_tokens=5, temperature=0))]

    async def collect(limit: int | None) -> list[Delta]:
        out: list[Delta] = []
        async for deltas in engine.astream(requests):
            assert deltas
            out += deltas
            if limit is not None and len(out) >= limit:
                break
        return out

    def key(d: Delta) -> tuple:
        return d.index, d.text, d.completion and (d.completion.token_ids, d.completion.finish_reason)

    expected = [key(d) for d in engine.stream(requests)]
    assert len(asyncio.run(collect(1))) >= 1  # leaving early must not wedge the engine thread
    assert [key(d) for d in asyncio.run(collect(None))] == expected
    with pytest.raises(RaytrainError, match="empty"):
        asyncio.run(collect_bad(engine))


async def collect_bad(engine: Engine) -> None:
    async for _ in engine.astream([Request("", GREEDY)]):
        pass
