"""benchmarks/lazyllm_ttft.py's paired interval on the accuracy difference (Newcombe's method 10): it behaves as an
interval on a difference should and covers the true difference about 95% of the time on paired samples."""

from __future__ import annotations

import argparse
import importlib.util
import random

import pytest
import torch

from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.lazyllm import LazyConfig
from raytrain.infer.sampling import SamplingParams
from raytrain.models.decoder import DecoderConfig, LayerScaling, build_decoder
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("lazyllm_ttft", REPO / "benchmarks" / "lazyllm_ttft.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def paired(cells: dict[str, int]) -> tuple[list[bool], list[bool]]:
    """Outcomes (baseline, other) from counts of both right (a), baseline only (b), other only (c), neither (d)."""
    pairs = {"a": (True, True), "b": (True, False), "c": (False, True), "d": (False, False)}
    rows = [pairs[k] for k, n in cells.items() for _ in range(n)]
    return [x for x, _ in rows], [y for _, y in rows]


def test_the_interval_holds_the_estimate_and_flips_with_the_order() -> None:
    full, lazy = paired({"a": 150, "b": 14, "c": 4, "d": 32})
    low, high = bench.paired_difference_ci(full, lazy)
    assert low < (4 - 14) / 200 < high < 0  # 10 more losses than gains out of 200: a significant drop
    assert bench.paired_difference_ci(lazy, full) == pytest.approx([-high, -low])
    same_low, same_high = bench.paired_difference_ci(full, full)
    assert same_low < 0 < same_high and same_high - same_low < 0.05  # no change seen: narrow, never empty
    wide_low, wide_high = bench.paired_difference_ci(*paired({"a": 10, "b": 3, "c": 2, "d": 5}))
    assert -1 <= wide_low < -0.2 and 0.15 < wide_high <= 1  # 20 questions: a wide interval


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    probs = {"a": 0.74, "b": 0.08, "c": 0.03, "d": 0.15}  # true difference c - b = -0.05
    covered = 0
    for _ in range(1000):
        draws = rng.choices(list(probs), weights=list(probs.values()), k=200)
        low, high = bench.paired_difference_ci(*paired({k: draws.count(k) for k in probs}))
        covered += low <= -0.05 <= high
    assert 0.93 <= covered / 1000 <= 0.975


def test_the_accuracy_engines_run_their_schedule_even_where_it_measures_slower(lm, tokenizer, monkeypatch) -> None:
    """A schedule that the engine would skip as no faster must still prune here, or its accuracy is full prefill's."""
    monkeypatch.setattr("raytrain.infer.engine.pays_off", lambda *args: False)
    monkeypatch.setattr("raytrain.infer.lazyllm.pays_off", lambda *args: False)
    full = Engine(lm, tokenizer, EngineConfig(max_batch_size=1))
    engine = bench.lazy_engines(full, ["lazy_0.3/0.6/0.9_keep0.4"])["lazy_0.3/0.6/0.9_keep0.4"]
    prompt = torch.randint(4, 512, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    done = engine.generate([Request(prompt, SamplingParams(max_new_tokens=2, temperature=0))])[0]
    assert 0 < done.prompt_fraction_computed < 1
    assert bench.SCHEDULES["lazy_0.3/0.6/0.9_keep0.4"].never_slower  # the shared presets are left as they were


def test_answer_kept_says_whether_the_code_tokens_reach_the_last_layer(lm, tokenizer) -> None:
    needle = tokenizer.encode("4821", add_special_tokens=False)
    prompt = [*torch.randint(4, 512, (30,), generator=torch.Generator().manual_seed(1)).tolist(), *needle, 7, 8, 9]

    def engine(keep: float) -> Engine:
        config = LazyConfig(layers={1: keep, 2: keep, 3: keep}, never_slower=False, min_prompt_tokens=1)
        return Engine(lm, tokenizer, EngineConfig(max_batch_size=1, lazy=True, lazyllm=config))

    assert bench.answer_kept(engine(1.0), prompt, "4821") is True  # nothing pruned
    assert bench.answer_kept(engine(0.03), prompt, "4821") is False  # one token survives: the last
    assert bench.answer_kept(engine(1.0), prompt[:30], "4821") is None  # the code is not in the prompt


def test_eval_prompts_past_the_context_window_are_dropped_not_raised(tokenizer, capsys) -> None:
    """At a target as long as the window some generated prompts run past it (the filler's length varies by whole
    documents); they are left out and the set still holds the questions asked for, each with room for the answer."""
    cfg = DecoderConfig(name="window", vocab_size=512, d_model=32, n_layers=1, head_dim=16, max_seq_len=1160,
                        layer_scaling=LayerScaling(gqa_group=2, ffn_divisor=32))
    engine = Engine(build_decoder(cfg).eval(), tokenizer, EngineConfig(max_batch_size=1))
    args = argparse.Namespace(eval_dir=None, seed=0, questions=5, accuracy_lengths=[1160])
    questions = bench.eval_sets(args, engine, "raw", max_new=6)[1160]
    dropped = int(capsys.readouterr().err.split(":")[1].split()[0])
    assert dropped > 0 and len(questions) == 5
    assert all(len(ids) <= engine.context_window - 6 for ids, _ in questions)
    assert all(code.isdigit() for _, code in questions)
