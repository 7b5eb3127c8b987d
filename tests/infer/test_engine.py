"""The engine: equals step-by-step full recomputation (raytrain and a Hugging Face Llama), batching is invisible,
streaming and stop strings are exact, bad requests fail before any compute."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raytrain.config import RaytrainError
from raytrain.infer.engine import Completion, Delta, Engine, EngineConfig, Request, pack_groups
from raytrain.infer.model_runner import ModelRunner, bucket, geometric_buckets
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


# ---- continuous batching ----------------------------------------------------------------------------------------

def run_staggered(engine: Engine, requests: list[Request], arrivals: list[int]) -> list[Completion]:
    """Add request i before step arrivals[i]; step until every request is done."""
    done: dict[int, Completion] = {}

    def sink(index: int):
        return lambda items: done.update({index: d.completion for d in items if d.completion is not None})

    step = 0
    while len(done) < len(requests):
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(requests[i], sink(i), i)
        engine.step()
        step += 1
    return [done[i] for i in range(len(requests))]


STAGGERED = ["The if statement", "A class definition is an executable statement that", "x",
             "Assignment statements are used to (re)bind names to values and to modify attributes or items of "
             "mutable objects", "import"]


def staggered_requests(engine: Engine) -> list[Request]:
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (9, 4, 12, 6, 7)]
    params[2] = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    params[4] = SamplingParams(max_new_tokens=7, temperature=1.0, top_k=30, repetition_penalty=1.3, seed=5)
    return [Request(engine.encode(Request(p)), q) for p, q in zip(STAGGERED, params)]


@pytest.mark.parametrize("family, overlap", [("raytrain", False), ("raytrain", True), ("llama", False)])
def test_requests_arriving_at_staggered_steps_equal_each_run_alone(family, overlap, lm, tokenizer, tmp_path) -> None:
    """Three slots for five requests (one waits for a slot), prompts chunked 8 tokens a step while others decode;
    with `overlap` (the GPU default) each step's host work runs one step late."""
    model = lm if family == "raytrain" else llama(tmp_path, tokenizer)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=3, max_step_tokens=8, overlap=overlap))
    requests = staggered_requests(engine)
    together = run_staggered(engine, requests, [0, 1, 1, 3, 6])
    alone = [Engine(model, tokenizer).generate([r])[0] for r in requests]
    assert [c.token_ids for c in together] == [a.token_ids for a in alone]
    assert max(engine.decode_rows) == 3 and sorted(engine.scheduler.free_slots) == [0, 1, 2]


def llama(tmp_path, tokenizer) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, rope_theta=5000.0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return Engine.from_checkpoint(tmp_path).model


def test_a_long_prefill_never_stalls_running_decodes(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer, EngineConfig(max_step_tokens=8))
    running = engine.add_request(Request("x", SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)),
                                 lambda items: None)
    engine.step()  # its prefill and first token
    engine.add_request(Request([5] * 100, SamplingParams(max_new_tokens=2, temperature=0)), lambda items: None)
    lengths = []
    for _ in range(14):  # 100 prompt tokens, at most 7 a step beside the decode row
        engine.step()
        lengths.append(len(running.output))
    assert lengths == list(range(2, 16))  # a token every step
    assert engine.scheduler.running[1].computed == 98


@pytest.mark.parametrize("overlap", [False, True])
def test_cancelling_frees_the_slot_for_a_waiting_request(overlap, lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer, EngineConfig(max_batch_size=1, overlap=overlap))
    cancel = threading.Event()
    long = Request("The if statement", SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True), cancel)
    short = Request("A class", GREEDY)
    done = {}
    for delta in engine.stream([long, short]):
        if delta.index == 0 and not cancel.is_set():
            assert engine.scheduler.waiting  # the short request waits for the only slot
            cancel.set()
        if delta.completion is not None:
            done[delta.index] = delta.completion
    assert done[0].finish_reason == "cancelled" and len(done[0].token_ids) < 100
    assert done[1].token_ids == Engine(lm, tokenizer).generate([Request("A class", GREEDY)])[0].token_ids


def test_the_kv_budget_sets_the_slots_and_oversized_requests_fail_before_any_compute(lm, tokenizer) -> None:
    per_slot = (128 + 1) * 2 * sum(b.attn.n_kv for b in lm.layers) * 16 * 4  # fp32 keys and values
    engine = Engine(lm, tokenizer, EngineConfig(max_batch_size=8, max_model_len=128, kv_memory_gb=3.5 * per_slot / 2 ** 30))
    assert engine.n_slots == 3 and engine.runner.cache.keys[0].shape[0] == 3
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=5, temperature=0)) for p in STAGGERED])
    assert len(outs) == 5 and max(engine.decode_rows) <= 3
    steps = engine.steps
    with pytest.raises(RaytrainError, match="context window of 128"):
        engine.generate([Request("x", GREEDY), Request([7] * 120, SamplingParams(max_new_tokens=9))])
    assert engine.steps == steps and not engine.has_work()
    with pytest.raises(RaytrainError, match="kv_memory_gb"):
        Engine(lm, tokenizer, EngineConfig(max_model_len=128, kv_memory_gb=0.5 * per_slot / 2 ** 30))
    with pytest.raises(RaytrainError, match=r"token ids must be integers in \[0, 512\)"):
        engine.encode(Request([3, 512]))


class HostReads:
    """Counts reads of device values by the host: item/bool/int/float (`_local_scalar_dense`), tolist, numpy, cpu."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def method(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return method


def test_a_decode_step_reads_the_device_once(lm, tokenizer, monkeypatch) -> None:
    engine = Engine(lm, tokenizer, EngineConfig(max_batch_size=4))
    for i, prompt in enumerate(STAGGERED[:4]):
        params = SamplingParams(max_new_tokens=20, temperature=0.7 * (i % 2), top_p=0.9, repetition_penalty=1.2,
                                seed=i, ignore_eos=True)
        engine.add_request(Request(prompt, params), lambda items: None, i)
    engine.step()  # prefills
    reads = HostReads(monkeypatch)
    for _ in range(5):
        engine.step()
    assert reads.count == 5 and engine.decode_rows[4] == 5


def test_a_request_submitted_while_others_run_joins_their_batch(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    long = Request("The if statement", SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True))
    late = Request("A class", GREEDY)

    async def both() -> tuple[str, str]:
        first = engine.submit(long)
        texts = ["".join([(await first.__anext__()).text for _ in range(3)]), ""]

        async def rest_of_first() -> None:
            async for delta in first:
                texts[0] += delta.text

        async def second() -> None:
            async for delta in engine.submit(late):
                texts[1] += delta.text

        await asyncio.gather(rest_of_first(), second())
        return texts[0], texts[1]

    long_text, late_text = asyncio.run(both())
    assert late_text == engine.generate([late])[0].text and long_text == engine.generate([long])[0].text
    assert engine.decode_rows[2] > 0


@pytest.mark.parametrize("static_tokens", [0, 512])  # right-padded to the longest; padded to a static bucket
def test_a_packed_prefill_writes_each_slot_and_logit_as_one_prompt_alone(lm, static_tokens) -> None:
    torch.manual_seed(3)
    slots = [6, 1, 3, 0, 4]
    prompts = [torch.randint(4, 512, (n,)).tolist() for n in (11, 4, 17, 1, 9)]
    packed = ModelRunner(lm, 8, 64, cuda_graphs=False, static_prefill_tokens=static_tokens)
    alone = ModelRunner(lm, 8, 64, cuda_graphs=False)
    logits = packed.prefill_packed(slots, prompts)
    for row, (slot, prompt) in enumerate(zip(slots, prompts)):
        torch.testing.assert_close(logits[row], alone.prefill(slot, prompt, 0)[0], rtol=1e-5, atol=1e-5)
        for layer in range(len(lm.layers)):
            for mine, theirs in ((packed.cache.keys, alone.cache.keys), (packed.cache.values, alone.cache.values)):
                torch.testing.assert_close(mine[layer][slot, :, :len(prompt)], theirs[layer][slot, :, :len(prompt)])
    assert logits.shape[0] == len(prompts)
    for slot in (2, 5, 7):  # the slots nobody prefilled
        assert not packed.cache.keys[0][slot].any()
    if static_tokens:
        assert packed.prefill_shape(len(prompts), 17) == (6, 24)  # a padding row, written to the scratch slot
        assert packed.cache.keys[0][packed.cache.scratch].any()


def test_a_packed_prefill_past_the_static_budget_runs_as_it_comes(lm) -> None:
    runner = ModelRunner(lm, 8, 256, cuda_graphs=False, static_prefill_tokens=128)
    assert runner.prefill_shape(4, 30) == (4, 32) and runner.prefill_shape(5, 30) is None
    assert runner.prefill_shape(1, 200) is None and runner.prefill_lengths[-1] == 256


def test_static_prefill_buckets_pad_at_most_by_half_and_reach_the_limit() -> None:
    for low, high in ((1, 64), (16, 2050)):
        buckets = geometric_buckets(low, high)
        assert buckets[0] == low and buckets[-1] == high and len(buckets) <= 2 * high.bit_length()
        assert all(bucket(n, buckets) <= 1.5 * n for n in range(low, high + 1))


def test_static_prefill_through_the_engine_gives_the_tokens_of_eager_prefill(lm, tokenizer, monkeypatch) -> None:
    """Padded prompts leave KV past their end that their decode steps must overwrite before reading it."""
    requests = staggered_requests(Engine(lm, tokenizer)) + [Request("one two three " * 30, GREEDY)]
    config = EngineConfig(max_batch_size=4, max_step_tokens=64)
    eager = Engine(lm, tokenizer, config).generate(requests)
    monkeypatch.setattr(Engine, "_static_prefill_tokens", lambda self: 128)
    static = Engine(lm, tokenizer, config)
    assert static.runner.cache.scratch == 4
    assert [c.token_ids for c in static.generate(requests)] == [c.token_ids for c in eager]


def test_a_burst_of_prompts_prefills_in_packed_groups_with_the_tokens_of_one_at_a_time(lm, tokenizer,
                                                                                      monkeypatch) -> None:
    forwards = []
    original = ModelRunner.prefill_packed
    monkeypatch.setattr(ModelRunner, "prefill_packed",
                        lambda self, slots, chunks: forwards.append(len(slots)) or original(self, slots, chunks))
    requests = staggered_requests(Engine(lm, tokenizer))
    burst = Engine(lm, tokenizer, EngineConfig(max_batch_size=5)).generate(requests)
    assert sum(forwards) == 5 and len(forwards) < 5  # every prompt packed, fewer forwards than prompts
    unpacked = Engine(lm, tokenizer, EngineConfig(max_batch_size=5, packed_prefill=False)).generate(requests)
    assert [c.token_ids for c in burst] == [c.token_ids for c in unpacked]


def test_pack_groups_bound_the_padding_and_keep_every_chunk_once() -> None:
    chunks = [(object(), 0, n) for n in (3, 100, 9, 90, 1, 8, 10, 64)]
    groups = pack_groups(chunks, slack=1.5)
    assert sorted(map(id, [c for g in groups for c in g])) == sorted(map(id, chunks))
    for group in groups:
        sizes = [end for _, _, end in group]
        assert sizes == sorted(sizes, reverse=True) and len(group) * sizes[0] <= 1.5 * sum(sizes)
    assert len(groups) < len(chunks) and [end for _, _, end in groups[0]][:2] == [100, 90]


def test_requests_of_one_event_loop_wake_it_at_most_once_per_step(lm, tokenizer) -> None:
    """Each request has its own queue; the engine thread still posts a step's deltas to their loop in one wake-up."""
    engine = Engine(lm, tokenizer, EngineConfig(max_batch_size=4))
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    wakeups = []

    async def four_clients() -> list[str]:
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args, **kwargs: wakeups.append(1) or original(*args, **kwargs)

        async def client(prompt: str) -> str:
            return "".join([delta.text async for delta in engine.submit(Request(prompt, params))])

        return await asyncio.gather(*(client(p) for p in STAGGERED[:4]))

    steps = engine.steps
    texts = asyncio.run(four_clients())
    assert 0 < len(wakeups) <= engine.steps - steps
    assert texts == [engine.generate([Request(p, params)])[0].text for p in STAGGERED[:4]]


def test_starting_the_loop_does_not_wait_for_a_step_in_progress(lm, tokenizer) -> None:
    """A Serve replica's event loop calls `start_loop` for every request: it must never block on the step lock."""
    engine = Engine(lm, tokenizer)
    with engine._lock:  # a step in progress on the engine thread
        starter = threading.Thread(target=engine.start_loop)
        starter.start()
        starter.join(timeout=60)  # a deadlock detector: waiting on the lock would never return
        assert not starter.is_alive() and engine._loop_thread.is_alive()


def test_an_all_greedy_batch_decodes_through_the_argmax_step_and_a_mixed_one_does_not(lm, tokenizer,
                                                                                       monkeypatch) -> None:
    greedy_steps = []
    original = ModelRunner.decode_greedy
    monkeypatch.setattr(ModelRunner, "decode_greedy",
                        lambda self, *shape: greedy_steps.append(shape) or original(self, *shape))
    engine = Engine(lm, tokenizer, EngineConfig(max_batch_size=4))
    greedy = [Request(p, GREEDY) for p in STAGGERED[:3]]
    assert [c.token_ids for c in engine.generate(greedy)] == [
        full_recompute(lm, engine.encode(r), 12) for r in greedy]
    assert len(greedy_steps) == 11  # every decode step after the first tokens
    greedy_steps.clear()
    engine.generate([*greedy[:2], Request("x", SamplingParams(max_new_tokens=12, repetition_penalty=1.3,
                                                              temperature=0))])
    assert not greedy_steps  # a penalised row: the logits go through the sampling table


def test_greedy_tokens_survive_the_next_step_when_host_work_runs_a_step_late(lm, tokenizer) -> None:
    """With `overlap` a step's tokens are read after the next step ran, which rewrites the runner's greedy buffer."""
    requests = [Request(p, GREEDY) for p in STAGGERED[:3]]
    late = Engine(lm, tokenizer, EngineConfig(max_batch_size=3, overlap=True)).generate(requests)
    assert [c.token_ids for c in late] == [full_recompute(lm, Engine(lm, tokenizer).encode(r), 12) for r in requests]
