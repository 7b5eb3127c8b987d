"""SeedLM decode-time matmul: the fused Triton kernel vs bf16 `torch.matmul` vs dequantize-then-matmul, and the
compression speed of the seed search, on one device. Prints one JSON line.

    python benchmarks/seedlm_kernel.py --device cuda          # H200: kernel + baselines + search speed
    python benchmarks/seedlm_kernel.py --device cpu           # no kernel: baselines at small shapes, search speed

Shapes are [out, in] weights (4096x14336 is Llama-3-8B's down projection, 14336x4096 its gate/up). The compressed
weights hold random codes (every code is valid, and the kernel's work does not depend on the values), so the timing
needs no hours-long search; the search speed is measured separately on a sample of Gaussian blocks. Before timing,
each shape's kernel output is checked against the dense reconstruction (the weights bitwise on a one-hot slice, y to
bf16 rounding); `exact` in the results reports it. Each (shape, batch) tries a few tile configs and keeps the fastest.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.compress.format import CompressedTensor  # noqa: E402
from raytrain.compress.seedlm import SeedLMConfig, search  # noqa: E402

GPU_SHAPES = "4096x4096,4096x14336,14336x4096"
CPU_SHAPES = "1024x1024,1024x3584,3584x1024"
TILES = {  # (block_m, blocks, num_warps) tried per batch size
    "gemv": [(4, 32, 2), (8, 16, 4), (8, 32, 4), (16, 16, 4), (16, 32, 4), (32, 16, 8)],
    "dot": [(16, 16, 4), (16, 32, 4), (32, 16, 4), (32, 32, 8), (64, 16, 8)],
}


def random_weight(rows: int, cols: int, cfg: SeedLMConfig, device: str, seed: int = 0) -> CompressedTensor:
    g = torch.Generator().manual_seed(seed)
    bpr = math.ceil(cols / cfg.C)
    codes = {"offsets": torch.randint(0, cfg.lfsr.period, (rows, bpr), generator=g, dtype=torch.int32),
             "exponents": torch.randint(-8, -3, (rows, bpr), generator=g, dtype=torch.int8),
             "coefficients": torch.randint(-8, 8, (rows, bpr, cfg.P), generator=g, dtype=torch.int8)}
    return CompressedTensor.from_codes("seedlm", cfg, codes, (rows, cols), torch.bfloat16).to(device)


def timed(fn: Callable[[], Any], device: str, reps: int) -> float:
    """Median seconds per call."""
    fn()
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(reps, 50), return_mode="median") / 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_kernel(kernel: Any, ct: CompressedTensor, weight: Any, dense: torch.Tensor) -> dict[str, Any]:
    """Bitwise fp32 weights on 16 one-hot columns (fp32 x), and y for a bf16 batch of 8 against the dense matmul."""
    cols = torch.randperm(ct.shape[1])[:16].to(dense.device)
    eye = torch.zeros(16, ct.shape[1], device=dense.device)
    eye[torch.arange(16), cols] = 1
    picked = kernel.seedlm_matmul(eye, weight)
    reference = ct.codec.decode(ct.codes(), ct.config, ct.shape[1])[:, cols].T  # fp32, before the cast to bf16
    x = torch.randn(8, ct.shape[1], device=dense.device, dtype=torch.bfloat16)
    y = kernel.seedlm_matmul(x, weight).float()
    y_ref = (x.float() @ dense.float().T)
    rel = float((y - y_ref).abs().max() / y_ref.abs().max())
    return {"weights_bitwise": bool(torch.equal(picked, reference)), "y_max_rel_err": rel}


def bench_shape(rows: int, cols: int, batches: list[int], cfg: SeedLMConfig, device: str, reps: int
                ) -> dict[str, Any]:
    ct = random_weight(rows, cols, cfg, device)
    dense = ct.dense().to(torch.bfloat16)
    out: dict[str, Any] = {}
    kernel = weight = None
    if device == "cuda":
        from raytrain.compress.kernels import seedlm_matmul as kernel

        weight = kernel.SeedLMWeight.from_compressed(ct, device)
        out["check"] = check_kernel(kernel, ct, weight, dense)
        out["exact"] = out["check"]["weights_bitwise"] and out["check"]["y_max_rel_err"] < 2e-2
    for batch in batches:
        x = torch.randn(batch, cols, device=device, dtype=torch.bfloat16)
        row = {"bf16_matmul_us": 1e6 * timed(lambda: x @ dense.T, device, reps),
               "dequant_matmul_us": 1e6 * timed(lambda: x @ ct.dense().to(torch.bfloat16).T, device,
                                                max(3, reps // 10))}
        if kernel is not None:
            best = None
            for bm, nb, warps in TILES["gemv" if batch == 1 else "dot"]:
                tile = kernel.KernelConfig(block_m=bm, blocks=nb, num_warps=warps)
                t = timed(lambda: kernel.seedlm_matmul(x, weight, tile), device, reps)
                if best is None or t < best[0]:
                    best = (t, {"block_m": bm, "blocks": nb, "num_warps": warps})
            row["fused_us"], row["fused_tile"] = 1e6 * best[0], best[1]
            row["speedup_vs_bf16"] = row["bf16_matmul_us"] / row["fused_us"]
            row["speedup_vs_dequant"] = row["dequant_matmul_us"] / row["fused_us"]
        out[f"batch{batch}"] = row
    return out


def search_speed(bits: int, device: str, blocks: int) -> float:
    cfg = SeedLMConfig.for_bits(bits)
    w = torch.randn(blocks, cfg.C, generator=torch.Generator().manual_seed(bits))
    search(w[:64], cfg, device)  # tables and warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    search(w, cfg, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return blocks / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help=f"OUTxIN,... (default {GPU_SHAPES} on GPU, {CPU_SHAPES} "
                                                       "on CPU)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--bits", type=int, default=4, choices=[3, 4])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--search-blocks", type=int, default=None, help="blocks timed for the search speed "
                                                                        "(default 65536 on GPU, 1024 on CPU)")
    args = parser.parse_args()
    device = args.device
    gpu = device == "cuda"
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or (GPU_SHAPES if gpu else CPU_SHAPES))
              .split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    cfg = SeedLMConfig.for_bits(args.bits)
    reps = args.reps if gpu else min(args.reps, 10)
    results = {f"{r}x{c}": bench_shape(r, c, batches, cfg, device, reps) for r, c in shapes}
    blocks = args.search_blocks or (65536 if gpu else 1024)
    results["search_blocks_per_s"] = {f"{b}bit": round(search_speed(b, device, blocks), 1) for b in (4, 3)}
    baseline = {k: {b: v[b]["bf16_matmul_us"] for b in v if b.startswith("batch")}
                for k, v in results.items() if "x" in k}
    ratio = None
    if gpu:
        speedups = [results[f"{r}x{c}"]["batch1"]["speedup_vs_bf16"] for r, c in shapes if 1 in batches]
        ratio = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(json.dumps({"benchmark": "seedlm_kernel", "device": name,
                      "config": {"bits": args.bits, "C": cfg.C, "P": cfg.P, "K": cfg.K, "shapes": args.shapes or
                                 (GPU_SHAPES if gpu else CPU_SHAPES), "batches": batches, "x_dtype": "bfloat16",
                                 "torch": torch.__version__, "search_blocks": blocks},
                      "results": results, "baseline": baseline,
                      "ratio": ratio, "ratio_is": "bf16 matmul time / fused kernel time at batch 1, geometric mean "
                                                  "over shapes" if gpu else "no kernel on CPU",
                      "command": " ".join(["python", *sys.argv])}))


if __name__ == "__main__":
    main()
