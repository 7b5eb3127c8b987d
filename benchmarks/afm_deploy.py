"""AFM deployment evidence (spec section 4, check 4): held-out perplexity of a model at 16/32-bit, palettized 4-bit,
mixed 3.5 bpw and 2-bit, each without and with an accuracy-recovery adapter (ARA), beside SeedLM and RTN at about
the same bits per weight, and the mixed setting allocated by plain squared error instead of the Fisher-weighted one
(the importance rule's ablation).

Every step is the user's command: the base is trained with `raytrain train model=afm_tiny data=afm_mix` (or given
with --checkpoint: any raytrain, OpenELM or Hugging Face Llama checkpoint with a tokenizer); each variant is written
by `raytrain compress` on Ray; each ARA is `raytrain train job=ara init=COMPRESSED objective.teacher=BASE` (LoRA on
the frozen compressed base, KL to the uncompressed model, on the training mixture), at the given ranks. All runs
share one local Ray cluster; a rerun with the same --out reuses what is already written. Perplexity is measured on
`embedded:heldout` (reference topics never trained on).

    python benchmarks/afm_deploy.py [--checkpoint DIR] [--base-steps 400] [--ara-steps 300] [--ara-ranks 1,16]

Prints one JSON line: results (per variant: bits per linear weight, perplexity, perplexity with each ARA, the
adapter's own bits per linear weight), baseline (the uncompressed model's perplexity), ratio (per palettized
variant and rank, the share of its perplexity increase the ARA recovers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from raytrain.checkpoint.hf import latest_run_checkpoint  # noqa: E402
# name -> compress overrides; the ARA_FOR rows also get accuracy-recovery adapters
VARIANTS = {
    "palettize_4bit": ["method=palettize", "bits=4"],
    "seedlm_4bit": ["method=seedlm", "bits=4"],
    "rtn_4bit_g128": ["method=rtn", "bits=4", "rtn.group_size=128"],
    "palettize_mixed_3.5": ["method=palettize", "bits=mixed", "target_bpw=3.5"],
    "palettize_mixed_3.5_by_error": ["method=palettize", "bits=mixed", "target_bpw=3.5", "palettize.importance=error"],
    "rtn_3bit_g32": ["method=rtn", "bits=3", "rtn.group_size=32"],
    "seedlm_3bit": ["method=seedlm", "bits=3"],
    "palettize_2bit": ["method=palettize", "bits=2"],
    "rtn_2bit_g64": ["method=rtn", "bits=2", "rtn.group_size=64"],
}
ARA_FOR = ("palettize_4bit", "palettize_mixed_3.5", "palettize_2bit")
COMMON_TRAIN = ["tracking=disabled", "sample.prompt=null", "data=afm_mix", "trainer.log_every=50"]


GPU = {"compress": ["job.gpus_per_task=1", "device=cuda"], "train": ["trainer.use_gpu=true", "trainer.num_workers=1"]}


def raytrain(command: str, *args: str, gpu: bool = False) -> str:
    """Run a raytrain command (on the benchmark's Ray cluster, through RAY_ADDRESS); its stdout."""
    extra = GPU[command] if gpu else []
    done = subprocess.run([sys.executable, "-m", "raytrain", command, *args, *extra], cwd=REPO, check=True,
                          stdout=subprocess.PIPE, text=True)
    return done.stdout


def latest_model(run_dir: Path) -> Path:
    return latest_run_checkpoint(run_dir) / "model"


def perplexity(base: Path, windows, device: str, adapter: Path | None = None) -> float:
    from raytrain.checkpoint.hf import load_pretrained
    from raytrain.compress.evaluate import perplexity as ppl

    model = load_pretrained(base, device=device, adapter=adapter).model
    return ppl(model, windows, model.cfg.vocab_size, device=device)


def adapter_bits(adapter: Path, linear_weights: int) -> float:
    from raytrain.checkpoint.adapter import read_adapter

    return 16 * sum(t.numel() for t in read_adapter(adapter).state.values()) / linear_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="the model to compress (default: train afm_tiny here)")
    parser.add_argument("--base-steps", type=int, default=400)  # 1500 overfits the embedded mixture
    parser.add_argument("--ara-steps", type=int, default=300)
    parser.add_argument("--ara-ranks", default="1,16")
    parser.add_argument("--ara-lr", type=float, default=2e-3)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", default="outputs/afm_deploy")
    parser.add_argument("--cpus", type=int, default=4, help="of the local Ray cluster")
    parser.add_argument("--device", default="cpu", help="cuda: compression, training and evaluation on GPUs")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="a subset of " + ", ".join(VARIANTS))
    args = parser.parse_args()
    if args.device == "cpu" and args.cpus < 4:  # else the ARA runs wait forever for Ray Data's CPUs
        parser.error(f"--cpus={args.cpus}: the two CPU training workers need two more CPUs for Ray Data (at least 4)")
    import ray

    from raytrain.checkpoint.hf import linear_weight_names, stored_tensors
    from raytrain.pipelines.compress import EvalConfig, heldout_windows

    out, gpu = Path(args.out).resolve(), args.device == "cuda"
    out.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)  # stdout: the JSON line only
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    seconds = {}
    started = time.perf_counter()
    if args.checkpoint:
        base = Path(args.checkpoint).resolve()
    else:
        if not (out / "runs" / "base").is_dir():
            raytrain("train", "model=afm_tiny", *COMMON_TRAIN, f"trainer.max_steps={args.base_steps}",
                     f"trainer.checkpoint_every={args.base_steps}", f"trainer.storage_path={out / 'runs'}",
                     "trainer.run_name=base", gpu=gpu)
        base = latest_model(out / "runs" / "base")
    seconds["base"] = time.perf_counter() - started
    shapes = stored_tensors(base)
    linear = sum(shapes[n].shape[0] * shapes[n].shape[1] for n in linear_weight_names(base))
    windows = heldout_windows(base, EvalConfig(text="embedded:heldout", seq_len=args.seq_len,
                                               max_tokens=args.eval_tokens), key="heldout")
    ranks = [int(r) for r in args.ara_ranks.split(",") if r]
    results = {}
    for name in args.variants.split(","):
        overrides = VARIANTS[name]
        target = out / "compressed" / name
        started = time.perf_counter()
        if not target.is_dir():
            raytrain("compress", f"checkpoint={base}", f"out={target}", *overrides, gpu=gpu)
        record = json.loads((target / "config.json").read_text())["raytrain_compression"]
        seconds[f"compress_{name}"] = time.perf_counter() - started
        row = {"bits_per_weight": record["bits_per_weight"], "perplexity": perplexity(target, windows, args.device)}
        if name in ARA_FOR:
            for rank in ranks:
                run = out / "runs" / f"ara-{name}-r{rank}"
                started = time.perf_counter()
                if latest_run_checkpoint(run) is None:
                    raytrain("train", "job=ara", f"init={target}", f"objective.teacher={base}", *COMMON_TRAIN,
                             f"lora.rank={rank}", f"lora.alpha={2 * rank}", f"optim.lr={args.ara_lr}",
                             f"trainer.max_steps={args.ara_steps}", f"trainer.checkpoint_every={args.ara_steps}",
                             f"trainer.storage_path={out / 'runs'}", f"trainer.run_name={run.name}",
                             f"data.seq_len={args.seq_len}", gpu=gpu)
                seconds[f"ara_{name}_r{rank}"] = time.perf_counter() - started
                adapter = latest_model(run)
                row[f"perplexity_ara_r{rank}"] = perplexity(target, windows, args.device, adapter)
                row[f"adapter_bits_per_weight_r{rank}"] = adapter_bits(adapter, linear)
        results[name] = row
        print(json.dumps({name: row}), file=sys.stderr)
    fp = perplexity(base, windows, args.device)
    ratio = {f"{name}_r{rank}": (row["perplexity"] - row[f"perplexity_ara_r{rank}"]) / (row["perplexity"] - fp)
             for name, row in results.items() for rank in ranks if f"perplexity_ara_r{rank}" in row}
    print(json.dumps({
        "benchmark": "afm_deploy", "device": args.device,
        "config": {"base": str(base), "base_steps": None if args.checkpoint else args.base_steps,
                   "eval": f"embedded:heldout, {windows[:, 1:].numel()} tokens in windows of {args.seq_len + 1}",
                   "ara": {"steps": args.ara_steps, "ranks": ranks, "lr": args.ara_lr, "alpha": "2 x rank",
                           "objective": "KL to the uncompressed model (job=ara)", "data": "afm_mix"},
                   "linear_weights": linear, "variants": VARIANTS},
        "results": {**results, "seconds": {k: round(v, 1) for k, v in seconds.items()}},
        "baseline": {"uncompressed": {"bits_per_weight": 8 * shapes[linear_weight_names(base)[0]].dtype.itemsize,
                                      "perplexity": fp}},
        "ratio": {"ara_recovered_share_of_perplexity_increase": ratio},
        "command": "python benchmarks/afm_deploy.py " + " ".join(sys.argv[1:]),
    }))


if __name__ == "__main__":
    main()
