"""Static cost of the SeedLM kernels on Hopper, without a GPU: each kernel is compiled by Triton for sm_90a on this
machine, disassembled with the cuobjdump that Triton's wheel ships, and its main loop (the body of the backward branch)
is counted by opcode. Prints one JSON line: instructions per weight (fused matmul, dense decode) or per candidate and
block (search), registers, spills, whether the loop touches shared memory and which MMA it issues (the batched
kernel: HGMMA, Hopper's wgmma, from 64 rows a tile; HMMA, mma.sync, below).

    python benchmarks/seedlm_sass.py

Why it matters: at batch 1 the fused kernel is bound by instruction issue, not by HBM (see the kernel module's
docstring). `baseline` is the issue budget: instructions per weight that 132 SMs x 4 schedulers x 1.98 GHz can issue
in the time bf16's 117 MB take at the 4.3 TB/s a device copy reaches on an H200 (4096x14336); `ratio` is that budget
over the best fused matmul's bound (below), the speed-up over an ideal bf16 GEMV if the kernel ran at that bound.

Issue is not the only limit: a Hopper SM sub-partition issues one warp instruction a cycle, but its integer and logic
pipe ("alu" in Nsight Compute: LOP3, shifts, IADD3, LEA, compares) is 16 lanes wide, so a warp instruction holds it
two cycles, as does IMAD on the 16-lane "fmaheavy" pipe; FP32 FFMA/FADD/FMUL may take either of the two 16-lane
FMA pipes (an H100 SM has 128 FP32 and 64 INT32 units, per NVIDIA's Hopper whitepaper; a model, to be checked
against Nsight Compute's pipe utilisation on a GPU).
`cycles` gives each limit in cycles per weight (per candidate and block for the search) on one sub-partition's
scale (issue: instructions; alu: 2 x its instructions; fma: the FP32 and IMAD instructions over both FMA pipes, at
least 2 x IMAD), and `bound` is the largest: the best a kernel can do if nothing else (latency, memory) stalls it.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from raytrain.compress.kernels import seedlm_matmul as km  # noqa: E402
from raytrain.compress.kernels import seedlm_search as ks  # noqa: E402
from raytrain.compress.lfsr import LFSRConfig  # noqa: E402
from raytrain.compress.seedlm import SeedLMConfig  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
WORDS = {"words_ptr": "*i32", "exps_ptr": "*u8", "masks_ptr": "*i32", "rows": "i32", "cols": "i32", "bpr": "i32",
         "ebpr": "i32"}
SPLIT_SUMS = {"partial_ptr": "*fp32", "counts_ptr": "*i32"}  # the split programs' scratch sums and arrival counts
# A launch specialises 16-byte aligned pointers and integers divisible by 16; these are at the budget's shape
ALIGNED_INTS = ("rows", "cols", "bpr", "stride_x", "stride_y")
ISSUE_BUDGET = 32 * 132 * 4 * 1.98e9 * 2 / 4.3e12  # thread-instructions per weight while bf16's 2 bytes stream in
SHARED = ("STS", "LDS", "LDSM", "STSM", "BAR", "SHFL")
ALU = ("LOP3", "LOP", "SHF", "SHL", "SHR", "IADD3", "LEA", "ISETP", "FSETP", "SEL", "FSEL", "PRMT", "FMNMX", "IMNMX",
       "MOV", "F2FP", "BMSK", "POPC", "FLO", "BREV", "IABS")
FP32 = ("FFMA", "FADD", "FMUL")
FMA_HEAVY = ("IMAD", "IMUL", "IDP")


def compile_sass(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int) -> tuple[str, str]:
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
               if kind.startswith("*") or name in ALIGNED_INTS}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                            target=TARGET, options={"num_warps": num_warps, "num_stages": 1})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, usage


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest loop (the instructions between a backward branch's target and the branch), or
    of the whole kernel if it has no loop."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)]
    best = [t for _, t in code]
    looped: list[str] = []
    for addr, text in code:
        jump = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < addr:
            body = [t for a, t in code if int(jump.group(1), 16) <= a <= addr]
            looped = max(looped, body, key=len)
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in (looped or best))


def pipe_cycles(loop: collections.Counter, units: float) -> dict[str, float]:
    """Cycles per unit that issue, the alu pipe and the FMA pipes each need (see the module docstring)."""
    def count(names: tuple[str, ...]) -> int:
        return sum(n for op, n in loop.items() if op.split(".")[0] in names)

    alu, fp32, heavy = count(ALU), count(FP32), count(FMA_HEAVY)
    cycles = {"issue": sum(loop.values()), "alu": 2 * alu, "fma": max(fp32 + heavy, 2 * heavy)}
    return {k: round(v / units, 2) for k, v in cycles.items()}


def measure(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int, units: float
            ) -> dict[str, Any]:
    sass, usage = compile_sass(fn, signature, constexprs, num_warps)
    loop = main_loop(sass)
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    total = sum(loop.values())
    cycles = pipe_cycles(loop, units)
    shared = sorted(op for op in loop if op.startswith(SHARED))
    return {"per_unit": round(total / units, 2), "cycles": cycles, "bound": max(cycles, key=cycles.get),
            "bound_per_unit": max(cycles.values()), "loop_instructions": total, "registers": int(regs.group(1)),
            "stack_bytes": int(regs.group(2)), "shared_or_shuffle_in_loop": bool(shared), "shared_ops_in_loop": shared,
            "mma_in_loop": sorted({op.split(".")[0] for op in loop if op.startswith(("HMMA", "HGMMA"))}),
            "top_opcodes": dict(loop.most_common(8))}


def stream_constexprs(name: str) -> dict[str, Any]:
    lfsr = LFSRConfig()
    return {"C": 8, "P": 3, "K": 16, "STREAM": name, "TAPS": sum(1 << t for t in lfsr.taps),
            "INV": sum(1 << k for k in km.inverse_shifts(lfsr)), "LOW": km.stream_low(name, SeedLMConfig()),
            "SHARED_TABLES": False}


def words_signature(name: str) -> dict[str, str]:
    return {**WORDS, "table_ptr": f"*i{km.stream_operand(name, SeedLMConfig()).element_size() * 8}"}


def gemv(name: str, block_m: int, shared_tables: bool = False) -> dict[str, Any]:
    """The batch-1 kernel's loop with the `name` stream, block_m rows a thread, 128 blocks a step (4 warps), the
    default tile's prefetch and the block sums of a launch of two steps (grouped by state from BY_STATE_STEPS);
    `shared_tables`: the byte tables gathered from shared memory."""
    signature = {"x_ptr": "*bf16", "y_ptr": "*bf16", **SPLIT_SUMS, "gain_ptr": "*bf16", "res_ptr": "*bf16",
                 **words_signature(name), "steps_per_split": "i32", "inv_scale": "fp32", "eps": "fp32"}
    constexprs = {**stream_constexprs(name), "SHARED_TABLES": shared_tables, "XBITS": 16, "BM": block_m, "NB": 128,
                  "EVEN": True, "X_WORDS": True, "SPLIT": 1, "PREFETCH": km.default_config(1).prefetch, "GBITS": 16,
                  "G_WORDS": False, "NORM": False, "SWIGLU": False, "RESIDUAL": False, "PDL": False,
                  "BY_STATE": km.BY_STATE_STEPS <= 2}
    return measure(km._gemv_kernel, signature, constexprs, 4, units=block_m * 128 * 8 / 128)


def dot(name: str) -> dict[str, Any]:
    """The batch 2..16 kernel's loop with the `name` stream at `default_config(8)`'s tile, bf16 x."""
    cfg = km.default_config(8)
    signature = {"x_ptr": "*bf16", "y_ptr": "*bf16", **SPLIT_SUMS, **words_signature(name), "steps_per_split": "i32",
                 "batch": "i32", "stride_x": "i32", "stride_y": "i32", "inv_scale": "fp32"}
    constexprs = {**stream_constexprs(name), "BM": cfg.block_m, "NB": cfg.block_n, "BATCH": 16, "EVEN": True,
                  "SPLIT": 1, "IEEE": False, "PREFETCH": cfg.prefetch, "FRAGMENT": km.fragment_fits(8, cfg)}
    return measure(km._dot_kernel, signature, constexprs, cfg.num_warps,
                   units=cfg.block_m * cfg.block_n * 8 / (32 * cfg.num_warps))


def main() -> None:
    results: dict[str, Any] = {}
    for name in km.STREAMS:
        words, stream = words_signature(name), stream_constexprs(name)
        for block_m in (1, 2, 4, 8):
            results[f"gemv_{name}_m{block_m}"] = gemv(name, block_m)
        if name == "bytes":
            results["gemv_bytes_m8_shared_tables"] = gemv(name, 8, shared_tables=True)
        results[f"dot_{name}_m{km.default_config(8).block_m}"] = dot(name)
        results[f"dense_{name}"] = measure(
            km._dense_kernel, {"out_ptr": "*bf16", **words, "inv_scale": "fp32"},
            {**stream, "OBITS": 16, "BM": 4, "NB": 128, "EVEN_M": True,
             "O_WORDS": True}, 4, units=4 * 128 * 8 / 128)
    search_sig = {"w_ptr": "*fp32", "table_ptr": "*fp32", "offset_ptr": "*i32", "exp_ptr": "*i8", "coef_ptr": "*i8",
                  "nb": "i32"}
    for C, P in ((8, 3), (12, 4)):
        results[f"search_{C}_{P}"] = measure(
            ks._search_kernel, search_sig, {"C": C, "P": P, "N": 65535, "RULE": 0,
                                            "THRESHOLD": ks.MANTISSA_THRESHOLD[0], "BB": 512}, 4, units=512 / 128)
    best = min(v["bound_per_unit"] for k, v in results.items() if k.startswith("gemv"))
    print(json.dumps({"benchmark": "seedlm_sass", "device": "none (sm_90a code compiled on CPU)",
                      "config": {"triton": triton.__version__, "target": "sm_90a", "shape_of_budget": "4096x14336",
                                 "units": "gemv, dot (batch 2..16, its default tile): instructions per weight in the "
                                          "main loop; search: per candidate x block; dense: whole kernel per weight"},
                      "pipes": {"alu": ALU, "fp32": FP32, "fma_heavy": FMA_HEAVY},
                      "results": results, "baseline": {"issue_budget_per_weight_at_bf16_floor": ISSUE_BUDGET},
                      "ratio": ISSUE_BUDGET / best, "command": " ".join(["python", *sys.argv]),
                      "time": time.strftime("%Y-%m-%d %H:%M")}))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels")
    main()
