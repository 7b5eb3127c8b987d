"""Auto-labeling throughput on Ray Data: frames/s with 1 and 2 concurrent sequence tasks on a 2-CPU local cluster.

Generates `--sequences` synthetic sequences, warms the Ray workers up on a short one, then labels all of them with
1 worker and again (into a fresh directory) with 2; each run is timed end to end (driver wall clock, Ray Data
scheduling and writes included). Per-worker throughput also comes from the tasks' own compute time. The baseline is
the 1-worker run, so `ratio` is the 1 -> 2 worker scaling. The load average is reported because the machine may be
shared: on a loaded machine the absolute figures and the scaling both drop.

    python benchmarks/autolabel_throughput.py --sequences 4 --frames 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.data.lidar_scenes import SceneConfig, write_scenes  # noqa: E402
from raytrain.pipelines.autolabel import runner  # noqa: E402
from raytrain.pipelines.autolabel.config import AutolabelConfig, VLMConfig  # noqa: E402


def timed(cfg: AutolabelConfig, data: Path, out: Path, workers: int) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    summary = runner.run(cfg, str(data), str(out), workers=workers)
    wall = time.perf_counter() - start
    task_seconds = sum(json.loads((p / "_SUCCESS.json").read_text())["counts"]["seconds"] for p in out.iterdir()
                       if (p / "_SUCCESS.json").exists())
    frames = summary["frames"]
    return {"workers": workers, "frames": frames, "wall_s": round(wall, 2), "frames_per_s": round(frames / wall, 3),
            "frames_per_s_per_worker": round(frames / wall / workers, 3),
            "task_frames_per_s": round(frames / task_seconds, 3), "load_avg_1m_before": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--mode", default="full", choices=["full", "moving_only"])
    p.add_argument("--device", default="cpu", help="where the image-text model runs")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one)")
    args = p.parse_args()
    import ray

    root = Path(args.dir or tempfile.mkdtemp(prefix="autolabel_bench_"))
    write_scenes(root / "data", args.sequences, SceneConfig(frames=args.frames), seed=0)
    write_scenes(root / "warm", 1, SceneConfig(frames=3), seed=99)
    cfg = AutolabelConfig(mode=args.mode, vlm=VLMConfig(device=args.device))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runner.run(cfg, str(root / "warm"), str(root / "warm_out"), workers=2)
    one = timed(cfg, root / "data", root / "out1", 1)
    two = timed(cfg, root / "data", root / "out2", 2)
    ray.shutdown()
    print(json.dumps({"benchmark": "autolabel_throughput", "device": f"{args.device}, {os.cpu_count()} cores",
                      "config": {"sequences": args.sequences, "frames": args.frames, "mode": args.mode,
                                 "ray_num_cpus": 2, "vlm": cfg.vlm.backend},
                      "results": two, "baseline": one, "ratio": round(two["frames_per_s"] / one["frames_per_s"], 3),
                      "command": "python " + " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
