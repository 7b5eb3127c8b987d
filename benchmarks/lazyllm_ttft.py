"""Time to first token and task accuracy: full prefill against LazyLLM schedules, in one run.

Accuracy: a model trained on the retrieval task (`raytrain data make=retrieval`, `experiment=lazyllm_retrieval`)
answers the evaluation questions greedily; exact match of the 4-digit code. TTFT (batch 1, wall time from request to
first token, after warm-ups, median) on those prompts, and on random prompts of 2k-8k tokens for a Llama-2-7B-shaped
decoder with random weights. Prints one JSON line; `ratio` is the 7B TTFT speed-up at the longest prompt of the
fastest schedule whose accuracy is within one point of full prefill.

    python benchmarks/lazyllm_ttft.py --device cuda --checkpoint RUN_DIR --eval-dir DATA --lengths 2048,4096,8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.infer.engine import Engine, EngineConfig, Request  # noqa: E402
from raytrain.infer.model_runner import PlainSequence  # noqa: E402
from raytrain.infer.lazyllm import LazyConfig, LazySequence  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.models.decoder import DecoderConfig, build_decoder  # noqa: E402

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


def engines(model: torch.nn.Module, tokenizer: object) -> dict[str, Engine]:
    out = {"full": Engine(model, tokenizer)}
    for name, schedule in SCHEDULES.items():
        schedule.min_prompt_tokens = 1
        out[name] = Engine(model, tokenizer, EngineConfig(lazy=True, lazyllm=schedule))
    return out


def ttft(engine: Engine, prompt: list[int], warmup: int, repeats: int) -> float:
    request = Request(prompt, SamplingParams(max_new_tokens=1, temperature=0))
    for _ in range(warmup):
        engine.generate([request])
    return statistics.median(engine.generate([request])[0].ttft_s for _ in range(repeats))


def accuracy(args: argparse.Namespace, device: str) -> dict[str, dict]:
    model_engine = Engine.from_checkpoint(args.checkpoint, device=device,
                                          dtype=torch.bfloat16 if device == "cuda" else None)
    runs = engines(model_engine.model, model_engine.tokenizer)
    out: dict[str, dict] = {name: {} for name in runs}
    params = SamplingParams(max_new_tokens=6, temperature=0, stop=["\n"])
    for path in sorted(Path(args.eval_dir).glob("eval_*.jsonl"), key=lambda p: int(p.stem.split("_")[1])):
        window = model_engine.model.cfg.max_seq_len - params.max_new_tokens
        encoded = [(r, model_engine.tokenizer.encode(r["prompt"])) for r in
                   (json.loads(line) for line in path.read_text().splitlines())]
        kept = [(r, ids) for r, ids in encoded if len(ids) + 1 <= window][:args.eval_examples]  # +1: BOS
        records = [r for r, _ in kept]
        prompts = [model_engine.encode(Request(r["prompt"], params)) for r in records]
        tokens = int(statistics.mean(len(p) for p in prompts))
        for name, engine in runs.items():
            ttft(engine, prompts[0], args.warmup, 1)
            done = [engine.generate([Request(p, params)])[0] for p in prompts]
            correct = sum(c.text.strip() == r["answer"].strip() for c, r in zip(done, records))
            out[name][f"{tokens}_tokens"] = {
                "accuracy": correct / len(records), "ttft_ms": 1e3 * statistics.median(c.ttft_s for c in done),
                "prompt_fraction_computed": statistics.mean(c.prompt_fraction_computed for c in done)}
            progress("accuracy", name, tokens, out[name][f"{tokens}_tokens"])
    return out


def progress(part: str, name: str, tokens: int, cell: dict) -> None:
    """Each measured cell goes to stderr at once, so a run cut short still leaves its figures."""
    print(json.dumps({"part": part, "schedule": name, "tokens": tokens, **cell}), file=sys.stderr, flush=True)


def ttft_7b(args: argparse.Namespace, device: str) -> dict[str, dict]:
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(0)
    model = build_decoder(LLAMA2_7B if device == "cuda" else _cpu_shape(), device).eval()
    torch.set_default_dtype(torch.float32)
    schedules = {"full": None, **SCHEDULES}
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


def best_ratio(acc: dict[str, dict], timing: dict[str, dict], longest: str) -> tuple[str | None, float]:
    """The fastest schedule (7B TTFT at the longest prompt) within one accuracy point of full, on every length."""
    best, ratio = None, 1.0
    for name in SCHEDULES:
        close = all(acc[name][k]["accuracy"] >= acc["full"][k]["accuracy"] - 0.01 for k in acc["full"]) \
            if acc else True
        speedup = timing["full"][longest]["ttft_ms"] / timing[name][longest]["ttft_ms"]
        if close and speedup > ratio:
            best, ratio = name, speedup
    return best, ratio


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--checkpoint", help="a model trained on the retrieval task (omit to time only)")
    p.add_argument("--eval-dir", help="the directory `raytrain data make=retrieval` wrote")
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    timing = ttft_7b(args, args.device)  # first: it is the headline figure and needs no trained model
    acc = accuracy(args, args.device) if args.checkpoint else {}
    longest = f"{max(args.lengths)}_tokens"
    best, ratio = best_ratio(acc, timing, longest)
    print(json.dumps({
        "benchmark": "lazyllm_ttft",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"schedules": {k: vars(v) for k, v in SCHEDULES.items()}, "lengths": args.lengths,
                   "warmup": args.warmup, "repeats": args.repeats, "7b": LLAMA2_7B.name if args.device == "cuda"
                   else _cpu_shape().name, "checkpoint": args.checkpoint, "torch": torch.__version__},
        "results": {"trained_model": {k: v for k, v in acc.items() if k != "full"},
                    "ttft_7b": {k: v for k, v in timing.items() if k != "full"}, "best_schedule": best},
        "baseline": {"trained_model": acc.get("full"), "ttft_7b": timing["full"]},
        "ratio": ratio, "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
