"""SeedLM's batch-1 kernel with the fused decode step's variants (`seedlm_gemv`) against the bf16 `gemv` it replaces
there, at one model's projection shapes: where a compressed model's decode step gains or loses, kind by kind.

    python benchmarks/seedlm_fused_gemv.py --device cuda --model openelm_1_1b --layers 0,13,27
    python benchmarks/seedlm_fused_gemv.py --device cuda --layers all --tiles m4w4,m8w8   # every layer, fewer tiles
    python benchmarks/seedlm_fused_gemv.py --device cuda --layers all --tiles m4w4,m4w4r64  # r: a register cap
    python benchmarks/seedlm_fused_gemv.py --device cpu --interpret --model openelm_tiny --layers 0   # smoke test

For each chosen layer, its four projections as `raytrain/infer/fused_decode.py` runs them: RMSNorm + QKV, output +
residual, RMSNorm + gate/up + SwiGLU, down + residual. bf16 `gemv` runs at its own `block_shape`; `seedlm_gemv`
runs at its default tile and over a sweep of batch-1 tiles (split_k 1: a fused variant needs whole rows), both as
programmatic dependent launches like the engine's. Each is timed inside a CUDA graph over enough copies of the weight
to exceed 3x the L2 (cold reads, as in a decode step), median per call. Random weights and codes (the kernels' work
does not depend on the values); before timing, SeedLM's output at its default tile is checked against bf16 `gemv`
on the decoded weight. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TILES = ["m1w4", "m2w4", "m4w4", "m8w4", "m2w2", "m4w2", "m8w2", "m4w8", "m8w8"]  # prefetch on
EPS = 1e-5


def block_projections(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Module | None, bool, bool]]:
    """A decoder block's four projections as `FusedDecodeStep._layer` runs them: (kind, linear, the RMSNorm fused
    before it or None, SwiGLU after it, residual added after it)."""
    return [("qkv_norm", block.attn.qkv_proj, block.attn_norm, False, False),
            ("out_residual", block.attn.out_proj, None, False, True),
            ("gate_up_norm_swiglu", block.ffn.proj_1, block.ffn_norm, True, False),
            ("down_residual", block.ffn.proj_2, None, False, True)]


def projections(model_name: str, layers: list[int] | None) -> list[dict[str, Any]]:
    """(layer, kind, rows, cols, variant flags) of the chosen layers (None: all) of a `conf/model` preset, built on
    the meta device."""
    from omegaconf import OmegaConf

    from raytrain.models.registry import build_model, model_config

    preset = model_config(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model"
                                         / f"{model_name}.yaml"))
    model = build_model(preset, "meta")
    layers = range(len(model.layers)) if layers is None else layers
    missing = [i for i in layers if not 0 <= i < len(model.layers)]
    if missing:
        raise ValueError(f"--layers {missing}: {model_name} has layers 0..{len(model.layers) - 1}")
    out = []
    for i in layers:
        for kind, linear, norm, swiglu, residual in block_projections(model.layers[i]):
            out.append({"layer": i, "kind": kind, "rows": linear.out_features, "cols": linear.in_features,
                        "norm": norm is not None, "swiglu": swiglu, "residual": residual})
    return out


def parse_tiles(text: str) -> list[tuple[int, int, int | None]]:
    """"m8w4,m4w4r64" -> [(8, 4, None), (4, 4, 64)]: the swept tiles as (block_m, num_warps, register cap)."""
    tiles = []
    for name in filter(None, text.split(",")):
        match = re.fullmatch(r"m(\d+)w(\d+)(?:r(\d+))?", name.strip())
        if match is None:
            raise ValueError(f"--tiles {name!r}: expected mROWSwWARPS or mROWSwWARPSrREGISTERS, e.g. m8w4, m4w4r64")
        tiles.append((int(match[1]), int(match[2]), int(match[3]) if match[3] else None))
    return tiles


def tile_name(config: Any) -> str:
    """A batch-1 KernelConfig as --tiles names it."""
    cap = f"r{config.max_registers}" if config.max_registers else ""
    return f"m{config.block_m}w{config.num_warps}{cap}"


def bench_projection(p: dict[str, Any], device: str, dtype: torch.dtype, tiles: list[tuple[int, int, int | None]]
                     ) -> dict[str, Any]:
    from benchmarks.seedlm_kernel import copies_for, random_weight, timed, weight_copies
    from raytrain.compress import seedlm
    from raytrain.compress.kernels import seedlm_matmul as km
    from raytrain.infer.gemv_kernel import fused_outputs, gemv

    rows, cols = p["rows"], p["cols"]
    n = fused_outputs(rows, p["swiglu"], "seedlm_gemv")
    cfg = seedlm.SeedLMConfig.for_bits(4)
    ct = random_weight(rows, cols, cfg, seed=rows + cols)
    weight = km.SeedLMWeight.from_compressed(ct, device)
    dense = seedlm.decode(ct.to(device).codes(), cfg, cols).to(dtype)
    x = torch.randn(1, cols, device=device, dtype=dtype)
    gain = torch.rand(cols, device=device, dtype=dtype) + 0.5
    residual = torch.randn(1, n, device=device, dtype=dtype)
    kwargs = {"norm": gain if p["norm"] else None, "eps": EPS, "swiglu": p["swiglu"],
              "residual": residual if p["residual"] else None, "dependent_launch": device == "cuda"}
    reference = gemv(x, dense, **kwargs).float()
    error = float((km.seedlm_gemv(x, weight, **kwargs).float() - reference).abs().max() / reference.abs().max())
    if error > 2e-2:
        raise RuntimeError(f"layer {p['layer']} {p['kind']}: SeedLM differs from bf16 gemv by {error:.3g}")
    denses = [dense] + [dense.clone() for _ in range(copies_for(dense.numel() * dense.element_size()) - 1)]
    weights = weight_copies(weight)

    def seedlm_us(config: Any) -> float:
        return 1e6 * timed([lambda w=w: km.seedlm_gemv(x, w, config=config, **kwargs) for w in weights])

    default = km.default_config(1, n, weight.blocks_per_row)
    swept_tiles = [km.KernelConfig(block_m=m, block_n=32 * w, num_warps=w, prefetch=True, max_registers=r)
                   for m, w, r in tiles]
    configs = {tile_name(config): config for config in swept_tiles + [default]}  # the default may be a swept one
    swept = {name: seedlm_us(config) for name, config in configs.items()}
    best = min(swept, key=swept.get)
    result = {**p, "error_vs_bf16": error, "bf16_us": 1e6 * timed([lambda d=d: gemv(x, d, **kwargs) for d in denses]),
              "seedlm_default_tile": tile_name(default), "seedlm_default_us": swept[tile_name(default)],
              "seedlm_best_tile": best, "seedlm_best_us": swept[best], "seedlm_tiles_us": swept}
    result["default_speedup"] = result["bf16_us"] / result["seedlm_default_us"]
    result["best_speedup"] = result["bf16_us"] / result["seedlm_best_us"]
    return result


def totals(results: list[dict[str, Any]], key: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    for r in results:
        sums[r["kind"]] = sums.get(r["kind"], 0.0) + r[key]
    return sums


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpret", action="store_true", help="CPU: the kernels under Triton's interpreter")
    parser.add_argument("--model", default="openelm_1_1b", help="conf/model preset whose projections are timed")
    parser.add_argument("--layers", default="0,13,27",
                        help="layer indices (layer-wise scaling: shapes differ), or 'all'")
    parser.add_argument("--tiles", default=",".join(TILES),
                        help="swept batch-1 tiles besides the default, mROWSwWARPS comma-separated ('' for none), "
                             "rREGISTERS appended caps the registers a thread (e.g. m4w4r64)")
    args = parser.parse_args()
    if args.interpret:
        if args.device != "cpu":
            parser.error("--interpret runs on CPU")
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    elif args.device != "cuda":
        parser.error("the kernels need --device cuda, or --interpret on CPU")
    started = time.time()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    try:
        tiles = parse_tiles(args.tiles)
    except ValueError as error:
        parser.error(str(error))
    if args.layers != "all" and not re.fullmatch(r"\d+(,\d+)*", args.layers):
        parser.error(f"--layers {args.layers!r}: expected indices like 0,13,27 or 'all'")
    layers = None if args.layers == "all" else [int(i) for i in args.layers.split(",")]
    tiles = tiles if args.device == "cuda" else tiles[:2]
    results = []
    for p in projections(args.model, layers):
        results.append(bench_projection(p, args.device, dtype, tiles))
        r = results[-1]
        print(f"[{time.time() - started:.0f}s] layer {r['layer']} {r['kind']} {r['rows']}x{r['cols']}: bf16 "
              f"{r['bf16_us']:.1f} us, SeedLM {r['seedlm_default_us']:.1f} ({r['seedlm_default_tile']}), best "
              f"{r['seedlm_best_us']:.1f} ({r['seedlm_best_tile']})", file=sys.stderr, flush=True)
    bf16, default, best = (totals(results, k) for k in ("bf16_us", "seedlm_default_us", "seedlm_best_us"))
    print(json.dumps({"benchmark": "seedlm_fused_gemv", "device": torch.cuda.get_device_name() if args.device == "cuda"
                      else "cpu (interpreter: timings mean nothing)",
                      "config": {"model": args.model, "layers": args.layers, "dtype": str(dtype), "bits": 4,
                                 "tiles": tiles, "seconds": round(time.time() - started)},
                      "results": results, "baseline": {"bf16_gemv_us_by_kind": bf16},
                      "ratio": sum(bf16.values()) / sum(default.values()),
                      "ratio_is": "bf16 gemv time / SeedLM time at its default tiles, summed over the chosen layers",
                      "seedlm_default_us_by_kind": default, "seedlm_best_us_by_kind": best,
                      "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    main()
