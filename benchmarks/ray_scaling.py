"""Training throughput, MFU and 1 -> N GPU scaling of `raytrain train` through Ray (Ray Train workers, one GPU each,
NCCL), read from the trainer's own log lines.

Two recipes at the reference per-GPU batch (16 x 2048 packed tokens): `experiment=openelm_270m` (the default GPU
trainer: ZeRO-2, bf16, compiled blocks) and `experiment=openelm_1_1b trainer.zero_stage=3`, each on N GPUs and then
on 1, every run submitted with `raytrain submit` to a head this script starts (`ray start --head --block`; if it
cannot, runs use `raytrain train` with a local Ray). Throughput is the mean of the trainer's logged windows after
the first two (start-up and compilation excluded). The corpus is the embedded one repeated into a temporary JSONL;
the tokenizer is trained once and shared. A run that would not fit in what is left of `--budget-s` is skipped and
reported as such; a recipe whose compiled N-GPU run fails before its first step runs eager (noted in the results).

    python benchmarks/ray_scaling.py --device cuda --gpus 2 --out DIR

Prints one JSON line: results per run, the 1-GPU runs as baseline, and ratio = the 1.1B ZeRO-3 scaling efficiency
(tokens/s on N GPUs / (N x tokens/s on 1 GPU)). Each run's full log is written to DIR/<run>.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss ([\d.naif]+) \|.*?tokens/s ([\d,]+)(?: \| mfu ([\d.]+)%)?")
MIN_RUN_S = 75  # a run needs at least start-up, compilation, a few windows and the final checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=480, help="stop starting runs after this long")
    p.add_argument("--run-cap-s", type=float, default=300, help="longest one run may take")
    p.add_argument("--vocab", type=int, default=32000, help="the shared tokenizer's size (OpenELM: 32000)")
    p.add_argument("--out", default="outputs/ray_scaling")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run (CPU smoke: a tiny model)")
    args = p.parse_args()
    budget = Budget(time.monotonic() + args.budget_s, args.run_cap_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="raytrain-scaling-"))
    corpus, tokenizer = prepare_data(work, args.vocab)
    common = [f"data.path={corpus}", f"data.tokenizer={tokenizer}", "data.packing=true", "tracking=disabled",
              "sample.prompt=null", f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}",
              f"trainer.checkpoint_every={args.steps}", "trainer.max_failures=0",
              f"trainer.storage_path={work / 'runs'}"]
    if args.device != "cuda":
        common += ["trainer.use_gpu=false", "trainer.compile=false"]
    recipes = {"openelm_270m-zero2": ["experiment=openelm_270m", *common, *args.extra],
               "openelm_1_1b-zero3": ["experiment=openelm_1_1b", "trainer.zero_stage=3", *common, *args.extra]}
    results: dict[str, Any] = {}
    with head(args.gpus) as address:
        for gpus in (args.gpus, 1):  # both recipes on N GPUs first: they are the figures asked for
            for model, overrides in recipes.items():
                name = f"{model}-{gpus}gpu"
                results[name] = run(name, [*overrides, f"trainer.num_workers={gpus}"], out, work, budget, address)
                if gpus == args.gpus and results[name]["status"].startswith("failed") and \
                        not results[name].get("windows"):  # compiled run failed early: run this recipe eager
                    recipes[model] = overrides = [*overrides, "trainer.compile=false"]
                    results[name] = {**run(f"{name}-eager", [*overrides, f"trainer.num_workers={gpus}"], out, work,
                                           budget, address), "note": f"compiled run failed ({out / name}.log); eager"}
    shutil.rmtree(work, ignore_errors=True)
    emit(args, results)


class Budget:
    def __init__(self, deadline: float, cap_s: float) -> None:
        self.deadline, self.cap_s = deadline, cap_s

    def next_run_s(self) -> float:
        return min(self.cap_s, self.deadline - time.monotonic())


def prepare_data(work: Path, vocab: int) -> tuple[Path, Path]:
    """The embedded corpus repeated into a JSONL large enough for every run, and a BPE trained once on it."""
    from raytrain.data.corpus import documents
    from raytrain.data.tokenizer import train_bpe

    docs = documents()
    corpus = work / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(30):
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    tokenizer = work / "tokenizer"
    train_bpe(docs, vocab).save_pretrained(tokenizer)
    return corpus, tokenizer


def run(name: str, overrides: list[str], out: Path, work: Path, budget: Budget,
        address: str | None = None) -> dict[str, Any]:
    """One training run as a subprocess (`raytrain train`, or `raytrain submit` to `address`), its log kept."""
    left = budget.next_run_s()
    if left < MIN_RUN_S:
        return {"status": "skipped", "reason": f"{left:.0f} s of the budget left"}
    overrides = [*overrides, f"trainer.run_name={name}"]
    cli = [sys.executable, "-m", "raytrain"]
    cmd = ([*cli, "submit", "--address", address, f"python={sys.executable}", "--", "train", *overrides] if address
           else [*cli, "train", *overrides])
    start = time.monotonic()
    log = out / f"{name}.log"
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            status = "ok" if proc.wait(timeout=left) == 0 else f"failed (exit status {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if address:  # the job outlives its follower; stop it before it holds the GPUs of the next run
                from raytrain.cluster.jobs import JobClient

                JobClient(address).stop(f"{name}-a1")
            status = "timed out"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)  # multi-GB checkpoints; the figures are in the log
    return {"status": status, "via": "raytrain submit" if address else "raytrain train",
            "wall_s": round(time.monotonic() - start, 1), **throughput(log.read_text())}


def throughput(log: str, skip: int = 2) -> dict[str, Any]:
    """Mean tokens/s and MFU of the trainer's logged windows after the first `skip` (start-up, compilation)."""
    windows = [(int(m[1]), float(m[2]), float(m[3].replace(",", "")), float(m[4]) / 100 if m[4] else None)
               for m in STEP_LINE.finditer(log)]
    steady = windows[skip:]
    if not steady:
        return {"windows": len(windows)}
    out = {"tokens_per_s": statistics.mean(w[2] for w in steady), "windows": len(steady),
           "steps": f"{steady[0][0]}..{steady[-1][0]}", "final_loss": windows[-1][1]}
    if all(w[3] is not None for w in steady):
        out["mfu"] = statistics.mean(w[3] for w in steady)
    return out


@contextlib.contextmanager
def head(gpus: int) -> Iterator[str | None]:
    """A local head to submit to (`raytrain.cluster.local_head`), once a client has listed its jobs; None, and runs
    start their own Ray with `raytrain train`, if either fails."""
    from raytrain.cluster.jobs import JobClient
    from raytrain.cluster.local_head import LocalHead

    with contextlib.ExitStack() as stack:
        try:  # logical CPUs: the jobs' drivers and Ray Data need some beside the workers even on a small machine
            url = stack.enter_context(LocalHead(num_gpus=gpus, num_cpus=max(os.cpu_count() or 1, 16)))
            import aiohttp  # noqa: F401 (following a job's logs needs it)

            JobClient(url).jobs()
        except Exception as e:  # any failure here only changes how the runs start
            print(f"ray_scaling: no head to submit to ({e}); runs use a local Ray instead", file=sys.stderr)
            stack.close()
            url = None
        yield url


def emit(args: argparse.Namespace, results: dict[str, Any]) -> None:
    import torch

    n = args.gpus
    for model in ("openelm_1_1b-zero3", "openelm_270m-zero2"):
        many, one = results[f"{model}-{n}gpu"], results[f"{model}-1gpu"]
        if "tokens_per_s" in many and "tokens_per_s" in one:
            many["scaling_efficiency"] = many["tokens_per_s"] / (n * one["tokens_per_s"])
    device = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if args.device == "cuda"
              and torch.cuda.is_available() else args.device)
    line = {"benchmark": "ray_scaling", "device": device,
            "config": {"gpus": n, "steps": args.steps, "log_every": args.log_every, "per_gpu_batch": "16 x 2048",
                       "data": "embedded corpus x30, packed", "precision": "bf16" if args.device == "cuda" else "fp32",
                       "extra_overrides": args.extra},
            "results": {k: v for k, v in results.items() if not k.endswith("-1gpu")},
            "baseline": {k: v for k, v in results.items() if k.endswith("-1gpu")},
            "ratio": results[f"openelm_1_1b-zero3-{n}gpu"].get("scaling_efficiency"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    (Path(args.out) / "ray_scaling.json").write_text(json.dumps(line, indent=2) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
