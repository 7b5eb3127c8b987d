"""Launch a SeedLM kernel a few times on one random 4-bit weight at its default tile, for a profiler to catch (Nsight
Compute in `benchmarks/gpu/decode_kernels.sh`): the measured pipe utilisation and stalls to hold against
`seedlm_sass.py`'s static model. `--batch 1` runs the batch-1 kernel, 2..16 the tl.dot one.

    python benchmarks/seedlm_launch.py --device cuda --shape 4096x14336 --stream lfsr --batch 1 --launches 5

Prints one JSON line: the shape, stream, tile and the median time of the launches (the profiler's replays make that
time meaningless under it; `seedlm_kernel.py` is the timing benchmark).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.seedlm_kernel import random_weight  # noqa: E402
from benchmarks.timing import synced_seconds  # noqa: E402
from raytrain.compress import seedlm  # noqa: E402
from raytrain.compress.kernels.seedlm_matmul import STREAMS, SeedLMWeight, default_config, seedlm_matmul  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="4096x14336", help="rows x cols of W")
    p.add_argument("--stream", default="lfsr", choices=STREAMS)
    p.add_argument("--batch", type=int, default=1, help="rows of x: 1 runs the batch-1 kernel, 2..16 the tl.dot one")
    p.add_argument("--launches", type=int, default=5)
    args = p.parse_args()
    rows, cols = (int(n) for n in args.shape.split("x"))
    weight = SeedLMWeight.from_compressed(random_weight(rows, cols, seedlm.SeedLMConfig.for_bits(4)), args.device,
                                          args.stream)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    x = torch.randn(args.batch, cols, device=args.device, dtype=dtype)
    times = [synced_seconds(lambda: seedlm_matmul(x, weight), args.device) for _ in range(args.launches)]
    tile = default_config(args.batch, rows, weight.blocks_per_row)
    print(json.dumps({"benchmark": "seedlm_launch", "device": args.device, "shape": [rows, cols],
                      "stream": args.stream, "batch": args.batch, "tile": vars(tile), "launches": args.launches,
                      "median_us": 1e6 * statistics.median(times), "command": " ".join(["python", *sys.argv])}))


if __name__ == "__main__":
    main()
