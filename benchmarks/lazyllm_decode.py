"""LazyLLM against the plain engine on speed alone: decode tokens/s and time to first token, per model and length.

For each model shape (random weights) and prompt length: the plain engine (`PlainSequence`); LazyLLM as scheduled
(`lazy`, `never_slower=false`: every boundary applied, whatever it costs); its static ablation (`lazy_static`: no
re-selection in decode, so no revival: what attending over the pruned sets costs by itself); and LazyLLM as the
engine runs it (`lazy_engine`, `never_slower=true`: the plain computation for length classes where the schedule
measured no faster). TTFT is the median over repeats of prefill to the first greedy token; decode is `--steps` greedy
steps after that prefill, timed as one block (tokens/s), with the tokens revived per step. Random weights attend
almost uniformly, so the dynamic selection churns and revives far more than a trained model's would: `lazy` decode
is a worst case. Rounds alternate the variants, so changes in machine load hit each alike. Prints one JSON line;
`ratio` is LazyLLM's (static) decode tokens/s over plain for the last shape at the longest prompt.

    python benchmarks/lazyllm_decode.py --device cuda                       # retrieval_lm, SmolLM2-135M, 7B shapes
    python benchmarks/lazyllm_decode.py --device cpu --shapes cpu_d512 --lengths 1024,2048
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

from raytrain.infer.model_runner import PlainSequence  # noqa: E402
from raytrain.infer.lazyllm import LazyConfig, LazySequence  # noqa: E402
from raytrain.models.decoder import DecoderConfig, build_decoder  # noqa: E402
from raytrain.models.kv_cache import use_inference_attention  # noqa: E402

SHAPES = {  # random-weight stand-ins: the project's retrieval model, SmolLM2-135M, Llama-2-7B
    "retrieval_lm": DecoderConfig(name="retrieval_lm", vocab_size=4096, d_model=384, n_layers=6, head_dim=64,
                                  q_heads=6, kv_heads=2, ffn_dim=1024, rope_theta=1e5, max_seq_len=8192),
    "smollm2_135m": DecoderConfig(name="smollm2_135m", vocab_size=49152, d_model=576, n_layers=30, head_dim=64,
                                  q_heads=9, kv_heads=3, ffn_dim=1536, rope_theta=1e5, max_seq_len=8192,
                                  qk_norm=False),
    "llama2_7b": DecoderConfig(name="llama2_7b", vocab_size=32000, d_model=4096, n_layers=32, head_dim=128,
                               q_heads=32, kv_heads=32, ffn_dim=11008, max_seq_len=8192, qk_norm=False,
                               tie_embeddings=False),
    "cpu_d512": DecoderConfig(name="cpu_d512", vocab_size=1000, d_model=512, n_layers=8, head_dim=64, q_heads=8,
                              kv_heads=8, ffn_dim=1408, max_seq_len=8192, qk_norm=False, tie_embeddings=False),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_run(model: torch.nn.Module, prompt: list[int], schedule: LazyConfig | None, steps: int,
              device: str) -> tuple[float, float, float, float]:
    """(TTFT s, decode s for `steps` tokens, prompt fraction computed, revived per step) of one greedy
    generation."""
    sync(device)
    start = time.perf_counter()
    runner = (PlainSequence(model, prompt, len(prompt) + steps) if schedule is None
              else LazySequence(model, prompt, schedule, len(prompt) + steps))
    token = runner.prefill()[0].argmax().view(1)
    token.item()
    first = time.perf_counter()
    for _ in range(steps):
        token = runner.decode(token)[0].argmax().view(1)
    token.item()
    decode = time.perf_counter() - first
    return first - start, decode, runner.prompt_fraction_computed(), getattr(runner, "revived", 0) / steps


def measure(model: torch.nn.Module, length: int, schedule: LazyConfig, args: argparse.Namespace) -> dict:
    prompt = torch.randint(4, model.cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    variants = {"plain": None, "lazy": LazyConfig(**{**vars(schedule), "never_slower": False}),
                "lazy_static": LazyConfig(**{**vars(schedule), "never_slower": False, "dynamic": False}),
                "lazy_engine": LazyConfig(**{**vars(schedule), "never_slower": True})}
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, variant in variants.items():
            run = timed_run(model, prompt.tolist(), variant, args.steps, args.device)
            if i >= args.warmup:
                runs[name].append(run)
    out = {}
    for name, results in runs.items():
        ttft, decode, fraction, revived = (statistics.median(r[k] for r in results) for k in range(4))
        out[name] = {"ttft_ms": round(1e3 * ttft, 3), "decode_tokens_per_s": round(args.steps / decode, 1),
                     "prompt_fraction_computed": round(fraction, 4), "revived_per_step": round(revived, 1)}
    print(json.dumps({"shape": model.cfg.name, "tokens": length, **out}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="retrieval_lm,smollm2_135m,llama2_7b")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192])
    p.add_argument("--boundaries", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.6, 0.9])
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    schedule = LazyConfig(boundaries=args.boundaries, keep=args.keep)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cuda":  # the attention backends the engine runs these sequences with
        use_inference_attention()
    results: dict[str, dict] = {}
    for name in args.shapes.split(","):
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        model = build_decoder(SHAPES[name], args.device).eval()
        torch.set_default_dtype(torch.float32)
        model.init_buffers()  # fp32 RoPE tables whatever the default dtype was
        results[name] = {f"{n}_tokens": measure(model, n, schedule, args) for n in args.lengths}
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    last = results[args.shapes.split(",")[-1]][f"{max(args.lengths)}_tokens"]
    print(json.dumps({
        "benchmark": "lazyllm_decode",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"schedule": {"boundaries": args.boundaries, "keep": args.keep}, "lengths": args.lengths,
                   "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "dtype": str(dtype),
                   "torch": torch.__version__},
        "results": {s: {k: {n: v for n, v in cell.items() if n != "plain"} for k, cell in r.items()}
                    for s, r in results.items()},
        "baseline": {s: {k: cell["plain"] for k, cell in r.items()} for s, r in results.items()},
        "ratio": round(last["lazy_static"]["decode_tokens_per_s"] / last["plain"]["decode_tokens_per_s"], 3),
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
