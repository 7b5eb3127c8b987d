"""Held-out VQA exact match of Victor against its baselines, trained with the same steps, in one run.

Each variant is trained by `raytrain train job=vlm` (Ray Train + DeepSpeed, both recipe stages, the same data,
tower, steps, batch and seed; a variant whose run already finished under `--storage` is reused): the LLaVA baseline
(`vlm.mode=off`), Victor with M = 8 and M = 32 (k = 3), and registers without the drop (M = 8, k = n). FastV (the 8
visual tokens that received the most attention in layer k-1 survive layer k = 3) is applied at inference to the
baseline's weights, as the paper compares it. Each model answers the held-out split (scenes no training record
shows) greedily through `raytrain.infer.vlm.answer`; exact match after `vqa.normalise`, overall and per question
kind, with the process CPU time of the evaluation. Prints one JSON line; `ratio` is Victor-8's accuracy over the
baseline's.

    python benchmarks/victor_vqa.py --data DIR --tower RUN --storage DIR [--align-steps 100 --finetune-steps 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from raytrain.checkpoint.hf import latest_run_checkpoint, load_pretrained, read_model_config  # noqa: E402
from raytrain.data.vqa import normalise  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.infer.vlm import answer, pixels  # noqa: E402
from raytrain.models.vlm import VictorConfig  # noqa: E402

TRAINED = {"baseline": ["vlm.mode=off"], "victor_8": ["vlm.registers=8"], "victor_32": ["vlm.registers=32"],
           "registers_8_no_drop": ["vlm.registers=8", "vlm.drop_layer=99"]}


def train(name: str, extra: list[str], args: argparse.Namespace) -> Path:
    """The variant's final checkpoint, training it first unless its run finished earlier."""
    run = f"{args.prefix}-{name}"
    final = latest_run_checkpoint(Path(args.storage) / run / f"{run}.finetune")
    if final is not None and json.loads((final / "model" / "raytrain.json").read_text())["step"] == \
            args.finetune_steps:
        return final / "model"
    command = [sys.executable, "-m", "raytrain", "train", "job=vlm", *extra, f"data.path={args.data}",
               f"task.image_tower={args.tower}", f"trainer.storage_path={args.storage}", f"trainer.run_name={run}",
               f"recipe.stages.align.steps={args.align_steps}", f"recipe.stages.finetune.steps={args.finetune_steps}",
               f"trainer.micro_batch_size={args.batch}", "tracking=disabled", *args.override]
    print(" ".join(command), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, env=env, stdout=sys.stderr)
    return latest_run_checkpoint(Path(args.storage) / run / f"{run}.finetune") / "model"


def heldout(args: argparse.Namespace) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(args.data) / "heldout", columns=["image", "question", "answer", "kind"]).to_pylist()
    return rows[:args.heldout]


@torch.no_grad()
def evaluate(checkpoint: Path, rows: list[dict], victor: VictorConfig | None, batch: int) -> dict:
    config = read_model_config(checkpoint)
    if victor is not None:
        config = dataclasses.replace(config, victor=victor)
    pretrained = load_pretrained(checkpoint, config=config)
    model, tok = pretrained.model.eval(), pretrained.tokenizer
    size = config.image.image_size
    correct, per_kind = 0, defaultdict(lambda: [0, 0])
    start = time.process_time()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        answers = answer(model, tok, [r["question"] for r in chunk], [pixels(r["image"], size) for r in chunk],
                         SamplingParams(max_new_tokens=6, temperature=0.0))
        for r, a in zip(chunk, answers):
            hit = normalise(a) == normalise(r["answer"])
            correct += hit
            per_kind[r["kind"]][0] += hit
            per_kind[r["kind"]][1] += 1
    return {"exact_match": correct / len(rows), "eval_cpu_s": time.process_time() - start,
            "per_kind": {k: round(c / n, 4) for k, (c, n) in sorted(per_kind.items())},
            "victor": dataclasses.asdict(config.victor), "checkpoint": str(checkpoint)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a `raytrain data make=vqa` directory")
    parser.add_argument("--tower", required=True, help="the image tower checkpoint (a CatLIP or CLIP run)")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--prefix", default="vqa")
    parser.add_argument("--align-steps", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--override", nargs="*", default=[], help="more `raytrain train` overrides for every run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoints = {name: train(name, extra, args) for name, extra in TRAINED.items()}
    rows = heldout(args)
    results = {name: evaluate(path, rows, None, 50) for name, path in checkpoints.items()}
    drop = read_model_config(checkpoints["victor_8"]).victor.drop_layer
    results["fastv_8"] = evaluate(checkpoints["baseline"], rows, VictorConfig(mode="fastv", keep_visual=8,
                                                                              drop_layer=drop), 50)
    for name, r in results.items():
        print(f"{name}: exact match {r['exact_match']:.4f} {r['per_kind']}", file=sys.stderr)
    baseline = results.pop("baseline")
    print(json.dumps({
        "benchmark": "victor_vqa", "device": f"cpu ({os.cpu_count()} cores)",
        "config": {"data": args.data, "tower": args.tower, "heldout": len(rows), "align_steps": args.align_steps,
                   "finetune_steps": args.finetune_steps, "micro_batch_size": args.batch,
                   "override": args.override},
        "results": results, "baseline": baseline,
        "ratio": results["victor_8"]["exact_match"] / max(baseline["exact_match"], 1e-9),
        "command": "python " + " ".join(sys.argv)}))


if __name__ == "__main__":
    main()
