"""Decode throughput of the generation engine beside Hugging Face `generate`, on the same weights, in one run.

For each model shape (random weights, bf16 on CUDA) and batch size: `batch` prompts of `--prompt` tokens each
generate exactly `--new` tokens (greedy, `ignore_eos`) through `Engine.generate`; then the same model as a
`transformers.LlamaForCausalLM` (the Llama shapes only: OpenELM has no transformers class) runs `generate` with the
same prompts. Figures: end-to-end tokens/s (prefill included), decode tokens/s (after every sequence's first token;
for transformers, the 1-token run's time subtracted), and the fraction of the memory-bandwidth limit the decode
step reaches: bytes one step must read (every weight once, plus the KV cache of every row at its mean length)
over the measured step time, over `--bandwidth` (4.8 TB/s, the H200's datasheet figure). With `--prefill`, each
variant's packed prefill forward of 1 and of 8 prompts of `--prompt` tokens, eager and as a static-shape CUDA graph
(the engine's way): its wall time and the host's time to queue it (the call returning, before the device is
synchronised): equal times mean the forward waits on the host (kernel launches), not on the device. On CUDA, what
limits the step: `graph_ms`, the device time of the decode step's CUDA graph alone (replayed back to back), beside
`step_ms` (the engine's step, host included); with `--profile`, the kernels of one eager decode step (name, count,
total device microseconds) of the first model, batch and variant run, and their sum against the graph's time (the
rest is gaps between kernels); `host_ms`, the host's own time per step (the step less its wait for the device).
Graph and profile run with the rows at the run's mean position, so attention reads as many keys as in the run.
Variant `unfused_decode` runs one-row steps through the model's forward instead of the fused step
(`raytrain/infer/fused_decode.py`); with `--gemv`, each projection's Triton GEMV as the fused step calls it (RMSNorm,
SwiGLU, residual) over a sweep of block shapes, against cuBLAS's product alone, for each model.

    python benchmarks/decode.py --device cuda                      # the issue's table (about 5 minutes on an H200)
    python benchmarks/decode.py --device cuda --no-hf --models openelm_1_1b --batches 1,64 --variants eager,fused
    python benchmarks/decode.py --device cuda --no-hf --models openelm_1_1b --batches 1 --new 16 --prefill
    python benchmarks/decode.py --device cuda --no-hf --models tinyllama_1_1b --batches 1 \
        --variants fused,unfused_decode
    python benchmarks/decode.py --device cuda --no-hf --models tinyllama_1_1b --batches 1 --new 128 --gemv
    python benchmarks/decode.py --device cpu --models tiny --batches 1,4 --prompt 32 --new 16   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import capture, replay_ms, sync, synced_seconds  # noqa: E402
from raytrain.checkpoint.foreign import llama_config, llama_state  # noqa: E402
from raytrain.data.corpus import documents  # noqa: E402
from raytrain.data.tokenizer import train_bpe  # noqa: E402
from raytrain.infer.engine import Engine, EngineConfig, Request  # noqa: E402
from raytrain.infer.kv_cache import SlotKVCache  # noqa: E402
from raytrain.infer.model_runner import ModelRunner  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.models.decoder import Decoder, build_decoder  # noqa: E402
from raytrain.models.registry import model_config  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
# Hugging Face Llama shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
VARIANTS = {"eager": {"fused_kernels": False, "fused_attention": False}, "torch_attention": {"fused_attention": False},
            "fused": {}, "unfused_decode": {"fused_decode": False},
            "no_dependent_launch": {"dependent_launch": False}, "compiled": {"compile_decode": True}}
LLAMA_SHAPES = {"tinyllama_1_1b": (2048, 5632, 22, 32, 4, 32000), "llama2_7b": (4096, 11008, 32, 32, 32, 32000),
                "tiny": (128, 256, 2, 4, 2, 4096),
                "llama2_7b_narrow": (256, 512, 32, 32, 32, 32000)}  # the 7B's layers and heads: its host work


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="openelm_1_1b,tinyllama_1_1b,llama2_7b",
                   help="conf/model presets and/or " + ", ".join(LLAMA_SHAPES))
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s the bandwidth fraction is taken of")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--variants", default="fused", help="engine settings to compare, of: " + ", ".join(VARIANTS))
    p.add_argument("--profile", action="store_true", help="the kernel table of one decode step (CUDA)")
    p.add_argument("--prefill", action="store_true", help="host and wall time of packed prefill forwards")
    p.add_argument("--gemv", action="store_true", help="the Triton GEMV against cuBLAS on each weight shape (CUDA)")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tokenizer = train_bpe(documents()[:200], vocab_size=4096)
    variants = args.variants.split(",")
    check = greedy_check(tokenizer, args.device, VARIANTS["fused" if "fused" in variants else variants[0]])
    print("check", check, file=sys.stderr, flush=True)
    results: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    profile = None
    for name in args.models.split(","):
        model, hf = build(name, args.device, dtype)
        results[name] = {"params": sum(p.numel() for p in model.parameters())}
        if args.gemv and args.device == "cuda":
            results[name]["gemv"] = gemv_times(model, args.bandwidth)
            print(name, "gemv", json.dumps(results[name]["gemv"]), file=sys.stderr, flush=True)
        for batch in args.batches:
            for variant in variants:
                key = batch if variant == "fused" else f"{batch}_{variant}"
                results[name][key], engine = engine_run(model, tokenizer, batch, args, VARIANTS[variant])
                if args.prefill and f"prefill_{variant}" not in results[name]:
                    results[name][f"prefill_{variant}"] = prefill_times(model, args)
                if args.profile and profile is None and args.device == "cuda":
                    profile = kernel_profile(engine, batch, args)
                    print("profile", json.dumps(profile), file=sys.stderr, flush=True)
                del engine
                print(name, key, results[name][key], file=sys.stderr, flush=True)
            if hf is not None and not args.no_hf:
                baseline.setdefault(name, {})[batch] = hf_run(hf, batch, args)
                print(name, batch, "hf", baseline[name][batch], file=sys.stderr, flush=True)
        del model, hf
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    ratios = {name: {b: results[name][b]["decode_tokens_per_s"] / baseline[name][b]["decode_tokens_per_s"]
                     for b in baseline[name] if b in results[name]} for name in baseline}
    print(json.dumps({
        "benchmark": "decode", "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"prompt": args.prompt, "new": args.new, "batches": args.batches, "dtype": str(dtype),
                   "sampling": "greedy, ignore_eos", "weights": "random", "torch": torch.__version__},
        "results": results, "baseline": {"transformers_generate": baseline}, "ratio": ratios, "check": check,
        "profile": profile,
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


def gemv_blocks(k: int) -> list[tuple[int, int, int]]:
    """The sweep's (output rows per program, strip, warps): strips up to K rounded up, at most 8k weights a load."""
    strips = [s for s in (512, 1024, 2048, 4096, 8192) if s <= max(512, 1 << (k - 1).bit_length())]
    return [(n, s, w) for n in (1, 2, 4, 8, 16) for s in strips for w in (4, 8) if n * s <= 8192]


def gemv_times(model: Decoder, bandwidth: float) -> dict[str, Any]:
    """Per projection role and distinct weight shape (N, K): microseconds of one row times W through cuBLAS
    (`torch.matmul`, the product alone) and through the Triton GEMV as the fused decode step calls it (RMSNorm
    first for qkv, gate_up and head; SwiGLU for gate_up; the residual for out and down) at its default block and at
    each of `gemv_blocks` (CUDA graphs of 20 calls, so launches do not count; one matrix up to ~46 MB may stay in the
    50 MB L2, so bandwidths are upper bounds), and the bandwidth each reaches."""
    from raytrain.infer.gemv_kernel import block_shape, gemv

    eps = model.cfg.norm_eps
    roles: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
    for block in model.layers:
        gain = block.attn_norm.weight
        for role, weight, fused in (("qkv", block.attn.qkv_proj.weight, {"norm": gain, "eps": eps}),
                                    ("out", block.attn.out_proj.weight, {"residual": True}),
                                    ("gate_up", block.ffn.proj_1.weight, {"norm": gain, "eps": eps, "swiglu": True}),
                                    ("down", block.ffn.proj_2.weight, {"residual": True})):
            roles.setdefault("{}_{}x{}".format(role, *weight.shape), (weight, fused))
    roles["head_{}x{}".format(*model.head.weight.shape)] = (model.head.weight, {"norm": model.norm.weight, "eps": eps})
    table = {}
    for label, (weight, fused) in roles.items():
        n, k = weight.shape
        x = torch.randn(1, k, device=weight.device, dtype=weight.dtype)
        if fused.pop("residual", False):
            fused["residual"] = torch.randn(1, n, device=weight.device, dtype=weight.dtype)
        calls = {"cublas": lambda: torch.matmul(x, weight.t()), "default": lambda: gemv(x, weight, **fused)}
        calls |= {f"triton_{bn}x{bk}w{nw}": (lambda b=(bn, bk, nw): gemv(x, weight, b, **fused))
                  for bn, bk, nw in gemv_blocks(k)}
        times = {name: graph_us(call) for name, call in calls.items()}
        best = min(t for name, t in times.items() if name != "cublas")
        outputs = n // 2 if fused.get("swiglu") else n
        table[label] = {"us": times, "default_block": block_shape(outputs, k, fused.get("swiglu", False)),
                        "best_block": min((t, name) for name, t in times.items() if name.startswith("triton"))[1],
                        "best_over_cublas": times["cublas"] / best,
                        "default_over_cublas": times["cublas"] / times["default"],
                        "cublas_bandwidth": 2 * n * k / times["cublas"] / 1e-6 / bandwidth,
                        "default_bandwidth": 2 * n * k / times["default"] / 1e-6 / bandwidth,
                        "best_bandwidth": 2 * n * k / best / 1e-6 / bandwidth}
    return table


def graph_us(call: Any, calls: int = 20) -> float:
    """Device microseconds of one `call`, from a CUDA graph of `calls` of them replayed back to back."""
    return 1e3 * replay_ms(capture([call] * calls)) / calls


def build(name: str, device: str, dtype: torch.dtype, max_positions: int = 4096
          ) -> tuple[Decoder, torch.nn.Module | None]:
    """Our decoder for `name`, and the transformers Llama it was converted from (None for raytrain presets);
    `max_positions` is a Llama shape's context (its RoPE tables and the engine's longest prompt)."""
    torch.manual_seed(0)
    if name not in LLAMA_SHAPES:
        cfg = model_config(OmegaConf.load(CONF / f"{name}.yaml"))
        cfg.vocab_rows = None
        return build_decoder(cfg, device).to(dtype).eval(), None
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = LLAMA_SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max_positions, tie_word_embeddings=False)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval()
    cfg = llama_config(config.to_dict())
    model = build_decoder(cfg, "meta")
    model.load_state_dict(llama_state(hf.state_dict(), cfg), strict=False, assign=True)
    model.init_buffers()
    return model.eval(), hf


def greedy_check(tokenizer: Any, device: str, variant: dict[str, Any]) -> dict[str, Any]:
    """The engine as the benchmark runs it (CUDA graphs, overlapped steps, staggered lengths) against transformers'
    greedy `generate`, in float32 on the tiny Llama shape: how many of 8 requests come out token for token equal."""
    model, hf = build("tiny", device, torch.float32)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=4, max_model_len=256, max_step_tokens=64, **variant))
    batch = [p[:20 + 9 * i] for i, p in enumerate(prompts(8, 90, 4096))]
    news = [40 + 7 * i for i in range(8)]
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                            for p, n in zip(batch, news)])
    equal, wants = 0, []
    for p, n, out in zip(batch, news, outs):
        ids = torch.tensor([p], device=device)
        with torch.inference_mode():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        equal += out.token_ids == want
        wants.append(want)
    alone = Engine(model, tokenizer, EngineConfig(max_batch_size=1, max_model_len=256, max_step_tokens=64, **variant))
    outs = alone.generate([Request(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                           for p, n in zip(batch, news)])  # one slot: every decode step has one row
    return {"requests": len(batch), "equal_to_transformers": equal, "graphs": len(engine.runner.graphs),
            "overlap": engine.overlap, "one_slot_equal_to_transformers": sum(
                o.token_ids == w for o, w in zip(outs, wants)), "one_slot_fused_decode": alone.runner.fused_step
            is not None}


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return torch.randint(10, vocab, (batch, length), generator=gen).tolist()


def engine_run(model: Decoder, tokenizer: Any, batch: int, args: argparse.Namespace,
               variant: dict[str, Any]) -> tuple[dict[str, float], Engine]:
    cfg = EngineConfig(max_batch_size=batch, max_model_len=args.prompt + args.new,
                       max_step_tokens=max(2048, args.prompt), **variant)
    engine = Engine(model, tokenizer, cfg)
    params = SamplingParams(max_new_tokens=args.new, temperature=0, ignore_eos=True)
    requests = [Request(p, params) for p in prompts(batch, args.prompt, model.cfg.vocab_size)]
    engine.generate(requests)  # warm-up: CUDA graphs captured, kernels loaded
    sync(args.device)
    engine.decode_rows.clear()
    waits = host_waits() if args.device == "cuda" else contextlib.nullcontext([])
    with waits as waited:
        start = time.perf_counter()
        outs = engine.generate(requests)
        sync(args.device)
        total = time.perf_counter() - start
    first = max(o.ttft_s for o in outs)  # every sequence has its first token: the rest is decode
    step_s = (total - first) / (args.new - 1)
    result = {"tokens_per_s": batch * args.new / total, "decode_tokens_per_s": batch * (args.new - 1) / (total - first),
              "step_ms": 1e3 * step_s, "bandwidth_fraction": step_bytes(model, batch, args) / step_s / args.bandwidth,
              "ttft_s": first, "full_decode_steps": engine.decode_rows[batch]}
    if waited:  # the host's own time per step is the step less its waits for the device
        result["host_ms"] = 1e3 * (total - sum(waited)) / len(waited)
    if engine.runner.cuda_graphs:
        result["graph_ms"] = graph_ms(engine, *decode_bucket(engine, batch, args), mean_position(args))
    return result, engine


@contextlib.contextmanager
def host_waits() -> Iterator[list[float]]:
    """Seconds the host spends in each `torch.cuda.Event.synchronize` (the engine's one wait per step) meanwhile."""
    waited: list[float] = []
    original = torch.cuda.Event.synchronize

    def timed(event: torch.cuda.Event) -> None:
        start = time.perf_counter()
        original(event)
        waited.append(time.perf_counter() - start)

    torch.cuda.Event.synchronize = timed
    try:
        yield waited
    finally:
        torch.cuda.Event.synchronize = original


def prefill_times(model: Decoder, args: argparse.Namespace, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Median wall and host-queueing milliseconds of one packed prefill forward of 1 and of 8 prompts, eager and
    as the engine runs it (a static-shape bucket, a CUDA graph on the GPU), the kernels as the variant set them up."""
    out = {}
    for mode, static_tokens in (("eager", 0), ("static", 2 * 2048)):
        runner = ModelRunner(model, 8, args.prompt + 1, static_prefill_tokens=static_tokens)
        for rows in (1, 8):
            chunks = prompts(rows, args.prompt, model.cfg.vocab_size)
            host, wall = [], []
            for _ in range(repeats + 2):  # two warm-ups: compilation of new shapes, graph capture, allocation
                sync(args.device)
                start = time.perf_counter()
                runner.prefill_packed(list(range(rows)), chunks)
                host.append(time.perf_counter() - start)
                sync(args.device)
                wall.append(time.perf_counter() - start)
            out[f"{mode}_{rows}x{args.prompt}"] = {"wall_ms": 1e3 * statistics.median(wall[2:]),
                                                   "host_ms": 1e3 * statistics.median(host[2:])}
        del runner
    return out


def decode_bucket(engine: Engine, batch: int, args: argparse.Namespace) -> tuple[int, int]:
    """The (width, length) bucket of the run's last decode steps."""
    return engine.runner.decode_shape(batch - 1, args.prompt + args.new - 1)


def graph_ms(engine: Engine, width: int, length: int, position: int) -> float:
    """Device time of one decode-step graph, replayed back to back, its rows at `position` (attention reads that
    many keys) writing to the scratch index (the engine is idle: nothing is overwritten)."""
    graph = next(g for (w, n, shifted, adapted, _), g in engine.runner.graphs.items()
                 if (w, n, shifted, adapted) == (width, length, False, False))  # the run's graph, greedy or not
    with at_position(engine.runner, width, position):
        return replay_ms(graph)


@contextlib.contextmanager
def at_position(runner: ModelRunner, width: int, position: int) -> Iterator[None]:
    """Rows 0..width-1 of an idle runner at `position` (the run's mean) for timing; idle again after."""
    runner.positions[:width] = position
    try:
        yield
    finally:
        runner.positions[:width] = 0


def kernel_profile(engine: Engine, batch: int, args: argparse.Namespace, steps: int = 10) -> dict[str, Any]:
    """The kernels of one eager decode step at the run's bucket: per kernel name, launches and device time per step."""
    from torch.profiler import ProfilerActivity, profile

    width, length = decode_bucket(engine, batch, args)
    runner = engine.runner
    with torch.inference_mode(), at_position(runner, width, mean_position(args)):
        runner._forward(width, length)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner._forward(width, length)
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count]
    table = sorted(({"kernel": e.key[:90], "per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
                    for e in kernels), key=lambda k: -k["us_per_step"])
    return {"width": width, "length": length, "kernels_per_step": sum(k["per_step"] for k in table),
            "kernel_us_per_step": sum(k["us_per_step"] for k in table),
            "graph_us": 1e3 * graph_ms(engine, width, length, mean_position(args)), "top": table[:25]}


def mean_position(args: argparse.Namespace) -> int:
    return args.prompt + args.new // 2


def step_bytes(model: Decoder, batch: int, args: argparse.Namespace) -> float:
    """Bytes one decode step must read: every weight once (the embedding rows read are negligible, the output
    head counts in full) and each row's KV cache at the mean length of the run."""
    dtype_bytes = model.embed.weight.element_size()
    weights = sum(p.numel() for p in model.parameters()) - (0 if model.cfg.tie_embeddings else model.embed.weight.numel())
    kv = SlotKVCache.bytes_per_token([b.attn.n_kv for b in model.layers], model.cfg.head_dim, model.embed.weight.dtype)
    return weights * dtype_bytes + batch * (args.prompt + args.new / 2) * kv


def hf_run(hf: torch.nn.Module, batch: int, args: argparse.Namespace) -> dict[str, float]:
    device = next(hf.parameters()).device
    ids = torch.tensor(prompts(batch, args.prompt, hf.config.vocab_size), device=device)

    @torch.inference_mode()
    def timed(new: int) -> float:
        return synced_seconds(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                  min_new_tokens=new, do_sample=False, pad_token_id=0), args.device)

    timed(2)  # warm-up
    prefill, total = timed(1), timed(args.new)
    return {"tokens_per_s": batch * args.new / total, "decode_tokens_per_s": batch * (args.new - 1) / (total - prefill),
            "step_ms": 1e3 * (total - prefill) / (args.new - 1)}


if __name__ == "__main__":
    main()
