"""SeedLM on one GPU: the fused decode matmul against bf16 `torch.matmul`, the dense decode that serves prefill, the
seed search, and decode tokens/s of a compressed model on today's engine. Prints a table, then one JSON line.

    python benchmarks/seedlm_kernel.py --device cuda --out DIR    # H200: about 5 minutes
    python benchmarks/seedlm_kernel.py --device cpu               # no kernels: the baselines at small shapes, search

Shapes are [out, in] weights (4096x14336 is Llama-3-8B's down projection, 14336x4096 its gate/up). Weights hold random
codes (every code is valid and the kernels' work does not depend on the values), so no hours-long search is needed.
Before any timing each kernel variant is checked against the reference decoder `seedlm.decode`: the dense decode
bitwise on the whole weight (fp32, and bf16 rounding), the fused matmul bitwise on one-hot rows of x (16 columns through
the batch-1 kernel and 16 through the batch-2..16 kernel), and bf16 y against the bf16 dense matmul; a variant that
fails a check is reported and not timed.

Timing: each call runs inside a CUDA graph (the way a decode step runs in a graph-captured engine: no launch
overhead), cycling over enough copies of the weight to exceed 3x the L2 cache, so every call reads its weight from
HBM as in a multi-layer decode step; the figure is the median over replays, per call. Each (shape, batch) sweeps the
stream variant and tile configs and keeps the fastest; `default_us` times what `seedlm_matmul(x, weight)` runs
(`default_stream`, `default_config`), as the engine calls it; `bandwidth_fraction` is the bytes a call must read
(compressed weight, x) over its time, relative to a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import itertools
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import capture, cold_copies, median_seconds, synced_seconds  # noqa: E402
from raytrain.compress import seedlm  # noqa: E402
from raytrain.compress.format import CompressedTensor  # noqa: E402

GPU_SHAPES = "4096x4096,4096x14336,14336x4096"
CPU_SHAPES = "1024x1024,1024x3584,3584x1024"
GEMV_TILES = [(4, 4, 1), (8, 4, 1), (4, 8, 1), (8, 8, 1), (4, 2, 1), (8, 2, 1), (1, 4, 1), (4, 4, 4)]
# 64 rows or more a warp group: Hopper's wgmma takes the rebuilt tile (fewer instructions a weight than mma.sync's
# operand shuffles at 32 rows; benchmarks/seedlm_sass.py); 16 rows a warp: dealt in the MMA's fragment order unless
# a fifth entry says False (the default tile in row order, for comparison)
DOT_TILES = [(16, 32, 4, 1), (32, 32, 4, 4), (64, 32, 4, 8), (64, 16, 8, 4), (64, 16, 8, 8), (64, 16, 8, 16),
             (64, 16, 4, 8), (64, 16, 4, 8, False), (64, 16, 4, 16), (64, 8, 4, 8), (64, 8, 4, 16), (64, 8, 4, 32),
             (128, 16, 8, 8), (128, 16, 8, 16), (128, 8, 8, 16)]
SEARCH_TILES = [(256, 4), (512, 4), (512, 8), (1024, 8)]
PREFILL_TOKENS = 2048


def random_weight(rows: int, cols: int, cfg: seedlm.SeedLMConfig, seed: int = 0) -> CompressedTensor:
    """Random codes with exponents -8..-4 (weights of order 1e-2, like an LLM's)."""
    g = torch.Generator().manual_seed(seed)
    bpr = math.ceil(cols / cfg.C)
    codes = {"offsets": torch.randint(0, cfg.lfsr.period, (rows, bpr), generator=g, dtype=torch.int32),
             "exponents": torch.randint(-8, -3, (rows, bpr), generator=g, dtype=torch.int8),
             "coefficients": torch.randint(-8, 8, (rows, bpr, cfg.P), generator=g, dtype=torch.int8)}
    return CompressedTensor.from_codes("seedlm", cfg, codes, (rows, cols), torch.bfloat16)


# ---- timing ------------------------------------------------------------------------------------------------------

def timed(calls: list[Callable[[], Any]], reps: int = 20) -> float:
    """Median seconds per call: of `calls` replayed back to back in one CUDA graph on a GPU, by wall clock on CPU
    (where this only smoke-tests the script)."""
    if not torch.cuda.is_available():
        return cpu_time(lambda: [call() for call in calls], reps=2) / len(calls)
    graph = capture(calls)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def cpu_time(call: Callable[[], Any], reps: int = 5) -> float:
    return median_seconds(call, "cpu", reps, warmup=1)


def copies_for(nbytes: int) -> int:
    """Copies of an operand to cycle through so that one pass exceeds 3x the L2 cache (cold reads)."""
    return cold_copies(nbytes, 64) if torch.cuda.is_available() else 3


def weight_copies(weight: Any) -> list[Any]:
    """A `SeedLMWeight` and copies of its words (the small table and masks shared), `copies_for` its bytes."""
    return [weight] + [dataclasses.replace(weight, words=weight.words.clone())
                       for _ in range(copies_for(weight.stored_bytes) - 1)]


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy: the memory ceiling of this run."""
    src = torch.empty(2 << 30 if device == "cuda" else 1 << 24, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed([lambda: dst.copy_(src)], reps=10)


# ---- one shape ---------------------------------------------------------------------------------------------------

def check_variant(km: Any, weight: Any, reference: torch.Tensor, g: torch.Generator, device: str
                  ) -> dict[str, Any]:
    """Bitwise checks against seedlm.decode (see the module docstring) and y's error in half precision: bf16 on a
    GPU, fp16 under the interpreter (whose bf16 conversion truncates and whose bf16 tl.dot is wrong)."""
    rows, cols = reference.shape
    half = torch.bfloat16 if device == "cuda" else torch.float16
    checks: dict[str, Any] = {"dense_bitwise": torch.equal(km.seedlm_dense(weight, torch.float32), reference),
                              f"dense_{str(half)[6:]}_bitwise": torch.equal(km.seedlm_dense(weight, half),
                                                                             reference.to(half))}
    picked = torch.randperm(cols, generator=g)[:16].to(device)
    eye = torch.zeros(16, cols, device=device)
    eye[torch.arange(16), picked] = 1
    checks["gemv_one_hot_bitwise"] = all(torch.equal(km.seedlm_matmul(eye[i:i + 1], weight)[0],
                                                     reference[:, picked[i]]) for i in range(16))
    checks["dot_one_hot_bitwise"] = torch.equal(km.seedlm_matmul(eye, weight).T, reference[:, picked])
    errors = {}
    for batch in (1, 8):
        x = torch.randn(batch, cols, device=device, dtype=half)
        y = km.seedlm_matmul(x, weight).float()
        y_ref = x.float() @ reference.to(half).float().T
        errors[f"batch{batch}"] = float((y - y_ref).abs().max() / y_ref.abs().max())
    checks["y_half_max_rel_err"] = errors
    checks["exact"] = all(v for k, v in checks.items() if k.endswith("bitwise")) and max(errors.values()) < 2e-2
    return checks


def sweep(km: Any, weights: list[Any], xs: list[torch.Tensor], tiles: list[Any]) -> tuple[dict | None, list[dict]]:
    """Time every tile config, with and without prefetching the next step's words (cycling over the weight copies);
    the fastest, and every attempt."""
    attempts = []
    for tile, prefetch in itertools.product(tiles, (True, False)):
        if len(tile) == 3:
            cfg = km.KernelConfig(block_m=tile[0], block_n=32 * tile[1], num_warps=tile[1], split_k=tile[2],
                                  prefetch=prefetch)
        else:
            cfg = km.KernelConfig(block_m=tile[0], block_n=tile[1], num_warps=tile[2], split_k=tile[3],
                                  prefetch=prefetch, fragment_order=tile[4] if len(tile) > 4 else True)
        entry = {"tile": dataclasses.asdict(cfg)}
        try:
            calls = [lambda w=w, x=x: km.seedlm_matmul(x, w, cfg) for w, x in zip(weights, xs)]
            entry["us"] = 1e6 * timed(calls)
        except Exception as e:  # a tile the compiler or the device refuses: reported, the sweep goes on
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        attempts.append(entry)
    done = [a for a in attempts if "us" in a]
    return (min(done, key=lambda a: a["us"]) if done else None), attempts


def bench_shape_kernels(rows: int, cols: int, batches: list[int], cfg: seedlm.SeedLMConfig, ceiling: float,
                        streams: list[str], device: str, tiles: int) -> dict[str, Any]:
    from raytrain.compress.kernels import seedlm_matmul as km

    ct = random_weight(rows, cols, cfg)
    ct_device = ct.to(device)
    reference = seedlm.decode(ct_device.codes(), cfg, cols)  # fp32, the reference decoder on the device
    dense = reference.to(torch.bfloat16)
    g = torch.Generator().manual_seed(rows + cols)
    out: dict[str, Any] = {"checks": {}}
    variants = {}
    for stream in streams:
        try:
            variants[stream] = km.SeedLMWeight.from_compressed(ct, device, stream)
            out["checks"][stream] = check_variant(km, variants[stream], reference, g, device)
        except Exception as e:  # reported; the other variant is still timed
            out["checks"][stream] = {"exact": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    usable = {s: w for s, w in variants.items() if out["checks"][s]["exact"]}
    out["exact"] = len(usable) == len(streams)
    weight_bytes = next(iter(variants.values())).stored_bytes if variants else 0
    n_dense = copies_for(dense.numel() * 2)
    denses = [dense] + [dense.clone() for _ in range(n_dense - 1)]
    for batch in batches:
        xs_dense = [torch.randn(batch, cols, device=device, dtype=torch.bfloat16) for _ in range(n_dense)]
        row: dict[str, Any] = {"bf16_matmul_us": 1e6 * timed([lambda w=w, x=x: x @ w.T
                                                              for w, x in zip(denses, xs_dense)])}
        x_bytes = batch * cols * 2
        row["bf16_bandwidth_fraction"] = (dense.numel() * 2 + x_bytes) / (row["bf16_matmul_us"] / 1e6) / ceiling
        best = None
        for stream, weight in usable.items():
            copies = weight_copies(weight)
            xs = [torch.randn(batch, cols, device=device, dtype=torch.bfloat16) for _ in copies]
            fastest, attempts = sweep(km, copies, xs, (GEMV_TILES if batch == 1 else DOT_TILES)[:tiles])
            row[f"{stream}_tiles"] = attempts
            if stream == km.default_stream(rows, cols):  # what seedlm_matmul(x, weight) runs, as the engine calls it
                row["default_us"] = 1e6 * timed([lambda w=w, x=x: km.seedlm_matmul(x, w) for w, x in zip(copies, xs)])
                row["default_tile"] = dataclasses.asdict(km.default_config(batch, rows, weight.blocks_per_row))
                row["default_speedup_vs_bf16"] = row["bf16_matmul_us"] / row["default_us"]
            if fastest and (best is None or fastest["us"] < best["us"]):
                best = {**fastest, "stream": stream}
        if best:
            row["fused_us"], row["fused_tile"], row["fused_stream"] = best["us"], best["tile"], best["stream"]
            row["speedup_vs_bf16"] = row["bf16_matmul_us"] / best["us"]
            row["bandwidth_fraction"] = (weight_bytes + x_bytes) / (best["us"] / 1e6) / ceiling
        out[f"batch{batch}"] = row
    if 1 in batches:
        x1 = torch.randn(1, cols, device=device, dtype=torch.bfloat16)
        out["batch1"]["dequant_matmul_us"] = 1e6 * synced(lambda: x1 @ ct_device.dense().to(torch.bfloat16).T,
                                                          device)
    if usable:
        out["dense_stream"], weight = next(iter(usable.items()))
        copies = weight_copies(weight)
        out["dense_decode_us"] = 1e6 * timed([lambda w=w: km.seedlm_dense(w, torch.bfloat16) for w in copies])
        x = torch.randn(PREFILL_TOKENS, cols, device=device, dtype=torch.bfloat16)
        bf16 = 1e6 * timed([lambda: x @ dense.T], reps=10)
        fused = 1e6 * timed([lambda: x @ km.seedlm_dense(weight, torch.bfloat16).T], reps=10)
        out[f"prefill_{PREFILL_TOKENS}"] = {"bf16_matmul_us": bf16, "dense_decode_matmul_us": fused,
                                            "cost_vs_bf16": fused / bf16}
    return out

def bench_shape_cpu(rows: int, cols: int, batches: list[int], cfg: seedlm.SeedLMConfig) -> dict[str, Any]:
    ct = random_weight(rows, cols, cfg)
    dense = ct.dense().to(torch.bfloat16)
    out = {}
    for batch in batches:
        x = torch.randn(batch, cols, dtype=torch.bfloat16)
        out[f"batch{batch}"] = {"bf16_matmul_us": 1e6 * cpu_time(lambda: x @ dense.T, 10),
                                "dequant_matmul_us": 1e6 * cpu_time(lambda: x @ ct.dense().to(torch.bfloat16).T, 3)}
    return out


# ---- search ------------------------------------------------------------------------------------------------------

def search_speed(cfg: seedlm.SeedLMConfig, device: str, blocks: int, fused: bool) -> dict[str, Any]:
    """Blocks/s of the PyTorch search and of the fused kernel over its tile sweep, with the fused codes'
    reconstruction error compared to the PyTorch search's on a sample."""
    w = torch.randn(blocks, cfg.C, generator=torch.Generator().manual_seed(cfg.P))
    torch_blocks = blocks if device == "cpu" else min(blocks, 32768)
    seedlm.search_torch(w[:64], cfg, device)  # tables and warm-up
    out: dict[str, Any] = {"torch_blocks_per_s": torch_blocks / synced(
        lambda: seedlm.search_torch(w[:torch_blocks], cfg, device), device)}
    if fused:
        from raytrain.compress.kernels import seedlm_search

        wd = w.to(device)
        tiles = {}
        for block_b, warps in SEARCH_TILES:
            try:
                tiles[f"{block_b}x{warps}"] = blocks / synced(lambda: seedlm_search.search(wd, cfg, block_b, warps),
                                                              device)
            except Exception as e:  # reported, the sweep goes on
                tiles[f"{block_b}x{warps}"] = f"{type(e).__name__}: {str(e)[:200]}"
        speeds = [v for v in tiles.values() if isinstance(v, float)]
        out["fused_blocks_per_s"] = max(speeds) if speeds else None
        out["fused_tiles"] = tiles
        sample = w[:4096]
        got, want = seedlm_search.search(sample.to(device), cfg), seedlm.search_torch(sample, cfg, device)
        err = [(_reconstruct(c, cfg) - sample).square().sum(1) for c in (got, want)]
        same = torch.stack([(got[k] == want[k]).reshape(len(sample), -1).all(1) for k in want]).all(0)
        out["sample_check"] = {"blocks": len(sample), "same_codes": float(same.float().mean()),
                               "max_error_ratio": float((err[0] / err[1].clamp_min(1e-30)).max())}
    return out


def _reconstruct(codes: dict[str, torch.Tensor], cfg: seedlm.SeedLMConfig) -> torch.Tensor:
    nb = codes["offsets"].shape[0]
    return seedlm.decode({k: v[None].cpu() for k, v in codes.items()}, cfg, nb * cfg.C).view(nb, cfg.C)


def synced(call: Callable[[], Any], device: str) -> float:
    """Seconds for one call after a warm-up one, synchronised (the slow paths: the reference dequantise-then-matmul,
    whole searches, generations)."""
    call()
    return synced_seconds(call, device)


# ---- end to end --------------------------------------------------------------------------------------------------

def engine_decode(model_name: str, bits: int, new_tokens: int, device: str, streams: list[str]) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s on today's engine: a `conf/model` preset with random bf16 weights, then the same
    model with every linear layer of its blocks a CompressedLinear of random SeedLM codes, once per kernel stream
    ("auto": each weight's `default_stream`). On CUDA every model must decode through the fused step
    (`FusedDecodeStep`: five Triton kernels a layer, SeedLM projections through `seedlm_gemv`); `decode_path` records
    which path each ran (on CPU the model's forward)."""
    from omegaconf import OmegaConf

    from raytrain.compress.linear import replace_linears
    from raytrain.data.corpus import documents
    from raytrain.data.tokenizer import train_bpe
    from raytrain.infer.engine import Engine, Request
    from raytrain.infer.fused_decode import fused_decode_unsupported
    from raytrain.infer.sampling import SamplingParams
    from raytrain.models.registry import build_model, model_config

    preset = model_config(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model"
                                         / f"{model_name}.yaml"))
    tokenizer = train_bpe(documents(), vocab_size=preset.vocab_size)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(dataclasses.replace(preset, vocab_size=len(tokenizer)), device).to(dtype).eval()
    request = Request(list(range(3, 35)), SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))

    def tokens_per_s() -> dict[str, Any]:
        engine = Engine(model, tokenizer)
        path = "fused_step" if engine.runner.fused_step is not None else "forward"
        if device == "cuda" and path != "fused_step":
            raise RuntimeError(f"the engine decodes without the fused step: {fused_decode_unsupported(model)}")
        runs = [new_tokens / synced(lambda: engine.generate([request]), device) for _ in range(3)]
        parts = projection_us(engine.runner.fused_step, model, dtype) if path == "fused_step" else {}
        return {"tokens_per_s": statistics.median(runs), "decode_path": path, "projection_us_per_token": parts}

    bf16 = tokens_per_s()
    cfg = seedlm.SeedLMConfig.for_bits(bits)
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not model.head and m.bias is None]
    codes = {f"{name}.weight": random_weight(m.out_features, m.in_features, cfg, seed=i)
             for i, (name, m) in enumerate(linears)}
    compressed = {}
    for stream in streams:
        replace_linears(model, codes, device, stream=None if stream == "auto" else stream)
        compressed[stream] = tokens_per_s()
        compressed[stream]["speedup"] = compressed[stream]["tokens_per_s"] / bf16["tokens_per_s"]
    return {"model": model_name, "new_tokens": new_tokens, "linears_compressed": len(linears), "bf16": bf16,
            "seedlm": compressed}


def projection_us(step: Any, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, float]:
    """Microseconds a decode token spends in each kind of the fused step's projections, all layers' calls of a kind
    replayed back to back (`timed`, one CUDA graph): RMSNorm + QKV, output + residual, RMSNorm + gate/up + SwiGLU,
    down + residual. Where the step's time goes, bf16 against SeedLM."""
    from benchmarks.seedlm_fused_gemv import block_projections

    device = model.embed.weight.device
    kinds: dict[str, list[Callable[[], Any]]] = {}
    for block in model.layers:
        for kind, linear, norm, swiglu, residual in block_projections(block):
            x = torch.randn(1, linear.in_features, device=device, dtype=dtype)
            res = torch.randn(1, linear.out_features, device=device, dtype=dtype) if residual else None
            kinds.setdefault(kind, []).append(lambda linear=linear, x=x, norm=norm, swiglu=swiglu, res=res:
                                              step._project(linear, x, norm=norm, swiglu=swiglu, residual=res))
    return {kind: 1e6 * timed(calls) * len(calls) for kind, calls in kinds.items()}


# ---- report ------------------------------------------------------------------------------------------------------

def table(results: dict[str, Any], batches: list[int]) -> str:
    lines = ["shape | batch | bf16 us | fused us (stream, tile) | fused/bf16 | default tile us | default/bf16 | "
             "HBM fraction fused / bf16", "--- | --- | --- | --- | --- | --- | --- | ---"]
    for shape, r in results.items():
        for b in batches:
            row = r.get(f"batch{b}", {})
            if "fused_us" in row:
                t = row["fused_tile"]
                lines.append(f"{shape} | {b} | {row['bf16_matmul_us']:.1f} | {row['fused_us']:.1f} "
                             f"({row['fused_stream']}, m{t['block_m']} n{t['block_n']} w{t['num_warps']} "
                             f"k{t['split_k']}{' prefetch' if t.get('prefetch') else ''}"
                             f"{'' if t.get('fragment_order', True) else ' row order'}) | "
                             f"{row['speedup_vs_bf16']:.2f}x | {row.get('default_us', math.nan):.1f} | "
                             f"{row.get('default_speedup_vs_bf16', math.nan):.2f}x | {row['bandwidth_fraction']:.2f} / "
                             f"{row['bf16_bandwidth_fraction']:.2f}")
            elif "bf16_matmul_us" in row:
                lines.append(f"{shape} | {b} | {row['bf16_matmul_us']:.1f} | - | - | - | - | -")
        if "dense_decode_us" in r:
            p = r[f"prefill_{PREFILL_TOKENS}"]
            lines.append(f"{shape} | dense decode {r['dense_decode_us']:.1f} us; prefill {PREFILL_TOKENS} tokens: "
                         f"bf16 {p['bf16_matmul_us']:.0f} us, decode+matmul {p['dense_decode_matmul_us']:.0f} us "
                         f"({p['cost_vs_bf16']:.2f}x); checks exact: {r['exact']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpret", action="store_true", help="CPU: run the kernel paths under Triton's "
                        "interpreter at tiny shapes (a smoke test of this script, timings meaningless)")
    parser.add_argument("--shapes", default=None, help=f"OUTxIN,... (default {GPU_SHAPES} on GPU, {CPU_SHAPES} "
                                                       "on CPU)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--bits", type=int, default=4, choices=[3, 4])
    parser.add_argument("--streams", default="lfsr,table", help="kernel stream variants to check and sweep")
    parser.add_argument("--search-blocks", type=int, default=None, help="blocks timed for the search speed "
                                                                        "(default 262144 on GPU, 1024 on CPU)")
    parser.add_argument("--engine-model", default="openelm_1_1b", help="conf/model preset of the end-to-end decode "
                                                                       "measure ('' skips it)")
    parser.add_argument("--engine-tokens", type=int, default=128)
    parser.add_argument("--engine-streams", default="auto", help="kernel streams of the end-to-end measure, each a "
                        "model ('auto': each weight's default_stream)")
    parser.add_argument("--out", default=None, help="also write the JSON line to DIR/seedlm_kernel.json")
    args = parser.parse_args()
    device, gpu, interpret = args.device, args.device == "cuda", args.interpret
    if interpret:
        if gpu or "triton" in sys.modules:
            parser.error("--interpret runs on CPU, before anything imports triton")
        os.environ["TRITON_INTERPRET"] = "1"
    kernels = gpu or interpret
    if kernels:
        from raytrain.compress.kernels.seedlm_matmul import STREAMS

        checks = (("--streams", args.streams, ()), ("--engine-streams", args.engine_streams, ("auto",)))
        for flag, names, extra in checks:
            if unknown := sorted(set(names.split(",")) - set(STREAMS) - set(extra) - {""}):
                parser.error(f"{flag}: unknown stream {', '.join(unknown)}; known {', '.join(STREAMS + extra)}")
    shapes_arg = args.shapes or (GPU_SHAPES if gpu else "16x64,8x40" if interpret else CPU_SHAPES)
    shapes = [tuple(int(v) for v in s.split("x")) for s in shapes_arg.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    streams = [s for s in args.streams.split(",") if s]
    lfsr = {"K": 3, "taps": [0, 1]} if interpret else {}  # 7 candidates: the interpreter's search finishes
    cfg = seedlm.SeedLMConfig.for_bits(args.bits)
    started = time.time()
    config: dict[str, Any] = {"bits": args.bits, "C": cfg.C, "P": cfg.P, "K": cfg.K, "shapes": shapes_arg,
                              "batches": batches, "x_dtype": "bfloat16", "torch": torch.__version__,
                              "interpret": interpret}
    results: dict[str, Any] = {}
    if kernels:
        import triton

        config |= {"triton": triton.__version__, "streams": streams, "timing": "CUDA graph replay, cold weights "
                   "(copies cycled past 3x L2), median per call"}
        ceiling = copy_bandwidth(device)
        results["copy_bandwidth_tb_s"] = ceiling / 1e12
    for r, c in shapes:
        results[f"{r}x{c}"] = (bench_shape_kernels(r, c, batches, cfg, ceiling, streams, device,
                                                   tiles=2 if interpret else 64) if kernels
                               else bench_shape_cpu(r, c, batches, cfg))
        print(f"[{time.time() - started:.0f}s] {r}x{c} done", file=sys.stderr, flush=True)
    blocks = args.search_blocks or (262144 if gpu else 1024)
    results["search"] = {f"{b}bit": search_speed(seedlm.SeedLMConfig.for_bits(b, **lfsr), device, blocks, kernels)
                         for b in (4, 3)}
    config["search_blocks"] = blocks
    print(f"[{time.time() - started:.0f}s] search done", file=sys.stderr, flush=True)
    if kernels and args.engine_model:
        model = "openelm_tiny" if interpret else args.engine_model
        try:
            results["engine"] = engine_decode(model, args.bits, args.engine_tokens, device,
                                              args.engine_streams.split(","))
        except Exception as e:  # reported; the kernel figures above stand
            results["engine"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    shape_keys = [f"{r}x{c}" for r, c in shapes]
    baseline = {k: {f"batch{b}": results[k][f"batch{b}"]["bf16_matmul_us"] for b in batches} for k in shape_keys}
    speedups = [results[k]["batch1"].get("speedup_vs_bf16") for k in shape_keys if 1 in batches]
    ratio = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups and all(speedups) else None
    config["seconds"] = round(time.time() - started)
    line = json.dumps({"benchmark": "seedlm_kernel", "device": torch.cuda.get_device_name() if gpu else "cpu",
                       "config": config, "results": results, "baseline": baseline, "ratio": ratio,
                       "ratio_is": "bf16 matmul time / fused kernel time at batch 1, geometric mean over shapes",
                       "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")})
    print(table({k: results[k] for k in shape_keys}, batches))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "seedlm_kernel.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
