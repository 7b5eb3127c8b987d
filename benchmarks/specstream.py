"""Speculative Streaming against autoregressive decoding of the same fine-tuned checkpoint, at batch 1.

One checkpoint (from `raytrain train job=specstream`), two decoders through the same engine: plain greedy decoding
(streams off; on CUDA with its graphs and fused kernels) and Speculative Streaming for each `--trees` setting
(γ:k, tree pruning at `--tau`). For every held-out pair of `--eval` (e.g. `raytrain data make=sql`'s eval.jsonl)
the prompt goes through the model's chat template; the modes run one after the other on each prompt (round robin,
so a busy machine slows all of them alike). Figures:
- tokens per forward pass (the call-reduction ratio CR): generated tokens (EOS included) over forward passes (the
  prompt's prefill and the tree steps; its count does not depend on the hardware); AR's is 1 by construction;
- draft tokens accepted per tree step, and how often each count occurred;
- exact match of the completion with the reference SQL, for AR and for each speculative setting, and the fraction
  of prompts whose tokens are identical to AR's (must be all of them: greedy verification is lossless);
- wall-clock per generated token, prefill included (`ms_per_token`, `speedup`) and after the first token
  (`decode_ms_per_token`, `decode_speedup`: the paper's decoding speed-up; speculation's first token comes from its
  first tree step, after a prefill of all but the prompt's last token, so its time to first token holds one step
  more than AR's), over AR;
- extra parameters of the streams and the adapter, as a fraction of the model (the paper: 20·h);
- on CUDA, what a step costs: `decode_ms_per_step` (wall, after the first token) beside `graph_ms`, the device time
  of each of the mode's CUDA graphs (plain decode steps, tree steps; keyed width x length), replayed back to back.

With `--shape PRESET` instead (e.g. `openelm_1_1b`: a conf/model preset with γ = 4 streams in its top n_layers // 6
layers, random weights, random prompts, `ignore_eos`), drafts are rarely right, so a tree step yields about one token:
what this measures is the cost of a forward pass of each tree against a plain decode step on the hardware
(`ms_per_forward`, `step_cost`); the speed-up a trained checkpoint reaches there is about its tokens per forward
pass over that cost.

    python benchmarks/specstream.py --checkpoint outputs/runs/RUN --eval outputs/sql/eval.jsonl --device cpu
    python benchmarks/specstream.py --checkpoint RUN --eval eval.jsonl --device cuda --n 200 --trees 4:1,4:2,4:3,3:2
    python benchmarks/specstream.py --shape openelm_1_1b --device cuda --dtype bfloat16 --n 20 --trees 4:1,4:2,4:3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import replay_ms  # noqa: E402
from raytrain.checkpoint.hf import load_pretrained  # noqa: E402
from raytrain.data.corpus import documents  # noqa: E402
from raytrain.data.sft import prompt_ids  # noqa: E402
from raytrain.data.tokenizer import train_bpe  # noqa: E402
from raytrain.infer.engine import Engine, EngineConfig, Request  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.infer.specstream import SpecStreamConfig  # noqa: E402
from raytrain.models.decoder import build_decoder  # noqa: E402
from raytrain.models.registry import model_config  # noqa: E402
from raytrain.models.streams import StreamConfig, extra_parameters, msa_rows, tree_size  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


def main() -> None:
    p = argparse.ArgumentParser()
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint (or run) from `raytrain train job=specstream`")
    source.add_argument("--shape", help="a conf/model preset with random weights and streams: step cost only")
    p.add_argument("--eval", help="jsonl of prompt/completion pairs (with --checkpoint)")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompt tokens (with --shape)")
    p.add_argument("--n", type=int, default=40, help="pairs evaluated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="float32 keeps greedy ties exact")
    p.add_argument("--trees", default="4:1,4:2", help="comma-separated gamma:k tree settings")
    p.add_argument("--tau", type=float, default=0.0, help="tree-pruning threshold (0 = off)")
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--graph-width", type=int, default=8, help="specstream.graph_width (0: tree steps run eagerly)")
    args = p.parse_args()
    if args.checkpoint and not args.eval:
        p.error("--checkpoint needs --eval")
    model, tokenizer, prompts, references, source = (trained if args.checkpoint else random_shape)(args)
    limit = max(map(len, prompts)) + args.max_new
    trees = [tuple(int(x) for x in t.split(":")) for t in args.trees.split(",")]
    modes = {"ar": Engine(model, tokenizer, EngineConfig(max_batch_size=1, max_model_len=limit))}
    for gamma, k in trees:
        rows = msa_rows(model.cfg.streams.gamma, k)  # batch 1: never narrow the one tree (max_step_rows)
        spec = SpecStreamConfig(gamma=gamma, top_k=k, prune_threshold=args.tau, max_step_rows=max(512, rows),
                                graph_width=args.graph_width)
        modes[f"ss_g{gamma}_k{k}"] = Engine(model, tokenizer, EngineConfig(max_batch_size=1, max_model_len=limit,
                                                                           specstream=spec))
    runs = {name: [] for name in modes}
    for i, prompt in enumerate(prompts):
        for name, engine in modes.items():
            run = decode(engine, prompt, args.max_new, ignore_eos=args.shape is not None)
            if i >= args.warmup:
                runs[name].append(run)
        if i >= args.warmup:
            print(f"{i - args.warmup + 1}/{args.n}", {n: r[-1]["text"] for n, r in list(runs.items())[:2]},
                  file=sys.stderr, flush=True)
    refs = references[args.warmup:] if references else None
    ar = summary(runs["ar"], refs)
    results = {}
    for name, (gamma, k) in zip(list(modes)[1:], trees):
        s = summary(runs[name], refs)
        s["identical_to_ar"] = sum(a["tokens"] == b["tokens"] for a, b in zip(runs["ar"], runs[name])) / args.n
        s["speedup"] = ar["ms_per_token"] / s["ms_per_token"]
        s["decode_speedup"] = ar["decode_ms_per_token"] / s["decode_ms_per_token"]
        s["step_cost"] = s["ms_per_forward"] / ar["ms_per_forward"]
        s["tree_nodes"], s["msa_rows"] = tree_size(gamma, k), msa_rows(model.cfg.streams.gamma, k)
        results[name] = s
    if args.device.startswith("cuda"):
        for name, figures in {"ar": ar, **results}.items():
            figures["graph_ms"] = graph_times(modes[name])
    streams = model.cfg.streams
    total = sum(q.numel() for q in model.parameters())
    extra = extra_parameters(model.cfg.d_model, streams.gamma, streams.pruning_rank)
    best = max(results, key=lambda n: results[n]["decode_speedup"])
    print(json.dumps({
        "benchmark": "specstream", "device": device_name(args.device),
        "config": {**source, "model": model.cfg.name, "d_model": model.cfg.d_model,
                   "layers": model.cfg.n_layers, "streams": vars(streams), "n": args.n,
                   "dtype": args.dtype, "tau": args.tau, "graph_width": args.graph_width,
                   "max_new_tokens": args.max_new, "batch": 1,
                   "threads": torch.get_num_threads(),
                   "extra_parameters": extra, "parameters": total, "extra_fraction": extra / total},
        "results": results, "baseline": ar,
        "ratio": {"best": best, "decode_speedup": results[best]["decode_speedup"],
                  "speedup": results[best]["speedup"], "tokens_per_forward": results[best]["tokens_per_forward"]},
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


def trained(args: argparse.Namespace) -> tuple[Any, Any, list[list[int]], list[str] | None, dict[str, Any]]:
    """The fine-tuned checkpoint, and the first held-out pairs: their prompts in the chat template, their SQL."""
    pretrained = load_pretrained(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype])
    pairs = [json.loads(line) for line in Path(args.eval).read_text().splitlines()[:args.n + args.warmup]]
    prompts = [prompt_ids(pretrained.tokenizer, pair["prompt"]) for pair in pairs]
    return (pretrained.model, pretrained.tokenizer, prompts, [pair["completion"].strip() for pair in pairs],
            {"checkpoint": str(pretrained.path), "eval": args.eval})


def random_shape(args: argparse.Namespace) -> tuple[Any, Any, list[list[int]], None, dict[str, Any]]:
    """A preset with 4 streams and random weights, random prompts: step cost only (drafts are rarely right)."""
    torch.manual_seed(0)
    cfg = model_config(OmegaConf.load(CONF / f"{args.shape}.yaml"))
    cfg.vocab_rows, cfg.streams = None, StreamConfig(gamma=4, msa_layers=max(1, cfg.n_layers // 6))
    model = build_decoder(cfg, args.device).to(DTYPES[args.dtype]).eval()
    tokenizer = train_bpe(documents()[:200], vocab_size=4096)  # decodes the text; the ids are the model's
    prompts = torch.randint(10, cfg.vocab_size, (args.n + args.warmup, args.prompt_len)).tolist()
    return model, tokenizer, prompts, None, {"shape": args.shape, "weights": "random", "prompt_len": args.prompt_len}


def decode(engine: Engine, prompt: list[int], max_new: int, ignore_eos: bool) -> dict[str, Any]:
    spec = engine.speculative
    forwards0 = spec.forwards if spec else 0
    accepted0 = Counter(spec.accepted) if spec else Counter()
    sync(engine)
    start = time.perf_counter()
    out = engine.generate([Request(prompt, SamplingParams(max_new_tokens=max_new, temperature=0,
                                                                         ignore_eos=ignore_eos))])[0]
    sync(engine)
    seconds = time.perf_counter() - start
    generated = len(out.token_ids) + (out.finish_reason == "stop")  # the EOS token took a forward pass too
    return {"tokens": out.token_ids, "text": out.text, "generated": generated, "seconds": seconds,
            "decode_seconds": seconds - out.ttft_s,
            "forwards": spec.forwards - forwards0 + 1 if spec else generated,  # + the prompt's prefill
            "later_steps": (spec.forwards - forwards0 if spec else generated) - 1,  # steps after the first token
            "accepted": Counter(spec.accepted) - accepted0 if spec else Counter()}


def summary(runs: list[dict[str, Any]], references: list[str] | None) -> dict[str, Any]:
    tokens, forwards = sum(r["generated"] for r in runs), sum(r["forwards"] for r in runs)
    accepted = sum((r["accepted"] for r in runs), Counter())
    steps = sum(accepted.values())
    seconds = sum(r["seconds"] for r in runs)
    decoded = sum(r["generated"] - 1 for r in runs)  # tokens after each request's first
    exact = sum(r["text"].strip() == ref for r, ref in zip(runs, references)) / len(runs) if references else None
    return {"exact_match": exact, "tokens": tokens, "forwards": forwards, "tokens_per_forward": tokens / forwards,
            "accepted_per_step": sum(n * c for n, c in accepted.items()) / steps if steps else 0.0,
            "accepted_histogram": dict(sorted(accepted.items())),
            "ms_per_token": 1000 * seconds / tokens, "ms_per_forward": 1000 * seconds / forwards,
            "decode_ms_per_token": 1000 * sum(r["decode_seconds"] for r in runs) / max(decoded, 1),
            "decode_ms_per_step": 1000 * sum(r["decode_seconds"] for r in runs)
            / max(sum(r["later_steps"] for r in runs), 1),
            "ms_per_request_median": 1000 * statistics.median(r["seconds"] for r in runs)}


def graph_times(engine: Engine) -> dict[str, float]:
    """Device milliseconds of each CUDA graph of the run's steps: plain decode steps, or tree steps; keyed
    width x length bucket. (Replaying them after the run rewrites only idle slots.)"""
    if engine.speculative is not None:
        graphs = {f"{w}x{n}": g for (w, _, n), g in engine.speculative.graphs.items()}
    else:
        graphs = {f"{w}x{n}": g for (w, n, *_), g in engine.runner.graphs.items()}
    return {key: replay_ms(graph) for key, graph in graphs.items()}


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
