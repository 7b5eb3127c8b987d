"""Time to first token and task accuracy: full prefill against LazyLLM schedules, in one run.

Accuracy (`--checkpoint`): the procedural multi-document retrieval task (`raytrain/data/retrieval.py`: one document of
many states the asked 4-digit code), `--questions` per length generated here at about `--accuracy-lengths` tokens (or
read from `--eval-dir`, what `raytrain data make=retrieval` wrote), answered greedily; a question counts when the
first number of the answer is the code. A checkpoint whose tokenizer has a chat template (SmolLM2-135M-Instruct) gets
the documents and the question as one user message, and its turn opens with "The code of the <key> is" (`--format
chat`; the model must still find the code in the documents); others get the raw prompt ending in "Answer:" (`--format
raw`). Every schedule answers the same questions; per length it reports accuracy, the difference from full prefill
with a paired 95% interval (Newcombe's method 10: Wilson score limits combined through the correlation of the paired
outcomes), TTFT (batch 1, median over the questions) and the share of prompt (token, layer) pairs computed, and for
each schedule the share of questions whose answer tokens (the code, where the gold document states it) reach the last
layer in its prefill (`answer_tokens_kept`: how often pruning keeps the needle; over the first `--needle-questions` of
each length, since each costs one more prefill). TTFT 7B (`--parts ttft_7b`): random prompts of `--lengths` tokens
through a Llama-2-7B-shaped decoder with random weights (after warm-ups, median, schedules round robin). Prints one
JSON line; `ratio` is the TTFT speed-up at the longest prompt (7B if timed, else the checkpoint's) of the fastest
schedule whose accuracy is within one point of full prefill at every length; none while full prefill misses 80% at
some length (`full_prefill_accuracy_bar_0.8`).

    python benchmarks/lazyllm_ttft.py --device cuda --parts accuracy --checkpoint SMOLLM2_DIR --questions 200
    python benchmarks/lazyllm_ttft.py --device cuda --parts ttft_7b --lengths 2048,4096,8192
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.data import retrieval  # noqa: E402
from raytrain.infer.engine import Engine, EngineConfig, Request  # noqa: E402
from raytrain.infer.lazyllm import LazyConfig, LazySequence  # noqa: E402
from raytrain.infer.model_runner import PlainSequence  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.models.decoder import DecoderConfig, build_decoder  # noqa: E402
from raytrain.models.kv_cache import use_inference_attention  # noqa: E402

SCHEDULES = {  # name -> LazyConfig; the spec's default first, then more aggressive ones
    "lazy_0.3/0.6/0.9_keep0.7": LazyConfig(boundaries=[0.3, 0.6, 0.9], keep=0.7),
    "lazy_0.3/0.6/0.9_keep0.5": LazyConfig(boundaries=[0.3, 0.6, 0.9], keep=0.5),
    "lazy_0.3/0.6/0.9_keep0.4": LazyConfig(boundaries=[0.3, 0.6, 0.9], keep=0.4),
    "lazy_0.15/0.4/0.7_keep0.5": LazyConfig(boundaries=[0.15, 0.4, 0.7], keep=0.5),
    "lazy_0.15/0.4/0.7_keep0.35": LazyConfig(boundaries=[0.15, 0.4, 0.7], keep=0.35),
}
LLAMA2_7B = DecoderConfig(name="llama2_7b_shape", vocab_size=32000, d_model=4096, n_layers=32, head_dim=128,
                          q_heads=32, kv_heads=32, ffn_dim=11008, max_seq_len=8192, qk_norm=False,
                          tie_embeddings=False)


def lazy_engines(full: Engine, names: list[str]) -> dict[str, Engine]:
    """An engine per LazyLLM schedule on `full`'s weights, each with one KV slot like `full`: questions run at
    batch 1, and the default eight slots of 8k tokens would take ~3 GB per engine in fp32. The schedule always runs
    (`never_slower` off): where it measures no faster the engine would answer by plain prefill, and the accuracy
    compared would be full prefill's twice."""
    return {name: Engine(full.model, full.tokenizer, EngineConfig(
        max_batch_size=1, lazy=True, lazyllm=dataclasses.replace(SCHEDULES[name], min_prompt_tokens=1,
                                                                  never_slower=False)))
            for name in names}


def ttft(engine: Engine, prompt: list[int], warmup: int, repeats: int) -> float:
    request = Request(prompt, SamplingParams(max_new_tokens=1, temperature=0))
    for _ in range(warmup):
        engine.generate([request])
    return statistics.median(engine.generate([request])[0].ttft_s for _ in range(repeats))


Question = tuple[list[int], str]  # prompt token ids, the code


def accuracy(args: argparse.Namespace, device: str) -> dict[str, dict]:
    model_engine = Engine.from_checkpoint(args.checkpoint, EngineConfig(max_batch_size=1), device=device,
                                          dtype=torch.bfloat16 if device == "cuda" else None)
    runs = {"full": model_engine, **lazy_engines(model_engine, args.schedules)}
    out: dict[str, dict] = {name: {} for name in runs}
    params = SamplingParams(max_new_tokens=6, temperature=0, stop=["\n", "."])
    fmt = args.format or ("chat" if getattr(model_engine.tokenizer, "chat_template", None) else "raw")
    for target, records in eval_sets(args, model_engine, fmt, params.max_new_tokens).items():
        tokens = int(statistics.mean(len(ids) for ids, _ in records))
        correct: dict[str, list[bool]] = {}
        for name, engine in runs.items():
            ttft(engine, records[0][0], args.warmup, 1)
            done = [engine.generate([Request(ids, params)])[0] for ids, _ in records]
            correct[name] = [first_number(c.text) == code for c, (_, code) in zip(done, records)]
            cell = {"target_tokens": target, "questions": len(records), "accuracy": statistics.mean(correct[name]),
                    "ttft_ms": 1e3 * statistics.median(c.ttft_s for c in done),
                    "prompt_fraction_computed": statistics.mean(c.prompt_fraction_computed for c in done)}
            if name != "full":
                traced = records[:args.needle_questions]
                kept = [k for k in (answer_kept(engine, ids, code) for ids, code in traced) if k is not None]
                cell["answer_tokens_kept"] = statistics.mean(kept) if kept else None
                cell["needle_questions"] = len(kept)
                cell["accuracy_difference"] = cell["accuracy"] - out["full"][f"{tokens}_tokens"]["accuracy"]
                cell["difference_ci95"] = paired_difference_ci(correct["full"], correct[name])
            out[name][f"{tokens}_tokens"] = cell
            progress("accuracy", name, tokens, cell)
    return out


def eval_sets(args: argparse.Namespace, engine: Engine, fmt: str, max_new: int) -> dict[int, list[Question]]:
    """Questions by target length: from `--eval-dir` files (target = their word count), or generated here with the
    word count that gives about 93% of the target in this tokenizer's tokens (twice as many as asked for, since the
    filler's length varies by several percent). Prompts beyond the context window are dropped (counted on stderr)."""
    window = engine.context_window - max_new
    if args.eval_dir:
        files = sorted(Path(args.eval_dir).glob("eval_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
        sources = {int(p.stem.split("_")[1]): [json.loads(line) for line in p.read_text().splitlines()]
                   for p in files}
    else:
        probe = next(retrieval.eval_records(1, retrieval.RetrievalConfig(1000), args.seed))
        per_word = len(prompt_ids(engine, probe, fmt)) / 1000
        sources = {t: list(retrieval.eval_records(2 * args.questions,
                                                  retrieval.RetrievalConfig(round(0.93 * t / per_word)), args.seed + t))
                   for t in args.accuracy_lengths}
    sets = {}
    for target, records in sources.items():
        encoded = [(prompt_ids(engine, r, fmt), r["answer"].strip()) for r in records]
        fitting = [q for q in encoded if len(q[0]) <= window]
        sets[target] = fitting[:args.questions]
        print(f"{target}: {len(encoded) - len(fitting)} of {len(encoded)} questions beyond the window of {window}",
              file=sys.stderr)
    return sets


def prompt_ids(engine: Engine, record: dict, fmt: str) -> list[int]:
    """`raw`: the task's prompt (BOS + documents + question + "Answer:"). `chat`: documents and question as one user
    message through the chat template, the assistant's turn opened with "The code of the <key> is"."""
    if fmt == "raw":  # tokenized unchecked: `eval_sets` drops what exceeds the window
        return engine.tokenize(record["prompt"])
    key = record.get("key") or re.search(r"What is the code of the (.+)\?", record["prompt"]).group(1)
    message = record["prompt"].removesuffix("\nAnswer:")
    tok = engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    return [*ids, *tok.encode(f"The code of the {key} is", add_special_tokens=False)]


def answer_kept(engine: Engine, ids: list[int], code: str) -> bool | None:
    """Whether the tokens of the code, where the prompt states it, reach the last layer in the schedule's prefill
    (False: a boundary pruned the needle before the first answer token was computed); None where the code's own
    tokens do not occur in the prompt (a tokenizer that merges them with their context)."""
    needle = engine.tokenizer.encode(code, add_special_tokens=False)
    start = next((i for i in range(len(ids) - len(needle) + 1) if ids[i:i + len(needle)] == needle), None)
    if start is None:
        return None
    seq = LazySequence(engine.model, ids, engine.config.lazyllm, len(ids) + 1)
    seq.prefill()
    return bool((seq.depth[start:start + len(needle)] == len(engine.model.layers)).all())


def first_number(text: str) -> str | None:
    found = re.match(r"\s*(\d+)", text)
    return found.group(1) if found else None


def paired_difference_ci(baseline: list[bool], other: list[bool], z: float = 1.959964) -> list[float]:
    """95% interval for accuracy(other) - accuracy(baseline) on the same questions: Newcombe (1998) method 10, the
    Wilson score limits of both accuracies combined through the phi correlation of the paired outcomes."""
    n = len(baseline)
    a = sum(x and y for x, y in zip(baseline, other))
    b = sum(x and not y for x, y in zip(baseline, other))  # only the baseline right
    c = sum(y and not x for x, y in zip(baseline, other))  # only the other right
    d = n - a - b - c
    p1, p2 = (a + c) / n, (a + b) / n  # other, baseline
    (l1, u1), (l2, u2) = wilson(a + c, n, z), wilson(a + b, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    low = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    high = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return [p1 - p2 - math.sqrt(max(low, 0.0)), p1 - p2 + math.sqrt(max(high, 0.0))]


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def progress(part: str, name: str, tokens: int, cell: dict) -> None:
    """Each measured cell goes to stderr at once, so a run cut short still leaves its figures."""
    print(json.dumps({"part": part, "schedule": name, "tokens": tokens, **cell}), file=sys.stderr, flush=True)


def ttft_7b(args: argparse.Namespace, device: str) -> dict[str, dict]:
    if device == "cuda":  # the attention backends the engine runs these prefills with
        use_inference_attention()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    model = build_decoder(LLAMA2_7B if device == "cuda" else _cpu_shape(), device).eval()
    torch.set_default_dtype(torch.float32)
    schedules = {"full": None, **{name: SCHEDULES[name] for name in args.schedules}}
    out: dict[str, dict] = {name: {} for name in schedules}
    for length in args.lengths:
        prompt = torch.randint(4, model.cfg.vocab_size, (length,)).tolist()
        for _ in range(args.warmup):
            for schedule in schedules.values():
                first_token_s(model, prompt, schedule)
        times: dict[str, list[float]] = {name: [] for name in schedules}
        for _ in range(args.repeats):  # round robin, so a change in machine load hits every schedule alike
            for name, schedule in schedules.items():
                times[name].append(first_token_s(model, prompt, schedule))
        for name in schedules:
            out[name][f"{length}_tokens"] = {"ttft_ms": 1e3 * statistics.median(times[name])}
            progress("ttft_7b", name, length, out[name][f"{length}_tokens"])
    return out


def first_token_s(model: torch.nn.Module, prompt: list[int], schedule: LazyConfig | None) -> float:
    """Wall time from a prompt to its first (greedy) token: the engine's prefill, dense or LazyLLM."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    capacity = len(prompt) + 1
    runner = LazySequence(model, prompt, schedule, capacity) if schedule else PlainSequence(model, prompt, capacity)
    int(runner.prefill()[0].argmax())
    return time.perf_counter() - start


def _cpu_shape() -> DecoderConfig:
    """The CPU stand-in for the 7B: small enough for two cores, wide enough (d 512) that prefill time is matmuls and
    attention rather than per-layer overhead, so the LazyLLM ratio means what it means on a GPU."""
    return DecoderConfig(name="cpu_d512", vocab_size=1000, d_model=512, n_layers=8, head_dim=64, q_heads=8,
                         kv_heads=8, ffn_dim=1408, max_seq_len=8192, qk_norm=False, tie_embeddings=False)


def best_ratio(acc: dict[str, dict], timing: dict[str, dict]) -> tuple[str | None, float]:
    """The fastest schedule (TTFT at the longest prompt of `timing`) within one accuracy point of full prefill at
    every length (every schedule, when accuracy was not measured)."""
    best, ratio = None, 1.0
    longest = max(timing["full"], key=lambda k: int(k.split("_")[0]))
    for name in timing:
        if name == "full":
            continue
        close = all(acc[name][k]["accuracy"] >= acc["full"][k]["accuracy"] - 0.01 for k in acc["full"]) \
            if acc else True
        speedup = timing["full"][longest]["ttft_ms"] / timing[name][longest]["ttft_ms"]
        if close and speedup > ratio:
            best, ratio = name, speedup
    return best, ratio


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default=None, help="accuracy,ttft_7b (default: both with --checkpoint, else ttft_7b)")
    p.add_argument("--checkpoint", help="a model that can answer the retrieval task, e.g. the converted SmolLM2")
    p.add_argument("--eval-dir", help="read questions from what `raytrain data make=retrieval` wrote")
    p.add_argument("--questions", type=int, default=200, help="per length")
    p.add_argument("--needle-questions", type=int, default=50,
                   help="per length and schedule, the questions whose answer tokens are traced (one more prefill each)")
    p.add_argument("--accuracy-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192])
    p.add_argument("--format", choices=["chat", "raw"], default=None, help="default: chat if the tokenizer has a "
                                                                           "chat template")
    p.add_argument("--schedules", type=lambda s: [x for x in s.split(",") if x], default=list(SCHEDULES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    unknown = [s for s in args.schedules if s not in SCHEDULES]
    if unknown:
        p.error(f"--schedules: unknown {unknown[0]!r}; known: {', '.join(SCHEDULES)}")
    parts = (args.parts or ("accuracy,ttft_7b" if args.checkpoint else "ttft_7b")).split(",")
    if "accuracy" in parts and not args.checkpoint:
        p.error("--parts accuracy needs --checkpoint")
    timing = ttft_7b(args, args.device) if "ttft_7b" in parts else {}
    acc = accuracy(args, args.device) if "accuracy" in parts else {}
    bar = {k: v["accuracy"] >= 0.8 for k, v in acc.get("full", {}).items()}
    best, ratio = best_ratio(acc, timing or acc) if all(bar.values()) else (None, None)  # no comparison below the bar
    print(json.dumps({
        "benchmark": "lazyllm_ttft",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"schedules": {k: vars(SCHEDULES[k]) for k in args.schedules}, "parts": parts,
                   "accuracy_schedules": "never_slower off, min_prompt_tokens 1: every schedule prunes",
                   "lengths": args.lengths, "accuracy_lengths": args.accuracy_lengths, "questions": args.questions,
                   "warmup": args.warmup, "repeats": args.repeats, "7b": LLAMA2_7B.name if args.device == "cuda"
                   else _cpu_shape().name, "checkpoint": args.checkpoint, "seed": args.seed,
                   "torch": torch.__version__},
        "results": {"trained_model": {k: v for k, v in acc.items() if k != "full"},
                    "ttft_7b": {k: v for k, v in timing.items() if k != "full"}, "best_schedule": best,
                    "full_prefill_accuracy_bar_0.8": bar},
        "baseline": {"trained_model": acc.get("full"), "ttft_7b": timing.get("full")},
        "ratio": ratio, "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
