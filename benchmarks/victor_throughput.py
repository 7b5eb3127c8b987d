"""Victor's speed against the LLaVA baseline, in one run: generation throughput with the KV cache and the training
step time, random weights (they do not change the work), the same code, kernels, batch and prompts for every method.

Generation: batch `--batch` of prompts `[BOS ; N visual tokens ; M registers ; text]` (text: `--prompt` tokens after
the image), `--new-tokens` greedy tokens each (EOS ignored), through `raytrain.infer.vlm.generate` (one batched
prefill, then one decode step per token over per-layer caches). The visual tokens are random projected features:
the image tower is left out of every method (spec trap 11), so the figures are the language model's. Methods:
`baseline` (mode off), `victor` with each M in `--registers` (k = `--drop-layer`), Victor-8 with pooled registers
(`register_init: pooled`: each image's visual tokens pooled into the registers), registers without the drop
(M = 8), FastV keeping 8 visual tokens at the same k. Samples/s = batch / wall time of the whole generation
(median of `--repeats`, methods interleaved). On CPU the process's CPU time is measured too and the ratios use it:
on a machine shared with other jobs, wall time mostly measures the others.

Training step: forward + backward of the decoder on `--train-batch` rows with labels on the text, Stage-1-like (the
language model frozen: gradients flow through it to the visual side) and Stage-2-like (`--long-text` text tokens,
the language model trainable), with activation checkpointing per block as the trainer runs it; no optimizer step.

Also printed: tokens each layer processes and the prefill FLOPs by FastV's per-layer formula (spec 3.1:
F(n) = 4nd^2 + 2n^2d + 2ndm). `ratio` is Victor-8's generation throughput over the baseline's at the longest
`--new-tokens`.

    python benchmarks/victor_throughput.py --device cuda                  # Llama-2-7B shape, N 576, batch 16
    python benchmarks/victor_throughput.py --device cpu --shape cpu       # an 8-layer d=512 stand-in on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import synced_seconds  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.infer.vlm import VLMRequest, collate, generate  # noqa: E402
from raytrain.models.decoder import DecoderConfig  # noqa: E402
from raytrain.models.vit import ViTConfig  # noqa: E402
from raytrain.models.vlm import IGNORE, VictorConfig, VLMConfig, build_vlm  # noqa: E402

SHAPES = {
    "7b": DecoderConfig(name="llama2_7b_shape", vocab_size=32000, d_model=4096, n_layers=32, head_dim=128,
                        q_heads=32, kv_heads=32, ffn_dim=11008, max_seq_len=4096, qk_norm=False,
                        tie_embeddings=False),
    "cpu": DecoderConfig(name="cpu_stand_in", vocab_size=32000, d_model=512, n_layers=8, head_dim=64, q_heads=8,
                         kv_heads=8, ffn_dim=1408, max_seq_len=4096, qk_norm=False, tie_embeddings=False),
}
TOWER = ViTConfig(name="unused_tower", d_model=64, n_layers=1, n_heads=1, ffn_dim=64, num_classes=0, image_size=384)


def methods(registers: list[int], drop: int, n_layers: int) -> dict[str, VictorConfig]:
    out = {"baseline": VictorConfig(mode="off")}
    out.update({f"victor_{m}": VictorConfig(num_registers=m, drop_layer=drop) for m in registers})
    out["victor_8_pooled"] = VictorConfig(num_registers=8, drop_layer=drop, register_init="pooled")
    out["registers_8_no_drop"] = VictorConfig(num_registers=8, drop_layer=n_layers)
    out["fastv_8"] = VictorConfig(mode="fastv", keep_visual=8, drop_layer=drop)
    return out


def layer_flops(n: int, d: int, m: int) -> float:
    """FastV's per-layer prefill FLOPs for n tokens: projections, attention, FFN."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(cfg: DecoderConfig, victor: VictorConfig, before: int, visual: int, after: int) -> float:
    M = victor.registers
    full = before + visual + M + after
    if victor.mode == "off" or victor.drop_layer >= cfg.n_layers:
        return cfg.n_layers * layer_flops(full, cfg.d_model, cfg.ffn_dim)
    short = full - visual + (victor.keep_visual if victor.mode == "fastv" else 0)
    k = victor.drop_layer
    return k * layer_flops(full, cfg.d_model, cfg.ffn_dim) + (cfg.n_layers - k) * layer_flops(short, cfg.d_model,
                                                                                               cfg.ffn_dim)


def models(base: dict, shape: DecoderConfig, device: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """One decoder's random weights shared by every method (each method draws its own registers)."""
    out, shared = {}, None
    torch.manual_seed(0)
    for name, victor in base.items():
        model = build_vlm(VLMConfig(name=name, image=TOWER, decoder=shape, image_layer=-1, victor=victor), "meta")
        if shared is None:
            model.to_empty(device=device)
            for p in model.parameters():  # vectors (norm gains, biases) 1, matrices N(0, 0.02)
                torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
            model.decoder.init_buffers()
            shared = model
        else:
            model.image, model.projector, model.decoder = shared.image, shared.projector, shared.decoder
            if model.registers is not None:
                model.registers.to_empty(device=device)
                torch.nn.init.normal_(model.registers.weight, std=0.02)
        out[name] = model.to(dtype).eval()
    return out


def timed(fn, device: str) -> tuple[float, float]:
    """(wall, process CPU) seconds of `fn()`."""
    cpu = time.process_time()
    wall = synced_seconds(fn, device)
    return wall, time.process_time() - cpu


def generation(model: torch.nn.Module, visual: torch.Tensor, text: list[list[int]], new_tokens: int,
               device: str) -> tuple[float, float]:
    """Seconds to generate `new_tokens` for every row (the visual tokens handed over, the tower skipped)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [VLMRequest([1], t, params=params, visual=v) for t, v in zip(text, visual)]
    return timed(lambda: generate(model, requests, eos_id=None, pad_id=0), device)


def training_step(model: torch.nn.Module, visual: torch.Tensor, text: list[list[int]], stage: int,
                  device: str) -> tuple[float, float]:
    """Forward + backward with labels on the text. Stage 1: the language model frozen, gradients reach the visual
    tokens (the projector's output) and the registers; Stage 2: the language model trainable too."""
    model.train()
    model.decoder.activation_checkpointing = True
    for p in model.decoder.parameters():
        p.requires_grad_(stage == 2)
    rows = [([1], t, [IGNORE, IGNORE, *t[1:]]) for t in text]
    batch = collate(rows, pad_id=0, left=False, device=device)
    batch.visual = list(visual.detach().requires_grad_(True))
    elapsed = timed(lambda: model(batch).loss.backward(), device)
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 7b on cuda, cpu on cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", default="2,128")
    parser.add_argument("--registers", default="8,32,128")
    parser.add_argument("--drop-layer", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--long-text", type=int, default=1024)
    args = parser.parse_args()
    device = args.device
    shape = SHAPES[args.shape or ("7b" if device == "cuda" else "cpu")]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    new_tokens = [int(x) for x in args.new_tokens.split(",")]
    base = methods([int(x) for x in args.registers.split(",")], args.drop_layer, shape.n_layers)
    with torch.no_grad():
        built = models(base, shape, device, dtype)
    g = torch.Generator().manual_seed(1)
    text = [torch.randint(3, shape.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    visual = torch.randn(args.batch, args.visual, shape.d_model, generator=g).to(device, dtype) * 0.02

    results: dict[str, dict] = {name: {"prefill_gflop_per_sample": prefill_flops(shape, v, 1, args.visual,
                                                                                 args.prompt) / 1e9,
                                       "tokens_per_layer": tokens_per_layer(shape, v, 1 + args.visual + args.prompt,
                                                                            args.visual)}
                                for name, v in base.items()}
    clocks = ("wall", "cpu") if device == "cpu" else ("wall",)
    for name, model in built.items():  # warm-up (allocator, kernels, graphs of the shapes)
        generation(model, visual, text, min(new_tokens), device)
    for n in new_tokens:
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in built}
        for _ in range(args.repeats):  # interleaved, so load changes hit every method alike
            for name, model in built.items():
                times[name].append(generation(model, visual, text, n, device))
        for name in built:
            for i, clock in enumerate(clocks):
                results[name][f"samples_per_{clock}_s_{n}_new"] = args.batch / statistics.median(
                    t[i] for t in times[name])
        progress({name: round(results[name][f"samples_per_{clocks[-1]}_s_{n}_new"], 3) for name in built}, n)

    train_text = {1: text[:args.train_batch],
                  2: [torch.randint(3, shape.vocab_size, (args.long_text,), generator=g).tolist()
                      for _ in range(args.train_batch)]}
    for stage in (1, 2):
        pair = {"baseline": built["baseline"], "victor_8": built["victor_8"]}
        for model in pair.values():
            training_step(model, visual[:args.train_batch], train_text[stage], stage, device)
        times = {name: [] for name in pair}
        for _ in range(args.repeats):
            for name, model in pair.items():
                times[name].append(training_step(model, visual[:args.train_batch], train_text[stage], stage, device))
        for name in pair:
            for i, clock in enumerate(clocks):
                results[name][f"train_step_{clock}_s_stage{stage}"] = statistics.median(t[i] for t in times[name])

    clock = clocks[-1]  # CPU time on CPU, wall time on GPU
    longest = f"samples_per_{clock}_s_{max(new_tokens)}_new"
    ratios = {name: {k: r[k] / results["baseline"][k] for k in r if k.startswith(f"samples_per_{clock}")}
              for name, r in results.items() if name != "baseline"}
    for stage in (1, 2):
        key = f"train_step_{clock}_s_stage{stage}"
        ratios["victor_8"][f"train_step_time_stage{stage}"] = results["victor_8"][key] / results["baseline"][key]
    print(json.dumps({
        "benchmark": "victor_throughput",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores, load "
                                                                         f"{os.getloadavg()[0]:.1f})",
        "config": {"decoder": dataclasses.asdict(shape), "batch": args.batch, "visual_tokens": args.visual,
                   "text_tokens": args.prompt, "new_tokens": new_tokens, "drop_layer": args.drop_layer,
                   "dtype": str(dtype), "train_batch": args.train_batch, "long_text": args.long_text,
                   "image_tower": "excluded (random projected visual tokens)", "repeats": args.repeats},
        "results": {k: v for k, v in results.items() if k != "baseline"},
        "baseline": results["baseline"],
        "ratio": results["victor_8"][longest] / results["baseline"][longest],
        "ratios": ratios,
        "command": "python " + " ".join(sys.argv),
    }))


def tokens_per_layer(shape: DecoderConfig, victor: VictorConfig, full: int, visual: int) -> list[int]:
    """Tokens each decoder layer computes in prefill (one row)."""
    full += victor.registers
    if victor.mode == "off" or victor.drop_layer >= shape.n_layers:
        return [full] * shape.n_layers
    short = full - visual + (victor.keep_visual if victor.mode == "fastv" else 0)
    return [full] * victor.drop_layer + [short] * (shape.n_layers - victor.drop_layer)


def progress(values: dict, new_tokens: int) -> None:
    print(f"samples/s with {new_tokens} new tokens: {values}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
