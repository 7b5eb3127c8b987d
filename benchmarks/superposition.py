"""Superposition prompting against naive RAG: SmolLM2-135M-Instruct, zero-shot, procedural multi-document QA.

Questions come from the retrieval task's generator (`raytrain/data/retrieval.py`): document sets of 20-50 documents,
one fact per document, the asked key in exactly one of them, several questions per set (so document KV computed for
one question is reused by the next: the path cache's case), and a multi-hop variant (the question asks for the code of
a key's owner: one document names the owner, another gives the owner's code). Every method reads the same segments
(`raytrain/infer/rag.py`) through the same engine, greedy, at batch 1:
- naive RAG: every document in one prompt;
- superposition without pruning (every path kept), and with top-k pruning;
- the Prompt Cache baseline (`superposition.method=prompt_cache`: documents cached as modules that attend only to
  themselves, one query over all of them, nothing pruned);
- on the multi-hop set also iterative superposition (hops=2: the best path moves into the prefix, then top-k);
- with `--attenuation T`, the official code's attenuation ablation: top-k for each k > 1 with the kept paths' keys
  biased by (score - best) / T (`superposition.attenuation`; at k = 1 it changes nothing).

Documents are `--doc-words` words long (28 by default, about 50 tokens; 100 is the paper's NaturalQuestions passage
length). A question that some method's engine cannot hold (a prompt past the context window) is skipped for every
method and counted (`skipped_questions`), so every method answers the same questions.

Figures per method: accuracy (the gold code appears in the answer: its first line, or with `--stop none` its first
line that holds a digit), retrieval accuracy (the gold document among the
kept ones), time to answer (wall clock from request to last token, median), for superposition split into warm
(document KV from the path cache, the paper's setting) and cold (documents computed in the request), and FLOPs per
answer. FLOPs are theoretical (from the segment lengths: 2 per weight per token, attention over the keys each token
sees, the output head where logits are needed; total over all paths, and along the critical path with parallel
paths counted once, as the paper's accounting of path parallelism) and measured (torch's FlopCounterMode over the
same requests: what ran, padding and masked attention included). `ratio` is naive / superposition top-k warm time.
`--theoretical-only` counts the theoretical FLOPs of every question without running the model (the gold document
kept first), so the FLOP ratio covers the whole question set where CPU time allows only a few answered questions.

    python benchmarks/superposition.py --device cpu --sets 25 --questions-per-set 4            # CPU evidence
    python benchmarks/superposition.py --device cuda --sets 50 --questions-per-set 4 --multihop-sets 25   # H200
    python benchmarks/superposition.py --theoretical-only --sets 50 --questions-per-set 4 --multihop-sets 50

Speed mode (`--shape NAME`, a Llama shape of `benchmarks/decode.py`: `llama2_7b`, `tinyllama_1_1b`, `tiny`): the
paper's speed case, a model whose prefill compute dominates. The decoder of that shape is built with random weights
(decode.py's `build`, the vocabulary resized to the tokenizer's; bf16 on CUDA, fp32 on CPU) and reads the same
single-hop questions, tokenized by `--checkpoint`'s tokenizer and chat template. Answers are forced to exactly
`--max-new-tokens` tokens (greedy, `ignore_eos`, no stop string), so every method decodes the same number of tokens;
with random weights accuracy means nothing and is not reported. Methods: naive RAG, and superposition top-k warm
(document KV from the path cache) and cold (a second engine with `cache_policy=off`: preamble and documents computed
in the request), and the Prompt Cache baseline warm and cold. For every question each method runs once untimed
(CUDA graphs of new shapes captured; warm: its documents cached), then `--repeats` timed runs. Figures: median time to first token (`Completion.ttft_s`: from the
request joining the engine to its first token on the host, the same path for both methods) and time to answer (wall
clock around `Engine.generate`, the device synchronised before and after), naive / superposition ratios of both,
beside the theoretical FLOP ratios (to the first token, and to the whole answer; total, and critical path), and the
ATen operators a request dispatches from the host to its first token (`ttft_aten_ops`, one more untimed run cut to one
token: kernel launches on a GPU, where a replayed CUDA graph counts none). Where the time goes: two more untimed runs
time every engine step with the device synchronised around it (`ttft_steps_ms`: the steps of a one-token request, one
per batched forward of a superposed prefill, medians step by step; `decode_step_ms`: the median step after them).
`--shape llama2_7b_narrow` has the 7B's 32 layers and 32 heads at width 256: its host work per request is the 7B's,
its compute small.

    python benchmarks/superposition.py --shape llama2_7b --device cuda --checkpoint /tmp/smollm2 --sets 8 \
        --questions-per-set 2 --top-k 1,2 --max-new-tokens 16 --minutes 3                     # H200
    python benchmarks/superposition.py --shape tiny --device cpu --checkpoint /tmp/smollm2 --sets 1 \
        --questions-per-set 2 --top-k 1 --max-new-tokens 8 --threads 2                      # CPU smoke run
    python benchmarks/superposition.py --theoretical-only --shape llama2_7b --checkpoint /tmp/smollm2 --sets 50
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import sync  # noqa: E402
from raytrain.checkpoint.hf import read_model_config  # noqa: E402
from raytrain.config import RaytrainError  # noqa: E402
from raytrain.data.tokenizer import load_tokenizer  # noqa: E402
from raytrain.data.retrieval import (RetrievalConfig, _words, document_set, multihop_question,  # noqa: E402
                                     multihop_set)
from raytrain.infer.engine import Engine, EngineConfig, Request  # noqa: E402
from raytrain.infer.forkjoin import ForkJoinPrompt  # noqa: E402
from raytrain.infer.rag import forkjoin_prompt  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.infer.superposition import SuperpositionConfig  # noqa: E402
from raytrain.models.decoder import DecoderConfig  # noqa: E402

CHECKPOINT = "/work/models/smollm2-135m-instruct"
INSTRUCTION = "Each document gives the 4-digit code of one thing. Answer the question with that 4-digit number."
ANSWER_TOKENS = 14  # "The code of the silver eagle is 1018." and EOS or newline: what the model answers
SHAPE_CONTEXT = 8192  # --shape models' context: 50 documents of 100 words are ~7.9k tokens
FACT_WORDS = 8  # the generator's words per fact sentence ("The code of the silver falcon is 4821.")


def question_sets(n_sets: int, per_set: int, multihop: bool, seed: int, doc_words: int = 28
                  ) -> list[tuple[list[str], list[dict]]]:
    """[(documents, [{question, answer, gold: [document indices]}, ...]), ...]: 20-50 documents of `doc_words`
    words, one fact each."""
    cfg = RetrievalConfig(words=20 * doc_words, max_words=50 * doc_words, filler_words=doc_words - FACT_WORDS,
                          facts_per_doc=1)
    rng, filler, out = random.Random(seed), _words(), []
    for _ in range(n_sets):
        if multihop:
            docs, chains = multihop_set(rng, cfg, filler)
            asked = [{"question": multihop_question(k), "answer": v, "gold": [a, b]}
                     for k, _, v, a, b in rng.sample(chains, min(per_set, len(chains)))]
        else:
            docs, facts = document_set(rng, cfg, filler)
            asked = [{"question": f"What is the code of the {k}?", "answer": v,
                      "gold": [next(i for i, d in enumerate(docs) if f"the {k} is" in d)]}
                     for k, v in rng.sample(facts, per_set)]
        out.append((docs, asked))
    return out


# ---- FLOPs ---------------------------------------------------------------------------------------------------

def forward_flops(cfg: DecoderConfig, new: int, before: int, logits: int) -> float:
    """A forward of `new` tokens, token j seeing `before` + j + 1 keys, with `logits` rows of the output head."""
    shapes = cfg.layer_shapes()
    weights = sum(cfg.d_model * (s.q_heads + 2 * s.kv_heads) * cfg.head_dim + s.q_heads * cfg.head_dim * cfg.d_model
                  + 3 * cfg.d_model * s.ffn_dim for s in shapes)
    keys = new * before + new * (new + 1) / 2
    attention = 4 * sum(s.q_heads for s in shapes) * cfg.head_dim * keys
    return 2 * weights * new + attention + 2 * cfg.d_model * cfg.vocab_size * logits


def decode_flops(cfg: DecoderConfig, context: int, generated: int) -> float:
    return sum(forward_flops(cfg, 1, context + m, 1) for m in range(max(generated - 1, 0)))


def theoretical_flops(cfg: DecoderConfig, prompt: ForkJoinPrompt, kept: list[int] | None,
                      generated: int) -> dict[str, float]:
    """Naive: the flat prompt, then decoding. Superposition (warm): the query copies over p + d_i, the postamble
    over the kept context, decoding; cold adds the preamble and the documents (with their log-likelihoods).
    `critical` counts parallel paths once (the longest), as the paper's accounting of path parallelism does."""
    p, q, t = len(prompt.preamble), len(prompt.query), len(prompt.postamble)
    if kept is None:
        n = len(prompt.flat())
        total = forward_flops(cfg, n, 0, 1) + decode_flops(cfg, n, generated)
        return {"total": total, "critical": total}
    lengths = [len(d) for d in prompt.documents]
    context = p + sum(lengths[i] + q for i in kept)
    tail = forward_flops(cfg, t, context, 1) + decode_flops(cfg, context + t, generated)
    queries = [forward_flops(cfg, q, p + n, q - 1) for n in lengths]
    documents = [forward_flops(cfg, n, p, n - 1) for n in lengths]
    preamble = forward_flops(cfg, p, 0, 0)
    return {"total": sum(queries) + tail, "critical": max(queries) + tail,
            "cold_total": preamble + sum(documents) + sum(queries) + tail,
            "cold_critical": preamble + max(documents) + max(queries) + tail}


def prompt_cache_flops(cfg: DecoderConfig, prompt: ForkJoinPrompt, generated: int) -> dict[str, float]:
    """The Prompt Cache baseline, warm: the query and postamble over the preamble and every document, then decoding;
    cold adds the preamble and the documents, each computed alone without logits (all in parallel on the critical
    path)."""
    lengths = [len(d) for d in prompt.documents]
    context = len(prompt.preamble) + sum(lengths)
    tail = len(prompt.query) + len(prompt.postamble)
    warm = forward_flops(cfg, tail, context, 1) + decode_flops(cfg, context + tail, generated)
    modules = [forward_flops(cfg, n, 0, 0) for n in [len(prompt.preamble), *lengths]]
    return {"total": warm, "critical": warm, "cold_total": sum(modules) + warm, "cold_critical": max(modules) + warm}


def method_flops(cfg: DecoderConfig, method: str, prompt: ForkJoinPrompt, kept: list[int] | None,
                 generated: int) -> dict[str, float]:
    """`theoretical_flops`, or `prompt_cache_flops` for the baseline's engines (named pc...)."""
    if method.startswith("pc"):
        return prompt_cache_flops(cfg, prompt, generated)
    return theoretical_flops(cfg, prompt, kept, generated)


def measured_flops(engine: Engine, request: Request) -> float:
    """FLOPs of the request as it runs (torch's counter, with SDPA's fused kernels counted as attention over every
    query head: grouped KV heads are attended by several query heads each, which torch's formula rejects)."""
    aten = torch.ops.aten
    kernels = [aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
               aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention]
    with FlopCounterMode(display=False, custom_mapping={k: grouped_sdpa_flops for k in kernels}) as counter:
        engine.generate([request])
    return float(counter.get_total_flops())


def grouped_sdpa_flops(q: tuple, k: tuple, v: tuple, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Shapes (B, H, T, d): K and V counted with the query's heads."""
    return sdpa_flop_count(q, (*k[:1], q[1], *k[2:]), (*v[:1], q[1], *v[2:]))


# ---- the run -------------------------------------------------------------------------------------------------

class OpCounter(TorchDispatchMode):
    """Counts the ATen operators a request dispatches from the host, views left out (they launch no kernel): on a GPU
    each is a kernel launch, except inside a replayed CUDA graph, which dispatches none."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def ops_to_first_token(engine: Engine, request: Request) -> int:
    """ATen operators dispatched by `request` cut to its first token (the prefill's share: decode steps cost both
    methods alike)."""
    with OpCounter() as counter:
        engine.generate([replace(request, params=replace(request.params, max_new_tokens=1))])
    return counter.ops


def synced_steps_ms(engine: Engine, request: Request, device: str) -> list[float]:
    """Wall time (ms) of each engine step of `request`, the device synchronised around every step: where a request's
    time goes (a diagnostic: synchronising removes the overlap of host and device work that the timed runs keep)."""
    step, times = engine.step, []

    def timed_step() -> None:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))

    engine.step = timed_step
    try:
        engine.generate([request])
    finally:
        del engine.step  # the class's method again
    return times


def step_breakdown(engine: Engine, request: Request, device: str) -> dict[str, Any]:
    """The synced steps to the first token (a one-token request) and the median synced step after it."""
    first = synced_steps_ms(engine, replace(request, params=replace(request.params, max_new_tokens=1)), device)
    whole = synced_steps_ms(engine, request, device)
    return {"ttft_steps_ms": first, "decode_step_ms": statistics.median(whole[len(first):] or [0.0])}


def answer(engine: Engine, request: Request, device: str) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    done = engine.generate([request])[0]
    sync(device)
    return done, time.perf_counter() - start


def methods(args: argparse.Namespace, multihop: bool) -> dict[str, dict]:
    """name -> {engine: naive | sp | att | pc | hops2, top_k}. Single-hop: naive, top-k (attenuated too for k > 1
    with `--attenuation`), every path, Prompt Cache. Multi-hop: naive, top-k, Prompt Cache and two hops (the best path
    into the prefix, then the top-1)."""
    out = {"naive": {"engine": "naive", "top_k": None}}  # the first superposition method of a set computes its documents
    out |= {f"superposition_top{k}": {"engine": "sp", "top_k": k} for k in args.top_k}
    if args.attenuation is not None:
        out |= {f"superposition_top{k}_attenuated": {"engine": "att", "top_k": k} for k in args.top_k if k > 1}
    out["prompt_cache"] = {"engine": "pc", "top_k": None}
    if multihop:
        out["iterative_hops2_top1"] = {"engine": "hops2", "top_k": 1}
    else:
        out["superposition_all_paths"] = {"engine": "sp", "top_k": 0}
    return out


def answer_line(text: str) -> str:
    """The line that answers: the first one with a digit in it (with `--stop none` a model may write "... is:" and
    the code on the next line), else the first. With `--stop newline` the text is one line already."""
    lines = text.split("\n")
    return next((line for line in lines if any(ch.isdigit() for ch in line)), lines[0])


def run_set(args: argparse.Namespace, engines: dict[str, Engine], multihop: bool, deadline: float) -> dict[str, dict]:
    """Every method on every question of the task, set by set until the sets or the time budget run out."""
    tokenizer, cfg = engines["naive"].tokenizer, engines["naive"].model.cfg
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0,
                            stop=["\n"] if args.stop == "newline" else [])
    task_methods = methods(args, multihop)
    rows: dict[str, list[dict]] = {name: [] for name in task_methods}
    flops_left, skipped = args.flop_questions, 0
    for s, (docs, asked) in enumerate(question_sets(args.multihop_sets if multihop else args.sets,
                                                    args.questions_per_set, multihop, args.seed + multihop,
                                                    args.doc_words)):
        if s and time.monotonic() > deadline:
            break
        for item in asked:
            prompt = forkjoin_prompt(tokenizer, docs, item["question"], INSTRUCTION)
            requests = {name: Request(params=params, forkjoin=replace(prompt, superpose=how["engine"] != "naive",
                                                                       top_k=how["top_k"]))
                        for name, how in task_methods.items()}
            if (refused := refusal(engines, requests, task_methods)) is not None:
                skipped += 1  # every method skips it, so that the methods answer the same questions
                print(json.dumps({"set": s, "multihop": multihop, "skipped": refused}), file=sys.stderr, flush=True)
                continue
            for name, how in task_methods.items():
                request, fj = requests[name], requests[name].forkjoin
                engine = engines[how["engine"]]
                done, seconds = answer(engine, request, args.device)
                selection = done.superposition
                row = {"correct": item["answer"] in answer_line(done.text), "seconds": seconds,
                       "ttft_s": done.ttft_s, "tokens": len(done.token_ids), "prompt_tokens": done.prompt_tokens}
                if selection is not None:
                    found = set(selection.kept) | set(selection.moved)
                    row |= {"warm": selection.cached == selection.paths, "kept": len(selection.kept),
                            "retrieved": all(g in found for g in item["gold"])}
                if how["engine"] != "hops2":
                    kept = None if selection is None else selection.kept
                    row["flops"] = method_flops(cfg, how["engine"], fj, kept, len(done.token_ids))
                if flops_left > 0:
                    row["measured_flops"] = measured_flops(engine, request)  # warm: the documents are cached now
                rows[name].append(row)
                print(json.dumps({"set": s, "multihop": multihop, "method": name, "answer": done.text,
                                  "gold": item["answer"], **{k: v for k, v in row.items() if k != "flops"}}),
                      file=sys.stderr, flush=True)
            flops_left -= 1
    return {name: summary(r) | {"skipped_questions": skipped} for name, r in rows.items() if r}


def refusal(engines: dict[str, Engine], requests: dict[str, Request], how: dict[str, dict]) -> str | None:
    """Why some method's engine refuses its request before any compute (a prompt past the context window), or
    None."""
    for name, request in requests.items():
        try:
            engines[how[name]["engine"]].encode(request)
        except RaytrainError as e:
            return f"{name}: {e}"
    return None


def summary(rows: list[dict]) -> dict[str, Any]:
    def median(key: str, where=lambda r: True) -> float | None:
        values = [r[key] for r in rows if where(r)]
        return statistics.median(values) if values else None

    out = {"questions": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
           "time_to_answer_s": median("seconds"), "ttft_s": median("ttft_s"),
           "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rows)}
    if "warm" in rows[0]:
        out |= {"retrieval_accuracy": sum(r["retrieved"] for r in rows) / len(rows),
                "time_to_answer_warm_s": median("seconds", lambda r: r["warm"]),
                "time_to_answer_cold_s": median("seconds", lambda r: not r["warm"]),
                "cold_requests": sum(not r["warm"] for r in rows)}
    if "flops" in rows[0]:
        for key in rows[0]["flops"]:
            out[f"flops_{key}"] = statistics.mean(r["flops"][key] for r in rows)
    measured = [r["measured_flops"] for r in rows if "measured_flops" in r]
    if measured:
        out["measured_flops"] = statistics.mean(measured)
        out["measured_flops_questions"] = len(measured)
    return out


def ratios(results: dict[str, dict], baseline: dict[str, Any]) -> dict[str, dict]:
    """Naive over each method: time (warm, cold), theoretical FLOPs (total, critical path, cold) and measured."""
    out = {}
    for name, r in results.items():
        pairs = {"time_warm": ("time_to_answer_s", "time_to_answer_warm_s"),
                 "time_cold": ("time_to_answer_s", "time_to_answer_cold_s"),
                 "flops_theoretical_total": ("flops_total", "flops_total"),
                 "flops_theoretical_critical": ("flops_critical", "flops_critical"),
                 "flops_theoretical_cold_total": ("flops_total", "flops_cold_total"),
                 "flops_measured": ("measured_flops", "measured_flops")}
        out[name] = {k: baseline[a] / r[b] for k, (a, b) in pairs.items() if baseline.get(a) and r.get(b)}
    return out


def theoretical_sweep(args: argparse.Namespace, tokenizer: Any, cfg: DecoderConfig) -> dict[str, dict]:
    """Theoretical FLOPs of every question of the sets, no model run: naive against superposition keeping the gold
    document(s) first (then the lowest other indices) for each k, with ANSWER_TOKENS generated."""
    out = {}
    for task, n_sets, multihop in (("single_hop", args.sets, False), ("multihop", args.multihop_sets, True)):
        flops: dict[str, list[dict[str, float]]] = {}
        documents, doc_tokens = [], []
        for docs, asked in question_sets(n_sets, args.questions_per_set, multihop, args.seed + multihop,
                                         args.doc_words):
            for item in asked:
                prompt = forkjoin_prompt(tokenizer, docs, item["question"], INSTRUCTION)
                documents.append(len(docs))
                doc_tokens += [len(d) for d in prompt.documents]
                order = [*item["gold"], *(i for i in range(len(docs)) if i not in item["gold"])]
                kept = {"naive": None, "superposition_all_paths": order,
                        **{f"superposition_top{k}": sorted(order[:k]) for k in args.top_k}}
                for name, k in kept.items():
                    flops.setdefault(name, []).append(theoretical_flops(cfg, prompt, k, ANSWER_TOKENS))
        if not documents:
            continue
        means = {name: {key: statistics.mean(r[key] for r in rows) for key in rows[0]} for name, rows in flops.items()}
        naive = means.pop("naive")
        out[task] = {"questions": len(documents), "documents_per_question": statistics.mean(documents),
                     "tokens_per_document": statistics.mean(doc_tokens), "naive_flops": naive["total"],
                     **{name: {**m, "ratio_total": naive["total"] / m["total"],
                               "ratio_critical": naive["total"] / m["critical"],
                               "ratio_cold_total": naive["total"] / m["cold_total"]} for name, m in means.items()}}
    return out


# ---- speed mode: a random-weight model of a given shape ------------------------------------------------------

def shape_model(name: str, vocab: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The random-weight decoder of `benchmarks/decode.py`'s Llama shape `name` (its `build`), with a vocabulary of
    `vocab` entries (the tokenizer's) in place of the shape's."""
    from benchmarks.decode import LLAMA_SHAPES, build

    if name not in LLAMA_SHAPES:
        raise SystemExit(f"--shape {name}: not a Llama shape of benchmarks/decode.py ({', '.join(LLAMA_SHAPES)})")
    key = f"{name}_vocab{vocab}"
    LLAMA_SHAPES[key] = (*LLAMA_SHAPES[name][:5], vocab)  # build reads its shapes from this table
    model, hf = build(key, device, dtype, max_positions=SHAPE_CONTEXT)
    del hf  # the transformers copy it was converted from
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def speed_methods(top_k: list[int], prompt_cache: bool) -> dict[str, tuple[str, int | None]]:
    """name -> (engine, top_k): naive RAG, superposition top-k warm and cold for each k, and with `prompt_cache` the
    Prompt Cache baseline warm and cold."""
    out: dict[str, tuple[str, int | None]] = {"naive": ("naive", None)}
    for k in top_k:
        out |= {f"superposition_top{k}_warm": ("warm", k), f"superposition_top{k}_cold": ("cold", k)}
    if prompt_cache:
        out |= {"prompt_cache_warm": ("pc_warm", None), "prompt_cache_cold": ("pc_cold", None)}
    return out


def speed_row(engine_key: str, fj: ForkJoinPrompt, done: Any, seconds: float, cfg: DecoderConfig,
              max_new_tokens: int) -> dict[str, Any]:
    """One timed request: its times, what it computed, and its theoretical FLOPs to the first token and to the
    answer (total and critical path; a cold request's include its preamble and documents)."""
    selection = done.superposition
    if len(done.token_ids) != max_new_tokens:
        raise RuntimeError(f"{engine_key}: {len(done.token_ids)} tokens generated, not {max_new_tokens}")
    row = {"seconds": seconds, "ttft_s": done.ttft_s, "tokens": len(done.token_ids),
           "prompt_tokens": done.prompt_tokens}
    kept = None
    if selection is not None:
        expected = selection.paths if engine_key.endswith("warm") else 0
        if selection.cached != expected:
            raise RuntimeError(f"{engine_key}: {selection.cached} of {selection.paths} paths from the path cache")
        kept = selection.kept
        copies = 1 if engine_key.startswith("pc") else len(kept)  # Prompt Cache reads the query once
        row |= {"paths": selection.paths, "cached_paths": selection.cached, "kept": len(kept),
                "context_tokens": len(fj.preamble) + sum(len(fj.documents[i]) for i in kept)
                + copies * len(fj.query) + len(fj.postamble)}
    else:
        row["context_tokens"] = done.prompt_tokens
    prefix = "cold_" if engine_key.endswith("cold") else ""
    for part, generated in (("ttft", 1), ("answer", max_new_tokens)):
        flops = method_flops(cfg, engine_key, fj, kept, generated)
        row[f"flops_{part}_total"] = flops[f"{prefix}total"]
        row[f"flops_{part}_critical"] = flops[f"{prefix}critical"]
    return row


def speed_summary(rows: list[dict]) -> dict[str, Any]:
    out = {"timed_requests": len(rows), "ttft_s": statistics.median(r["ttft_s"] for r in rows),
           "time_to_answer_s": statistics.median(r["seconds"] for r in rows),
           "after_first_token_s": statistics.median(r["seconds"] - r["ttft_s"] for r in rows),
           "generated_tokens": statistics.mean(r["tokens"] for r in rows),
           "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in rows),
           "context_tokens": statistics.mean(r["context_tokens"] for r in rows),
           "ttft_aten_ops": statistics.median(r["ttft_aten_ops"] for r in rows),
           "ttft_steps_ms": median_steps([r["ttft_steps_ms"] for r in rows]),
           "decode_step_ms": statistics.median(r["decode_step_ms"] for r in rows)}
    if "paths" in rows[0]:
        out |= {"paths": statistics.mean(r["paths"] for r in rows),
                "cached_paths": statistics.mean(r["cached_paths"] for r in rows)}
    for key in ("flops_ttft_total", "flops_ttft_critical", "flops_answer_total", "flops_answer_critical"):
        out[key] = statistics.mean(r[key] for r in rows)
    return out


def median_steps(runs: list[list[float]]) -> list[float]:
    """Step by step medians over the runs of the most common step count."""
    count = statistics.mode(len(r) for r in runs)
    return [statistics.median(r[i] for r in runs if len(r) == count) for i in range(count)]


def speed_ratios(results: dict[str, dict], baseline: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Naive / method: measured TTFT and time to answer, and the theoretical FLOPs of each (naive's critical path
    is its total)."""
    keys = {"ttft": "ttft_s", "time_to_answer": "time_to_answer_s",
            **{k: k for k in ("flops_ttft_total", "flops_ttft_critical", "flops_answer_total",
                              "flops_answer_critical")}}
    return {name: {k: baseline[key] / r[key] for k, key in keys.items()} for name, r in results.items()}


def speed_main(args: argparse.Namespace) -> None:
    """Naive RAG against superposition top-k (warm and cold) on a random-weight model of `--shape`: times only."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tokenizer = load_tokenizer(args.checkpoint)
    model = shape_model(args.shape, len(tokenizer), args.device, dtype)
    cfg = model.cfg
    warm_sp = SuperpositionConfig(enabled=True, cache_mb=args.cache_mb, graph_tokens=args.graph_tokens)
    cold_sp = replace(warm_sp, cache_policy="off")
    configs = {"naive": SuperpositionConfig(), "warm": warm_sp, "cold": cold_sp,
               "pc_warm": replace(warm_sp, method="prompt_cache"), "pc_cold": replace(cold_sp, method="prompt_cache")}
    methods = speed_methods(args.top_k, args.prompt_cache)
    engines = {key: Engine(model, tokenizer, EngineConfig(max_batch_size=1, superposition=configs[key]))
               for key in {engine_key for engine_key, _ in methods.values()}}  # each holds a context's KV slot
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0, ignore_eos=True)
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    start, budget = time.monotonic(), 60 * args.minutes if args.minutes else float("inf")
    sets = question_sets(args.sets, args.questions_per_set, False, args.seed, args.doc_words)
    for s, (docs, asked) in enumerate(sets):
        if s and time.monotonic() > start + budget:
            break
        for q, item in enumerate(asked):
            prompt = forkjoin_prompt(tokenizer, docs, item["question"], INSTRUCTION)
            for name, (engine_key, k) in methods.items():
                fj = replace(prompt, superpose=engine_key != "naive", top_k=k)
                request, engine = Request(params=params, forkjoin=fj), engines[engine_key]
                answer(engine, request, args.device)  # untimed: new shapes' graphs; warm: the documents cached
                ops = ops_to_first_token(engine, request)
                steps = step_breakdown(engine, request, args.device)
                for _ in range(args.repeats):
                    done, seconds = answer(engine, request, args.device)
                    row = speed_row(engine_key, fj, done, seconds, cfg, args.max_new_tokens) | {"ttft_aten_ops": ops,
                                                                                              **steps}
                    rows[name].append(row)
                    print(json.dumps({"set": s, "question": q, "method": name,
                                      **{k: v for k, v in row.items() if not k.startswith("flops")}}),
                          file=sys.stderr, flush=True)
    results = {name: speed_summary(r) for name, r in rows.items()}
    baseline = results.pop("naive")
    ratios = speed_ratios(results, baseline)
    print(f"naive RAG: TTFT {baseline['ttft_s']:.4f} s, time to answer {baseline['time_to_answer_s']:.4f} s, "
          f"{baseline['ttft_aten_ops']:.0f} ATen ops to the first token", file=sys.stderr)
    for name, r in ratios.items():
        print(f"{name}: TTFT {results[name]['ttft_s']:.4f} s, naive/superposition {r['ttft']:.2f}x "
              f"(FLOPs {r['flops_ttft_total']:.2f}x, critical path {r['flops_ttft_critical']:.2f}x); "
              f"time to answer {results[name]['time_to_answer_s']:.4f} s, naive/superposition "
              f"{r['time_to_answer']:.2f}x (FLOPs {r['flops_answer_total']:.2f}x, critical path "
              f"{r['flops_answer_critical']:.2f}x); {results[name]['ttft_aten_ops']:.0f} ATen ops to the first token",
              file=sys.stderr)
    best = f"superposition_top{args.top_k[0]}_warm"
    print(json.dumps({
        "benchmark": "superposition_speed",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"shape": args.shape, "params": sum(p.numel() for p in model.parameters()),
                   "model": {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers", "q_heads", "kv_heads",
                                                            "head_dim", "ffn_dim")},
                   "weights": "random (accuracy not measured)", "tokenizer": args.checkpoint,
                   "documents_per_question": [20, 50], "doc_words": args.doc_words, "sets": args.sets,
                   "questions_per_set": args.questions_per_set, "minutes": args.minutes, "top_k": args.top_k,
                   "max_new_tokens": args.max_new_tokens, "decoding": "greedy, ignore_eos (fixed length)",
                   "repeats": args.repeats, "untimed_runs_before": 1, "engine": {"max_batch_size": 1},
                   "superposition_warm": vars(warm_sp), "superposition_cold": vars(cold_sp),
                   "prompt_cache": args.prompt_cache,
                   "dtype": str(dtype), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "results": results, "baseline": {"naive": baseline}, "ratios": ratios,
        "ratio": ratios[best]["time_to_answer"],
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--checkpoint", default=CHECKPOINT)
    p.add_argument("--sets", type=int, default=50, help="single-hop document sets (20-50 documents each)")
    p.add_argument("--multihop-sets", type=int, default=0)
    p.add_argument("--attenuation", type=float, default=None, help="also top-k (k > 1) with the attenuation "
                   "ablation at this temperature (the official code's attenuation configs: 0.01)")
    p.add_argument("--questions-per-set", type=int, default=4)
    p.add_argument("--top-k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--flop-questions", type=int, default=2, help="questions (per task) also run under the counter")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--minutes", type=float, default=None, help="time budget: no new document set starts after it "
                   "(single-hop gets the first 70%% when both tasks run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graph-tokens", type=int, default=SuperpositionConfig.graph_tokens,
                   help="superposition.graph_tokens: path forwards of up to this many padded tokens as CUDA graphs "
                   "(0: eager)")
    p.add_argument("--stop", default="newline", choices=["newline", "none"], help="end an answer at its first newline "
                   "(newline) or after --max-new-tokens tokens (none; scored on the first line with a digit)")
    p.add_argument("--doc-words", type=int, default=28, help="words per document, its one fact included (28: ~50 "
                   "tokens; the paper's NaturalQuestions passages are 100 words)")
    p.add_argument("--theoretical-only", action="store_true", help="theoretical FLOPs of every question, no model run")
    p.add_argument("--shape", default=None, help="speed mode: a random-weight model of this Llama shape of "
                   "benchmarks/decode.py (e.g. llama2_7b, tiny); times only, single-hop, fixed-length answers")
    p.add_argument("--repeats", type=int, default=1, help="speed mode: timed runs per question and method")
    p.add_argument("--cache-mb", type=float, default=4096, help="speed mode: the warm engine's path cache bound")
    p.add_argument("--prompt-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="speed mode: also time the Prompt Cache baseline (two more engines, each with its own "
                   "8k-token KV slot, 4 GB at the 7B shape, and its path buffers)")
    args = p.parse_args()
    if args.theoretical_only:
        tokenizer = load_tokenizer(args.checkpoint)
        cfg = (shape_model(args.shape, len(tokenizer), "meta", torch.bfloat16).cfg if args.shape
               else read_model_config(args.checkpoint))
        print(json.dumps({"benchmark": "superposition_flops", "device": "none (counted from token lengths)",
                          "config": {"checkpoint": args.checkpoint, "shape": args.shape, "sets": args.sets,
                                     "doc_words": args.doc_words, "multihop_sets": args.multihop_sets,
                                     "questions_per_set": args.questions_per_set,
                                     "top_k": args.top_k, "answer_tokens": ANSWER_TOKENS, "kept": "gold first"},
                          "results": theoretical_sweep(args, tokenizer, cfg), "baseline": "naive RAG (one prompt)",
                          "ratio": None, "command": " ".join(["python", *sys.argv]),
                          "time": time.strftime("%Y-%m-%d %H:%M")}))
        return
    if args.shape:
        speed_main(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else None
    naive = Engine.from_checkpoint(args.checkpoint, EngineConfig(max_batch_size=1), device=args.device, dtype=dtype)
    model, tokenizer = naive.model, naive.tokenizer
    superposition = SuperpositionConfig(enabled=True, cache_mb=4096, graph_tokens=args.graph_tokens)
    engines = {"naive": naive, "sp": Engine(model, tokenizer, EngineConfig(max_batch_size=1,
                                                                           superposition=superposition)),
               "pc": Engine(model, tokenizer, EngineConfig(
                   max_batch_size=1, superposition=replace(superposition, method="prompt_cache"))),
               "hops2": Engine(model, tokenizer, EngineConfig(max_batch_size=1,
                                                              superposition=replace(superposition, hops=2)))}
    if args.attenuation is not None:
        engines["att"] = Engine(model, tokenizer, EngineConfig(
            max_batch_size=1, superposition=replace(superposition, attenuation=args.attenuation)))
    warm = forkjoin_prompt(tokenizer, ["Document 1: a warm-up.", "Document 2: another."], "What is this?", INSTRUCTION)
    for engine in engines.values():  # allocations, kernels and (CUDA) graphs before anything is timed
        engine.generate([Request(params=SamplingParams(max_new_tokens=4, temperature=0), forkjoin=warm)])
    start, budget = time.monotonic(), 60 * args.minutes if args.minutes else float("inf")
    share = 0.7 if args.sets and args.multihop_sets else 1.0
    single = run_set(args, engines, False, start + share * budget) if args.sets else {}
    multi = run_set(args, engines, True, start + budget) if args.multihop_sets else {}
    baseline = {"single_hop": single.pop("naive", None), "multihop": multi.pop("naive", None)}
    best = f"superposition_top{args.top_k[0]}"
    print(json.dumps({
        "benchmark": "superposition",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"checkpoint": args.checkpoint, "documents_per_question": [20, 50], "doc_words": args.doc_words,
                   "sets": args.sets, "multihop_sets": args.multihop_sets, "questions_per_set": args.questions_per_set,
                   "minutes": args.minutes,
                   "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "decoding": f"greedy, stop: {args.stop}",
                   "instruction": INSTRUCTION, "superposition": vars(superposition), "attenuation": args.attenuation,
                   "dtype": str(model.embed.weight.dtype), "threads": torch.get_num_threads(),
                   "torch": torch.__version__},
        "results": {"single_hop": single, "multihop": multi,
                    "ratios": {"single_hop": ratios(single, baseline["single_hop"]) if single else {},
                               "multihop": ratios(multi, baseline["multihop"]) if multi else {}}},
        "baseline": baseline,
        "ratio": (baseline["single_hop"]["time_to_answer_s"] / single[best]["time_to_answer_warm_s"]
                  if single and single[best].get("time_to_answer_warm_s") else None),
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
