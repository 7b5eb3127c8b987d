"""Split-KV decode attention against the single-program kernel (`raytrain/infer/attention_kernel.py`): is splitting
each row's keys over programs faster, from how many keys on, and at what chunk size (`SPLIT_KEYS`)? Prints a table
to stderr, then one JSON line to stdout.

    python benchmarks/decode_attention.py --device cuda                          # H100/H200: 2-3 min (estimated)
    python benchmarks/decode_attention.py --device cuda --batches 1,8 --shapes llama2_7b --keys 2048,32000
    python benchmarks/decode_attention.py --device cpu --interpret               # smoke test, timings meaningless

Shapes are the attention of one layer: SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64), TinyLlama-1.1B (32 / 4
/ 64: a 1B GQA model) and Llama-2-7B (32 / 32 / 128), in bf16, with `--batches` rows each at `--keys` cached keys
(every row at the same position, writing its new key there). Each call is the fused decode step's: q and k
unrotated, the per-head QK norm and RoPE applied in the kernel, and a programmatic dependent launch (`dependent_launch`)
where the GPU has it (sm90+). Variants at each point: the single-program kernel (`max_position=None`) is the
baseline; split-KV with `max_position` = the keys (an exact bound: the engine passes its CUDA graph's length bucket,
which may be longer, leaving the last splits empty) at each `--chunks` value of `SPLIT_KEYS`, the module's default
among them. Above `MAX_SPLITS` chunks the kernel lengthens them, so at long contexts several chunk settings launch the
same (splits, chunk) grid: such a setting is checked and timed once and reported for each.

Correctness comes before timing, for every variant: its output against the baseline's (relative error, bf16
tolerance), and the two caches equal (each run on its own copy of the pristine cache; the new key and value written
once, at the row's position); the baseline itself against the eager PyTorch ops (`ops.rms_norm`, `ops.rope` and the
slot cache's `decode_attention`, fp32, row 0). A variant that fails is reported and not timed, and the run exits 1.

Timing (CUDA only): the calls over enough copies of the cache (layers) to exceed 3x the L2 cache when at most
`--max-copies` copies do, so keys come from HBM as in a many-layer decode step, are captured in one CUDA graph and
replayed back to back; the figure is the median over trials, per call. `bandwidth_fraction` is the K and V bytes a call
reads over its time, relative to a device-to-device copy (bytes read + written) measured in the same run.
`best_split_keys`, per shape: the `SPLIT_KEYS` of the highest geometric-mean speedup over the shape's points (a setting
at or above a point's keys runs the single kernel there: speedup 1).

`--device cpu --interpret` runs every path (single, split, the combine, a setting that does not split) under Triton's
interpreter at tiny sizes, in fp32 (the interpreter's bf16 dot is not trustworthy), timed by wall clock: a smoke test
of this script, its timings meaningless and labelled so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import capture, cold_copies, median_seconds, replay_ms, sync  # noqa: E402

# (query heads, KV heads, head_dim) of one attention layer
SHAPES = {"smollm2_135m": (9, 3, 64), "tinyllama_1_1b": (32, 4, 64), "llama2_7b": (32, 32, 128),
          "tiny": (4, 2, 16)}  # tiny: the interpreter's smoke test
GPU_SHAPES, INTERPRET_SHAPES = "smollm2_135m,tinyllama_1_1b,llama2_7b", "tiny"
GPU_KEYS, INTERPRET_KEYS = "256,1024,2048,5600,16384,32000", "40,300"  # 300: past the default SPLIT_KEYS (128)
GPU_CHUNKS, INTERPRET_CHUNKS = "128,256,512,1024", "32,128"
EPS = 1e-5
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}  # relative error (norms), split against single
REF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # the baseline against the eager ops in fp32


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm())


@contextlib.contextmanager
def split_settings(ak: Any, split_keys: int, max_splits: int) -> Iterator[None]:
    """attention_kernel's SPLIT_KEYS and MAX_SPLITS set for the block, restored after. They are module constants that
    `decode_attention` reads at call time (`_key_splits`), so setting them changes the launch grid without touching
    the kernels; a CUDA graph fixes the grid at capture, so the setting need only hold while calls are made."""
    saved = ak.SPLIT_KEYS, ak.MAX_SPLITS
    ak.SPLIT_KEYS, ak.MAX_SPLITS = split_keys, max_splits
    try:
        yield
    finally:
        ak.SPLIT_KEYS, ak.MAX_SPLITS = saved


# ---- timing ------------------------------------------------------------------------------------------------------

def graph_us(calls: list[Callable[[], Any]], trials: int = 7, trial_ms: float = 5.0) -> float:
    """Device microseconds per call of `calls`, captured in one CUDA graph and replayed back to back: the median over
    `trials` of about `trial_ms` of replays each (at least 10). The calls run once before capture (compilation)."""
    graph = capture(calls)
    replays = max(10, min(500, math.ceil(trial_ms / replay_ms(graph, 1))))
    ms = statistics.median(replay_ms(graph, replays) for _ in range(trials))
    del graph
    return 1e3 * ms / len(calls)


def timed_us(calls: list[Callable[[], Any]], gpu: bool) -> float:
    """Microseconds per call: CUDA graph replays on a GPU; under the interpreter, one wall-clock pass (meaningless,
    and slow: the calls already ran in the checks)."""
    if gpu:
        return graph_us(calls)
    return 1e6 * median_seconds(lambda: [call() for call in calls], "cpu", repeats=1, warmup=0) / len(calls)


def copy_bandwidth(gpu: bool) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (16 MiB on CPU): this run's ceiling."""
    device = "cuda" if gpu else "cpu"
    src = torch.empty(1 << 30 if gpu else 1 << 24, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if gpu:
        seconds = graph_us([lambda: dst.copy_(src)]) / 1e6
    else:
        seconds = median_seconds(lambda: dst.copy_(src), "cpu", repeats=5)
    return 2 * src.numel() / seconds


def copies_for(nbytes: int, max_copies: int, gpu: bool) -> int:
    """Copies of the cache to cycle through so that one pass exceeds 3x the L2 cache (cold reads), at least 2 and at
    most `max_copies`; 1 under the interpreter."""
    return cold_copies(nbytes, max_copies) if gpu else 1


# ---- one point: a shape, a batch width and a key count ------------------------------------------------------------

class Point:
    """Inputs of `batch` rows at `keys` cached keys: q, k, v, RoPE tables, QK-norm gains, and `copies` caches (one
    allocation of copies x batch slots; copy c is slots c*batch.., row w its slot w)."""

    def __init__(self, n_q: int, n_kv: int, hd: int, batch: int, keys: int, copies: int, dtype: torch.dtype,
                 device: str) -> None:
        g = torch.Generator(device).manual_seed(keys * 131 + batch)
        self.batch, self.keys, self.copies, self.dtype = batch, keys, copies, dtype
        self.q, self.k, self.v = (torch.randn(batch, n, 1, hd, generator=g, device=device).to(dtype)
                                  for n in (n_q, n_kv, n_kv))
        self.slots = keys + 1  # the new key is written at index `keys`, past the cached ones
        self.cache = [torch.randn(copies * batch, n_kv, self.slots, hd, generator=g, device=device).to(dtype)
                      for _ in range(2)]
        self.positions = torch.full((batch,), keys, dtype=torch.long, device=device)
        self.write_index = self.positions.clone()
        angles = torch.arange(self.slots, device=device, dtype=torch.float32)[:, None] * (
            1e4 ** (-torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: dim d pairs with d + hd/2
        self.rope = (angles.cos(), angles.sin())
        self.gains = tuple((torch.rand(hd, generator=g, device=device) + 0.5).to(dtype) for _ in range(2))

    def copy(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t[c * self.batch:(c + 1) * self.batch] for t in self.cache)

    def call(self, ak: Any, keys: torch.Tensor, values: torch.Tensor, max_position: int | None,
             pdl: bool) -> torch.Tensor:
        """The fused decode step's call: unrotated q and k, QK norm and RoPE in the kernel."""
        return ak.decode_attention(self.q, self.k, self.v, keys, values, self.positions, self.write_index,
                                   rope=self.rope, qk_norm=(*self.gains, EPS), max_position=max_position,
                                   dependent_launch=pdl)

    def reference(self) -> torch.Tensor:
        """Row 0 by the eager ops, in fp32 after bf16 QK norm and RoPE (the kernel's roundings): (1, n_q, 1, hd)."""
        from raytrain.infer.kv_cache import decode_attention as eager_attention
        from raytrain.models import ops

        at = self.positions[:1]
        cos, sin = (t[at][:, None, None] for t in self.rope)
        q = ops.rope(ops.rms_norm(self.q[:1], self.gains[0], EPS), cos, sin)
        k = ops.rope(ops.rms_norm(self.k[:1], self.gains[1], EPS), cos, sin)
        length = self.keys + 1
        # copies: the pristine cache stays unwritten for the variants' checks (an fp32 `.float()` would be a view)
        keys, values = (t[:1, :, :length].to(torch.float32, copy=True) for t in self.copy(0))
        keys[0, :, self.keys], values[0, :, self.keys] = k[0, :, 0].float(), self.v[0, :, 0].float()
        mask = torch.ones(1, 1, 1, length, dtype=torch.bool, device=keys.device)
        return eager_attention(q.float(), keys, values, mask)


def check(point: Point, ak: Any, max_position: int | None, pdl: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One call on a fresh copy of the pristine cache (copy 0): the output and the cache it leaves."""
    cache = [t.clone() for t in point.copy(0)]
    out = point.call(ak, *cache, max_position, pdl)
    sync(out.device)
    return out, cache


def bench_point(ak: Any, point: Point, chunks: list[int], max_splits: int, pdl: bool, gpu: bool,
                ceiling: float, kv_bytes: int) -> dict[str, Any]:
    """Checks, then timings, of the baseline and every chunk setting at one point (module docstring)."""
    tol, ref_tol = TOLERANCE[point.dtype], REF_TOLERANCE[point.dtype]
    row: dict[str, Any] = {"batch": point.batch, "keys": point.keys, "max_position": point.keys,
                           "kv_bytes": kv_bytes, "copies": point.copies}
    # correctness, every variant, before anything is timed: the timed calls write the new key into the copies, so a
    # check run after them could not tell a kernel that never writes it from one that does
    single, single_cache = check(point, ak, None, pdl)
    row["baseline_ref_rel_err"] = rel_err(single[:1], point.reference())
    written = single_cache[0][0, :, point.keys]  # row 0's new key, rotated and normalised in the kernel
    row["baseline_wrote_key"] = not torch.equal(written, point.copy(0)[0][0, :, point.keys])
    row["checks_pass"] = row["baseline_ref_rel_err"] < ref_tol and row["baseline_wrote_key"]
    grids: dict[tuple[int, int], dict[str, Any]] = {}  # (splits, chunk) launched -> its check and time
    split: dict[str, dict[str, Any]] = {}
    for chunk in chunks:
        with split_settings(ak, chunk, max_splits):
            grid = ak._key_splits(point.keys)
            if grid[0] > 1 and grid not in grids:
                try:
                    out, cache = check(point, ak, point.keys, pdl)
                    grids[grid] = {"rel_err": rel_err(out, single),
                                   "cache_equal": all(torch.equal(a, b) for a, b in zip(cache, single_cache))}
                    grids[grid]["ok"] = grids[grid]["rel_err"] < tol and grids[grid]["cache_equal"]
                    del out, cache  # a 7B row's cache at 32k keys is GBs: not held through the timings
                except Exception as e:  # reported (a compile or launch failure); the other settings go on
                    grids[grid] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        split[str(chunk)] = {"splits": grid[0], "chunk": grid[1] or point.keys}
        row["checks_pass"] &= grids[grid]["ok"] if grid[0] > 1 else True
    del single, single_cache
    # timings: the baseline, then each distinct split grid once (under a setting that launches it)
    copies = [point.copy(c) for c in range(point.copies)]
    row["baseline_us"] = timed_us([lambda c=c: point.call(ak, *c, None, pdl) for c in copies], gpu)
    for chunk in chunks:
        entry = split[str(chunk)]
        grid = (entry["splits"], entry["chunk"])
        if entry["splits"] == 1:  # the setting does not split here: the baseline's launch, not timed again
            entry |= {"us": row["baseline_us"], "rel_err": 0.0, "cache_equal": True, "same_as": "baseline"}
        else:
            done = grids[grid]
            if done["ok"] and "us" not in done:
                with split_settings(ak, chunk, max_splits):
                    try:
                        done["us"] = timed_us([lambda c=c: point.call(ak, *c, point.keys, pdl) for c in copies], gpu)
                    except Exception as e:  # reported; the other settings go on
                        done["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                done["timed_as"] = chunk
            entry |= {k: v for k, v in done.items() if k != "timed_as"}
            if done.get("timed_as", chunk) != chunk:  # another setting launched this grid: its figures
                entry["same_as"] = str(done["timed_as"])
        if entry.get("us"):
            entry["speedup"] = row["baseline_us"] / entry["us"]
            entry["bandwidth_fraction"] = kv_bytes / (entry["us"] / 1e6) / ceiling
    row["baseline_bandwidth_fraction"] = kv_bytes / (row["baseline_us"] / 1e6) / ceiling
    row["split"] = split
    row["default_split_keys"] = ak.SPLIT_KEYS
    timed = {c: e["us"] for c, e in split.items() if e.get("us")}
    if str(ak.SPLIT_KEYS) in timed:
        row["split_default_us"] = timed[str(ak.SPLIT_KEYS)]
        row["speedup"] = row["baseline_us"] / row["split_default_us"]
    if timed:
        row["best_split_keys"] = int(min(timed, key=timed.get))
        row["best_speedup"] = row["baseline_us"] / min(timed.values())
    return row


def best_split_keys(points: list[dict[str, Any]], chunks: list[int]) -> tuple[int | None, dict[str, float]]:
    """The SPLIT_KEYS of the highest geometric-mean speedup over `points` (each timed setting's), and every one's."""
    means = {}
    for chunk in chunks:
        speedups = [p["split"][str(chunk)].get("speedup") for p in points]
        if speedups and all(speedups):
            means[str(chunk)] = math.exp(sum(map(math.log, speedups)) / len(speedups))
    return (int(max(means, key=means.get)) if means else None), means


# ---- report ------------------------------------------------------------------------------------------------------

def table(results: dict[str, Any], chunks: list[int], default: int, title: str) -> str:
    """Per point: the single kernel's us, each SPLIT_KEYS setting's (with its splits x chunk; * the default), the
    default's speedup, the fastest setting, the bandwidth fractions of the single kernel and the fastest."""
    head = " | ".join(f"{c}{'*' if c == default else ''}" for c in chunks)
    lines = [title, f"shape | W | keys | single | {head} | speedup* | best | BW single / best | checks",
             " | ".join(["---"] * (8 + len(chunks)))]
    for name, shape in results["shapes"].items():
        for p in shape["points"]:
            if "error" in p:
                lines.append(f"{name} | {p['batch']} | {p['keys']} | {p['error']}")
                continue
            cells = []
            for c in chunks:
                e = p["split"][str(c)]
                us = f"{e['us']:.1f}" if e.get("us") else "FAIL"
                cells.append(us if e["splits"] == 1 else f"{us} ({e['splits']}x{e['chunk']})")
            best = p.get("best_split_keys")
            best_bw = p["split"][str(best)].get("bandwidth_fraction") if best else None
            lines.append(f"{name} | {p['batch']} | {p['keys']} | {p['baseline_us']:.1f} | {' | '.join(cells)} | "
                         f"{p.get('speedup', float('nan')):.2f}x | {best} ({p.get('best_speedup', float('nan')):.2f}x)"
                         f" | {p['baseline_bandwidth_fraction']:.2f} / {best_bw or float('nan'):.2f} | "
                         f"{'yes' if p['checks_pass'] else 'NO'}")
        lines.append(f"{name}: best SPLIT_KEYS {shape['best_split_keys']} (geomean speedup by SPLIT_KEYS: "
                     + ", ".join(f"{c} {s:.2f}x" for c, s in shape["geomean_speedup"].items()) + ")")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--interpret", action="store_true", help="CPU: run every kernel path under Triton's "
                        "interpreter at tiny sizes (a smoke test of this script, timings meaningless)")
    parser.add_argument("--shapes", default=None, help=f"of {', '.join(SHAPES)} (default {GPU_SHAPES}; "
                        f"{INTERPRET_SHAPES} with --interpret)")
    parser.add_argument("--keys", default=None, help=f"cached keys per row, comma-separated (default {GPU_KEYS}; "
                        f"{INTERPRET_KEYS} with --interpret)")
    parser.add_argument("--batches", default="1", help="rows (batch widths), comma-separated, e.g. 1,8")
    parser.add_argument("--chunks", default=None, help="SPLIT_KEYS settings to sweep, comma-separated; the module's "
                        f"default is always added (default {GPU_CHUNKS}; {INTERPRET_CHUNKS} with --interpret)")
    parser.add_argument("--max-splits", type=int, default=None, help="MAX_SPLITS for every split variant (default: "
                        "the module's)")
    parser.add_argument("--no-dependent-launch", action="store_true", help="launch without PDL even on sm90+")
    parser.add_argument("--max-copies", type=int, default=512, help="most cache copies cycled per timed graph")
    parser.add_argument("--out", default=None, help="also write the JSON line to DIR/decode_attention.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.interpret:
        if gpu or "triton" in sys.modules:
            parser.error("--interpret runs on CPU, before anything imports triton")
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported: attention_kernel, below
    elif not gpu:
        parser.error("--device cpu runs the Triton kernels only under the interpreter: add --interpret")
    import triton

    import raytrain.infer.attention_kernel as ak

    shapes = (args.shapes or (GPU_SHAPES if gpu else INTERPRET_SHAPES)).split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shapes {unknown}: of {', '.join(SHAPES)}")
    keys = [int(k) for k in (args.keys or (GPU_KEYS if gpu else INTERPRET_KEYS)).split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    chunks = sorted({int(c) for c in (args.chunks or (GPU_CHUNKS if gpu else INTERPRET_CHUNKS)).split(",")}
                    | {ak.SPLIT_KEYS})
    max_splits = args.max_splits or ak.MAX_SPLITS
    dtype = torch.bfloat16 if gpu else torch.float32
    pdl = gpu and not args.no_dependent_launch and torch.cuda.get_device_capability() >= (9, 0)
    started = time.time()
    config: dict[str, Any] = {
        "shapes": {s: dict(zip(("n_q", "n_kv", "head_dim"), SHAPES[s])) for s in shapes}, "keys": keys,
        "batches": batches, "split_keys_swept": chunks, "default_split_keys": ak.SPLIT_KEYS,
        "max_splits": max_splits, "default_max_splits": ak.MAX_SPLITS, "block_keys": ak.BLOCK_KEYS,
        "dtype": str(dtype)[6:], "rope": True, "qk_norm": True, "dependent_launch": pdl, "interpret": args.interpret,
        "torch": torch.__version__, "triton": triton.__version__,
        "timing": ("CUDA graph replay, cache copies cycled past 3x L2 where --max-copies allows, median per call"
                   if gpu else "wall clock under Triton's interpreter: MEANINGLESS, a smoke test only")}
    if gpu:
        config["l2_bytes"] = torch.cuda.get_device_properties(0).L2_cache_size
    ceiling = copy_bandwidth(gpu)
    results: dict[str, Any] = {"copy_bandwidth_tb_s": ceiling / 1e12, "shapes": {}}
    for name in shapes:
        n_q, n_kv, hd = SHAPES[name]
        points = []
        for batch in batches:
            for n in keys:
                kv_bytes = 2 * batch * n_kv * n * hd * dtype.itemsize  # K and V, read once per call
                copies = copies_for(kv_bytes, args.max_copies, gpu)
                try:
                    point = Point(n_q, n_kv, hd, batch, n, copies, dtype, args.device)
                    row = bench_point(ak, point, chunks, max_splits, pdl, gpu, ceiling, kv_bytes)
                    if gpu:  # whether the copies cycled exceed 3x L2: keys read from HBM, not L2
                        row["l2_cold"] = copies * kv_bytes >= 3 * config["l2_bytes"]
                except torch.cuda.OutOfMemoryError as e:  # reported; the smaller points still run
                    row = {"batch": batch, "keys": n, "checks_pass": False, "error": f"out of memory: {str(e)[:200]}"}
                finally:
                    point = None
                    if gpu:
                        torch.cuda.empty_cache()
                points.append(row)
                verdict = "ok" if row["checks_pass"] else "FAIL"
                print(f"[{time.time() - started:.0f}s] {name} W{batch} keys {n}: "
                      + (f"single {row['baseline_us']:.1f} us, best SPLIT_KEYS {row.get('best_split_keys')} "
                         f"{row.get('best_speedup', float('nan')):.2f}x, checks {verdict}"
                         if "baseline_us" in row else row.get("error", "")), file=sys.stderr, flush=True)
        best, means = best_split_keys([p for p in points if "baseline_us" in p], chunks)
        results["shapes"][name] = {"n_q": n_q, "n_kv": n_kv, "head_dim": hd, "points": points,
                                   "best_split_keys": best, "geomean_speedup": means}
    done = [p for s in results["shapes"].values() for p in s["points"] if "baseline_us" in p]
    errors = [e["rel_err"] for p in done for e in p["split"].values() if "rel_err" in e]
    results["max_split_rel_err"] = max(errors, default=None)
    results["max_baseline_ref_rel_err"] = max((p["baseline_ref_rel_err"] for p in done), default=None)
    results["all_checks_pass"] = all(p["checks_pass"] for s in results["shapes"].values() for p in s["points"])
    baseline = {name: {f"batch{p['batch']}_keys{p['keys']}": p["baseline_us"] for p in s["points"]
                       if "baseline_us" in p} for name, s in results["shapes"].items()}
    config["seconds"] = round(time.time() - started)
    line = json.dumps({"benchmark": "decode_attention", "device": torch.cuda.get_device_name() if gpu else "cpu",
                       "config": config, "results": results, "baseline": baseline,
                       "baseline_is": "single-program kernel (max_position=None), us per call",
                       "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")})
    title = ("us per call by SPLIT_KEYS (splits x chunk launched)" if gpu
             else "us per call by SPLIT_KEYS, INTERPRETED: timings meaningless")
    print(table(results, chunks, ak.SPLIT_KEYS, title), file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decode_attention.json").write_text(line + "\n")
    print(line, flush=True)
    if not results["all_checks_pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
