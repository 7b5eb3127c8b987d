"""Serving many adapters on one base: slots filled on first use, least recently used evicted, a batch mixing
adapters gives each row what that adapter alone gives, and adapters of another base or shape are refused; through the
engine, a continuous batch mixing adapters gives every request the tokens of its adapter alone, and requests whose
adapter does not fit in the slots wait rather than fail, also with staggered arrivals, adapters evicted beside
running rows and a cancellation; steps without adapter rows never touch the bank."""

from __future__ import annotations

import threading

import pytest
import torch

from raytrain.checkpoint.adapter import AdapterError, base_fingerprint, save_adapter
from raytrain.checkpoint.hf import load_pretrained, model_state, save_pretrained
from raytrain.data.tokenizer import to_files
from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.adapters import AdapterSlots, TooManyAdapters
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.sampling import SamplingParams
from raytrain.models.decoder import build_decoder
from raytrain.models.lora import LoRAConfig, adapter_state, apply_lora, lora_layers
from tests.conftest import preset


@pytest.fixture
def served(tokenizer, tmp_path):
    """A base, adapters a (rank 2), b (rank 4), c (rank 4) of it, and x of another base."""
    cfg = preset("afm_micro")
    bases = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        bases.append(save_pretrained(tmp_path / f"base{seed}", cfg, model_state(build_decoder(cfg)),
                                     to_files(tokenizer)))
    for name, rank, base in (("a", 2, bases[0]), ("b", 4, bases[0]), ("c", 4, bases[0]), ("x", 4, bases[1])):
        model = build_decoder(cfg)
        lora = LoRAConfig(rank=rank, alpha=2.0 * rank)
        apply_lora(model, lora)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(std=0.05)
        save_adapter(tmp_path / name, adapter_state(model), lora, base, base_fingerprint(base))
    return bases[0], tmp_path


def slots_on(base, root, slots: int = 2) -> AdapterSlots:
    model = load_pretrained(base).model
    return AdapterSlots(model, base, base_fingerprint(base), slots, LoRAConfig(rank=4), lambda name: root / name)


def test_a_mixed_batch_gives_each_row_its_adapter_and_slots_are_reused_lru(served) -> None:
    base, root = served
    server = slots_on(base, root)
    tokens = torch.randint(0, 512, (4, 8))
    ids = server.slots_of(["a", None, "b", "a"])
    assert ids == [0, -1, 1, 0] and server.loads == 2
    with server.selection.rows(torch.tensor(ids)):
        mixed = server.model(tokens)
    alone = {name: load_pretrained(base, adapter=root / name).model for name in ("a", "b")}
    expected = torch.stack([alone["a"](tokens[:1])[0], load_pretrained(base).model(tokens[1:2])[0],
                            alone["b"](tokens[2:3])[0], alone["a"](tokens[3:4])[0]])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)

    assert server.slots_of(["c"]) == [0] and server.loads == 3  # "a" was least recently used
    assert server.slots_of(["b"]) == [1] and server.loads == 3  # still loaded
    assert server.slots_of(["a"]) == [0] and server.loads == 4  # back, in the slot of "c" (now the LRU)
    with server.selection.rows(torch.tensor(server.slots_of(["a"]))):
        torch.testing.assert_close(server.model(tokens[:1]), alone["a"](tokens[:1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(TooManyAdapters, match="asks for 3 adapters; this replica holds 2"):
        server.slots_of(["a", "b", "c"])


def test_adapters_of_another_base_or_a_higher_rank_are_refused(served) -> None:
    base, root = served
    with pytest.raises(AdapterError, match="was trained on base .*base1"):
        slots_on(base, root).slots_of(["x"])
    narrow = load_pretrained(base).model
    server = AdapterSlots(narrow, base, base_fingerprint(base), 2, LoRAConfig(rank=2), lambda name: root / name)
    with pytest.raises(AdapterError, match="adapter b .* does not fit this replica's slots"):
        server.slots_of(["b"])


def greedy(engine: Engine, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in engine.generate([Request(p, params, adapter=a) for p, a in jobs])]


@pytest.mark.parametrize("slots", [2, 1])
def test_the_engine_batches_mixed_adapters_and_queues_those_that_do_not_fit(served, slots) -> None:
    """slots=2: a, b and the base decode in one batch; slots=1: a and b alternate, each waiting for the other's
    sequences to finish and evicting it, and every request still gets its adapter's tokens."""
    base, root = served
    prompts = [[1, 5 + i, 9, 3 * i + 2] for i in range(6)]
    names = ["a", "b", None, "a", "b", "a"]
    jobs = list(zip(prompts, names))
    expected = {name: greedy(Engine.from_checkpoint(base, adapter=root / name if name else None),
                             [(p, None) for p, n in jobs if n == name]) for name in ("a", "b", None)}
    engine = Engine.from_checkpoint(base, EngineConfig(max_batch_size=4), adapters={n: root / n for n in "abc"},
                                    adapter_slots=slots)
    got = greedy(engine, jobs)
    for name in ("a", "b", None):
        assert [g for g, (_, n) in zip(got, jobs) if n == name] == expected[name], name
    assert expected["a"] != expected["b"] != expected[None]  # the adapters change the tokens
    if slots == 2:
        assert engine.adapters.loads == 2 and max(engine.decode_rows) == 4  # mixed rows in one decode batch
    else:
        assert engine.adapters.loads == 5  # a, b, a, b, a: each admitted group loads its adapter again


def test_engine_adapters_are_checked_at_startup_and_per_request(served) -> None:
    base, root = served
    with pytest.raises(AdapterError, match=r"serve\.adapters\.x: adapter .* was trained on base .*base1"):
        Engine.from_checkpoint(base, adapters={"a": root / "a", "x": root / "x"}, adapters_key="serve.adapters")
    with pytest.raises(AdapterError, match=r"adapters\.gone: adapter .*gone: no such directory"):
        Engine.from_checkpoint(base, adapters={"gone": root / "gone"})
    with pytest.raises(ConfigError, match="lazy: LazyLLM .* takes no LoRA adapters"):
        Engine.from_checkpoint(base, EngineConfig(lazy=True), adapters={"a": root / "a"})
    engine = Engine.from_checkpoint(base, adapters={"a": root / "a"})
    with pytest.raises(RaytrainError, match="adapter 'b' is not one this engine serves"):
        engine.generate([Request([1, 2], adapter="b")])


def test_staggered_arrivals_evictions_and_a_cancellation_keep_every_row_on_its_adapter(served) -> None:
    """Requests arrive over several steps with different lengths, on 2 slots for 3 adapters: adapters are evicted
    and reloaded into slots while other rows keep decoding, KV slots are reused, and one request is cancelled
    mid-run. Every request's tokens (the cancelled one's as far as it got) are its adapter's alone, in float32
    exactly."""
    base, root = served
    prompts = [[1, 5 + i, 9, 3 * i + 2] for i in range(8)]
    arrivals = [(0, "a", 12), (0, None, 6), (1, "b", 4), (2, "c", 10), (3, "a", 8), (4, "b", 12), (6, "c", 5),
                (7, None, 9)]  # (step, adapter, new tokens) of request i
    alone = {name: greedy(Engine.from_checkpoint(base, adapter=root / name if name else None),
                          [(p, None) for p in prompts]) for name in ("a", "b", "c", None)}
    engine = Engine.from_checkpoint(base, EngineConfig(max_batch_size=4), adapters={n: root / n for n in "abc"},
                                    adapter_slots=2)
    cancel, done, step = threading.Event(), {}, 0

    def sink(items: list) -> None:
        for item in items:
            if isinstance(item, BaseException):
                raise item
            if item.completion is not None:
                done[item.index] = item.completion

    while step < len(arrivals) or engine.has_work():
        for i, (at, name, new) in enumerate(arrivals):
            if at == step:
                params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
                engine.add_request(Request(prompts[i], params, cancel=cancel if i == 4 else None, adapter=name), sink,
                                   i)
        engine.step()
        step += 1
        if step == 10:  # request 4 has 5 of its 8 tokens
            cancel.set()
    for i, (_, name, new) in enumerate(arrivals):
        tokens = done[i].token_ids
        assert tokens == alone[name][i][:len(tokens)], (i, name)
        assert len(tokens) == new or (i == 4 and done[i].finish_reason == "cancelled"), i
    assert 0 < len(done[4].token_ids) < 8  # cancelled mid-run, after some tokens
    # a, b; c evicts b while a decodes in the other slot; b comes back, evicting a, while c decodes
    assert engine.adapters.loads == 4 and max(engine.decode_rows) >= 3


def test_steps_without_adapter_rows_never_touch_the_bank(served) -> None:
    """A bank of NaNs: a LoRA term with scale 0 would still turn every row to NaN; rows on the base alone must give
    exactly the plain engine's tokens, so their steps (prefill and decode) run no LoRA term at all."""
    base, root = served
    jobs = [([1, 5 + i, 9, 3 * i + 2], None) for i in range(3)]
    engine = Engine.from_checkpoint(base, EngineConfig(max_batch_size=4), adapters={n: root / n for n in "ab"})
    with torch.no_grad():
        for layer in lora_layers(engine.model).values():
            layer.lora_A.fill_(float("nan"))
    assert greedy(engine, jobs) == greedy(Engine.from_checkpoint(base), jobs)
