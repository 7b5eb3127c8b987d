"""benchmarks/superposition.py's speed mode (`--shape`) on CPU: a random-weight model of a decode.py shape with the
tokenizer's vocabulary; every method decodes exactly --max-new-tokens; warm requests take every document from the path
cache and cold ones none; and the JSON line's ratios are the naive figures over each method's, of the same run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("superposition_bench", REPO / "benchmarks" / "superposition.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

COLOURS = ["red", "blue", "green", "white", "black", "grey"]


def test_speed_mode_line(tmp_path, tokenizer, monkeypatch, capsys) -> None:
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    docs = [f"The code of the {c} falcon is {1000 + 7 * i}. It {'flies' * (i + 1)}." for i, c in enumerate(COLOURS)]
    asked = [{"question": f"What is the code of the {c} falcon?", "answer": "", "gold": [i]}
             for i, c in ((0, "red"), (3, "white"))]
    monkeypatch.setattr(bench, "question_sets", lambda *args: [(docs, asked)])  # short documents: a fast run
    monkeypatch.setattr(sys, "argv", ["superposition.py", "--shape", "tiny", "--device", "cpu", "--checkpoint",
                                      str(tmp_path / "tokenizer"), "--top-k", "1,2", "--max-new-tokens", "5",
                                      "--repeats", "2", "--sets", "1"])
    bench.main()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert line["benchmark"] == "superposition_speed" and line["command"].startswith("python ") and line["time"]
    assert line["config"]["model"]["vocab_size"] == len(tokenizer) and line["config"]["model"]["d_model"] == 128
    naive, results = line["baseline"]["naive"], line["results"]
    assert set(results) == {"superposition_top1_warm", "superposition_top1_cold", "superposition_top2_warm",
                            "superposition_top2_cold", "prompt_cache_warm", "prompt_cache_cold"}
    assert not any("accuracy" in key for r in (naive, *results.values()) for key in r)  # random weights
    for name, r in {"naive": naive, **results}.items():
        assert r["timed_requests"] == len(asked) * 2 and r["generated_tokens"] == 5, name
        assert 0 < r["ttft_s"] < r["time_to_answer_s"], name
        assert r["flops_ttft_total"] < r["flops_answer_total"] and r["flops_ttft_critical"] <= r["flops_ttft_total"]
        assert r["decode_step_ms"] > 0 and all(ms > 0 for ms in r["ttft_steps_ms"]), name
    for k in (1, 2):
        warm, cold = results[f"superposition_top{k}_warm"], results[f"superposition_top{k}_cold"]
        assert warm["paths"] == len(docs) and warm["cached_paths"] == len(docs) and cold["cached_paths"] == 0
        assert cold["flops_ttft_total"] > warm["flops_ttft_total"]  # a cold request also computes its documents
        assert warm["context_tokens"] == cold["context_tokens"] < naive["prompt_tokens"]
        assert cold["ttft_aten_ops"] > warm["ttft_aten_ops"] > 0  # a cold request also runs its documents' forward
        # steps to the first token: naive RAG's prefill; warm, the query copies', then the postamble's with the
        # first token; cold, the preamble's and the documents' forwards before those
        assert len(naive["ttft_steps_ms"]) == 1 and len(warm["ttft_steps_ms"]) == 2 and len(cold["ttft_steps_ms"]) == 4
    assert results["superposition_top1_warm"]["context_tokens"] < results["superposition_top2_warm"]["context_tokens"]
    pc_warm, pc_cold = results["prompt_cache_warm"], results["prompt_cache_cold"]
    assert pc_warm["cached_paths"] == len(docs) and pc_cold["cached_paths"] == 0
    # every document once and the query once: the naive prompt's tokens; warm, one forward (query and postamble),
    # cold the preamble's and the documents' before it
    assert pc_warm["context_tokens"] == pc_cold["context_tokens"] == naive["prompt_tokens"]
    assert len(pc_warm["ttft_steps_ms"]) == 1 and len(pc_cold["ttft_steps_ms"]) == 3
    assert pc_cold["flops_ttft_total"] > pc_warm["flops_ttft_total"] and pc_warm["flops_ttft_total"] < naive[
        "flops_ttft_total"]
    assert naive["flops_ttft_critical"] == naive["flops_ttft_total"]
    for name, ratio in line["ratios"].items():
        r = results[name]
        assert ratio["ttft"] == pytest.approx(naive["ttft_s"] / r["ttft_s"])
        assert ratio["time_to_answer"] == pytest.approx(naive["time_to_answer_s"] / r["time_to_answer_s"])
        for key in ("flops_ttft_total", "flops_ttft_critical", "flops_answer_total", "flops_answer_critical"):
            assert ratio[key] == pytest.approx(naive[key] / r[key]), (name, key)
    assert line["ratio"] == line["ratios"]["superposition_top1_warm"]["time_to_answer"]
    assert line["config"]["prompt_cache"] is True


def test_speed_methods_leave_the_prompt_cache_out_when_asked() -> None:
    assert set(bench.speed_methods([1], prompt_cache=False)) == {"naive", "superposition_top1_warm",
                                                                 "superposition_top1_cold"}
    assert bench.speed_methods([2], prompt_cache=True)["prompt_cache_cold"] == ("pc_cold", None)


def test_attenuation_adds_attenuated_top_k_for_k_above_one() -> None:
    args = argparse.Namespace(top_k=[1, 2, 4], attenuation=0.01)
    methods = bench.methods(args, multihop=False)
    assert {name for name in methods if name.endswith("_attenuated")} == {"superposition_top2_attenuated",
                                                                          "superposition_top4_attenuated"}
    assert methods["superposition_top4_attenuated"] == {"engine": "att", "top_k": 4}
    plain = bench.methods(argparse.Namespace(top_k=[2], attenuation=None), multihop=False)
    assert not any(name.endswith("_attenuated") for name in plain)


@pytest.mark.parametrize("doc_words", [28, 100])
def test_question_sets_document_length(doc_words) -> None:
    """`--doc-words` sets every document's length (the fact sentence included) and keeps 20-50 documents a set, with
    each asked fact in its gold document."""
    for docs, asked in bench.question_sets(3, 2, False, 0, doc_words):
        assert 20 <= len(docs) <= 50
        assert all(abs(len(d.split()) - doc_words) <= 3 for d in docs)
        assert all(f"is {a['answer']}." in docs[a["gold"][0]] for a in asked)


def test_answer_line_is_the_first_line_with_a_digit() -> None:
    assert bench.answer_line("The code of the azure canyon is:\n6796.\nThe code") == "6796."
    assert bench.answer_line("The code of the jade otter is 4821.\nIt is 1234.") == "The code of the jade otter is 4821."
    assert bench.answer_line("The answer:\n\nNone") == "The answer:"


def test_refusal_names_the_method_whose_prompt_does_not_fit(micro_model, tokenizer) -> None:
    """A question that some method's engine cannot hold (every path kept: all documents plus a query copy per path,
    past the 64-token window) is refused before any compute, naming that method; one that fits is not."""
    from dataclasses import replace

    from raytrain.infer.engine import Engine, EngineConfig, Request
    from raytrain.infer.forkjoin import ForkJoinPrompt
    from raytrain.infer.sampling import SamplingParams
    from raytrain.infer.superposition import SuperpositionConfig

    engines = {"naive": Engine(micro_model, tokenizer, EngineConfig(max_batch_size=1)),
               "sp": Engine(micro_model, tokenizer, EngineConfig(max_batch_size=1,
                                                                 superposition=SuperpositionConfig(enabled=True)))}
    how = {"naive": {"engine": "naive", "top_k": None}, "superposition_all_paths": {"engine": "sp", "top_k": 0}}
    params = SamplingParams(max_new_tokens=16, temperature=0)

    def requests(doc_tokens: int) -> dict:
        prompt = ForkJoinPrompt([1, 2, 3, 4], [[10 + d] * doc_tokens for d in range(4)], [5, 6, 7, 8], [9, 9])
        return {name: Request(params=params, forkjoin=replace(prompt, superpose=h["engine"] != "naive",
                                                                     top_k=h["top_k"])) for name, h in how.items()}

    refused = bench.refusal(engines, requests(8), how)  # flat 42 + 16 fits; 4 x (8 + 4) + 6 + 16 = 70 does not
    assert refused is not None and refused.startswith("superposition_all_paths:") and "context window" in refused
    assert bench.refusal(engines, requests(3), how) is None


def test_warm_prefill_operators_do_not_grow_with_paths_times_layers() -> None:
    """The host work of a warm superposed prefill (what runs eagerly on a GPU) grows by a few operators per path, not
    by a few per path and layer: segments keep every layer's KV in one tensor (KVLayout). On 16 layers each path cost
    39 more operators before (2 clones per layer), now 8 (its rows, positions and one clone)."""
    import torch

    from raytrain.models.decoder import DecoderConfig, build_decoder
    from tests.infer.test_superposition import random_prompt, superposer

    torch.manual_seed(0)
    deep = build_decoder(DecoderConfig(name="deep", vocab_size=512, d_model=32, n_layers=16, head_dim=8, q_heads=4,
                                       kv_heads=2, ffn_dim=64, max_seq_len=256, qk_norm=False)).eval()

    def warm_ops(documents: int) -> int:
        sp = superposer(deep, top_k=1)
        prompt = random_prompt([6] * documents, seed=documents)
        sp.prefill(prompt)  # the documents cached
        with bench.OpCounter() as counter:
            sp.prefill(prompt)
        return counter.ops

    per_path = (warm_ops(8) - warm_ops(4)) / 4
    assert 0 < per_path < len(deep.layers)
