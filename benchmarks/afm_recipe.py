"""AFM recipe evidence at tiny scale: does distillation help, does pruned init help? (spec section 4, checks 1-2)

Runs `raytrain train recipe=afm_tiny` up to its core stage (train the larger model, prune it into afm_tiny with
learned masks, core pretraining distilled from the larger model), then the same core stage twice more with one
thing changed: without the teacher (plain cross-entropy), and from a random init instead of the pruned one. Every
core run has the same steps, data and optimizer. Each final checkpoint is scored on the held-out topics of the
embedded corpus (`embedded:heldout`, never trained on) by mean next-token cross-entropy.

    python benchmarks/afm_recipe.py [--core-steps 300] [--teacher-steps 600] [--device cpu]

Prints one JSON line: results (distilled, pruned init), baseline (undistilled, random init), ratio (distilled /
undistilled held-out loss; below 1 means distillation helped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def recipe(run: str, storage: str, *overrides: str) -> list[str]:
    return ["raytrain", "train", "recipe=afm_tiny", f"trainer.run_name={run}", f"trainer.storage_path={storage}",
            "tracking=disabled", "sample.prompt=null", "~recipe.stages.continued", "~recipe.stages.context",
            *overrides]


def run(command: list[str], use_gpu: bool) -> float:
    gpu = ["trainer.use_gpu=true", "trainer.num_workers=1"] if use_gpu else []
    full = [sys.executable, "-m", "raytrain", *command[1:], *gpu]
    start = time.perf_counter()
    subprocess.run(full, cwd=REPO, check=True)
    return time.perf_counter() - start


def heldout_loss(checkpoint: Path, seq_len: int, device: str) -> float:
    """Mean next-token cross-entropy over the held-out topics, packed into rows of seq_len + 1 tokens."""
    from raytrain.checkpoint.hf import load_pretrained
    from raytrain.data.corpus import source
    from raytrain.data.text import TextDataConfig, tokenize_documents
    from raytrain.train.objectives import lm_loss, next_token_pairs

    loaded = load_pretrained(checkpoint, device=device)
    cfg = TextDataConfig(seq_len=seq_len, words_per_piece=256, min_chars=20, min_tokens=8, packing=True)
    rows = torch.as_tensor(tokenize_documents(source("heldout"), cfg, loaded.tokenizer), dtype=torch.int64)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in rows.to(device).split(32):
            inputs, labels = next_token_pairs(batch, loaded.tokenizer.pad_token_id)
            ce = lm_loss(loaded.model(inputs), labels, 0.0)[1]
            total, count = total + ce.item() * len(batch), count + len(batch)
    return total / count


def final(storage: str, run_name: str, stage: str) -> Path:
    from raytrain.checkpoint.hf import latest_run_checkpoint

    directory = Path(storage) / run_name / f"{run_name}.{stage}"
    return directory / "model" if stage == "prune" else latest_run_checkpoint(directory) / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--core-steps", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--storage", default="outputs/afm_recipe")
    args = parser.parse_args()
    storage = os.path.abspath(args.storage)
    use_gpu = args.device == "cuda"
    core = f"recipe.stages.core.steps={args.core_steps}"

    times = {"distilled": run(recipe("afm-ref", storage, core, f"recipe.stages.teacher.steps={args.teacher_steps}"),
                              use_gpu)}
    teacher, pruned = final(storage, "afm-ref", "teacher"), final(storage, "afm-ref", "prune")
    given = ["~recipe.stages.teacher", "~recipe.stages.prune", f"recipe.stages.core.objective.teacher={teacher}",
             f"recipe.stages.core.init={pruned}", core]
    times["undistilled"] = run(recipe("afm-nodistill", storage, *given, "recipe.stages.core.objective.name=lm"),
                               use_gpu)
    times["random_init"] = run(recipe("afm-random", storage, *given, "recipe.stages.core.init=none"), use_gpu)

    seq = 64
    loss = {name: heldout_loss(final(storage, run_name, "core"), seq, args.device)
            for name, run_name in (("distilled", "afm-ref"), ("undistilled", "afm-nodistill"),
                                   ("random_init", "afm-random"))}
    loss["teacher"] = heldout_loss(teacher, seq, args.device)
    loss["pruned_before_core"] = heldout_loss(pruned, seq, args.device)
    print(json.dumps({
        "benchmark": "afm_recipe", "device": args.device,
        "config": {"student": "afm_tiny", "teacher": "afm_tiny_teacher", "core_steps": args.core_steps,
                   "teacher_steps": args.teacher_steps, "eval": "embedded:heldout, packed rows of 65 tokens",
                   "optimizer": "adastar", "distill": "0.9 teacher top-1 + 0.1 label"},
        "results": {"heldout_loss_distilled_pruned_init": loss["distilled"],
                    "heldout_loss_teacher": loss["teacher"],
                    "heldout_loss_pruned_before_core": loss["pruned_before_core"], "seconds": times},
        "baseline": {"heldout_loss_undistilled_pruned_init": loss["undistilled"],
                     "heldout_loss_distilled_random_init": loss["random_init"]},
        "ratio": {"distilled_over_undistilled": loss["distilled"] / loss["undistilled"],
                  "pruned_over_random_init": loss["distilled"] / loss["random_init"]},
        "command": "python benchmarks/afm_recipe.py " + " ".join(sys.argv[1:]),
    }))


if __name__ == "__main__":
    main()
