"""`raytrain train` through Ray beside the in-process training step, and 1 -> N GPU scaling, read from the trainer's
own log lines.

Each run of `--runs MODEL:ZERO` (default OpenELM-270M under ZeRO-2 and OpenELM-1.1B under ZeRO-3, the issue's pair)
is submitted with `raytrain submit` to a head this script starts (`ray start --head --block`; if it cannot, runs
use `raytrain train` with a local Ray) on N GPUs and, when N > 1, on 1, at the reference per-GPU batch (16 x 2048
packed tokens, bf16, compiled blocks, `trainer=cluster`). Beside them, the same model's in-process step
(`benchmarks/train_throughput.py`: the same batch, bf16 autocast, compiled, fused AdamW, no Ray, no DeepSpeed)
gives the baseline. Through Ray, throughput is the mean of the logged windows after the first two (start-up and
compilation excluded); the log lines also give the share of each window the loop waited for data and the worker's
CPU time per step.
The corpus is the embedded one repeated into 30 temporary JSONL files; the tokenizer is trained once and shared.
A run that would not fit in what is left of `--budget-s` is skipped and reported as such.

    python benchmarks/ray_scaling.py --device cuda --gpus 1       # Ray vs in-process, 1 GPU (~11 min cold on an H200:
                                                                   # --budget-s 450 skips what no longer fits)
    python benchmarks/ray_scaling.py --device cuda --gpus 1 --runs openelm_270m:2    # one model a command: ~6 min
    python benchmarks/ray_scaling.py --device cuda --gpus 1 --runs openelm_1_1b:3 --budget-s 545 --run-cap-s 400
    python benchmarks/ray_scaling.py --device cuda --gpus 2       # also 2-GPU runs and scaling efficiency
    python benchmarks/ray_scaling.py --device cpu --runs openelm_micro:2 openelm_micro:3 --batch 8 --seq 128 \\
        --steps 100 --log-every 10                                 # CPU: the per-step overhead of the Ray path

Prints one JSON line: `results` has every run through Ray (`vs_in_process`: its tokens/s per GPU over the in-process
step's; `step_overhead_ms` and `cpu_overhead_ms`: the differences of their step times and of their CPU time per
step; with N > 1 also `scaling_efficiency`), `baseline` the in-process steps, and `ratio` the smallest
`vs_in_process` at 1 GPU (N = 1) or the last run's scaling efficiency (N > 1). Each run's full log is written to
OUT/<run>.log.
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

STEP_LINE = re.compile(r"step (\d+)/\d+ \| loss ([\d.naif]+) \|.*?tokens/s ([\d,]+)(?: \| mfu ([\d.]+)%)?"
                       r"(?: \| data wait ([\d.]+)%)?(?: \| cpu ([\d.]+) ms/step)?")
MIN_RUN_S = 75  # a run needs at least start-up, compilation, a few windows and the final checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--runs", nargs="+", default=["openelm_270m:2", "openelm_1_1b:3"], help="MODEL:ZERO_STAGE")
    p.add_argument("--batch", type=int, default=16, help="sequences per GPU (worker) per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=450, help="no run goes on past this long (the whole < 8 min)")
    p.add_argument("--run-cap-s", type=float, default=300, help="longest one run may take")
    p.add_argument("--out", default="outputs/ray_scaling")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run through Ray")
    args = p.parse_args()
    budget = Budget(time.monotonic() + args.budget_s, args.run_cap_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(model, int(zero)) for model, zero in (r.split(":") for r in args.runs)]
    work = Path(tempfile.mkdtemp(prefix="raytrain-scaling-"))
    corpus, tokenizer = prepare_data(work, min(vocab_size(model) for model, _ in runs))
    baseline = {model: in_process(model, args, budget) for model in dict.fromkeys(m for m, _ in runs)}
    common = [f"data.path={corpus}", f"data.tokenizer={tokenizer}", "data=text", "data.packing=true",
              f"data.seq_len={args.seq}", f"trainer.micro_batch_size={args.batch}", "tracking=disabled",
              "sample.prompt=null", f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}",
              f"trainer.checkpoint_every={args.steps}", "trainer.max_failures=0",
              f"trainer.storage_path={work / 'runs'}", "trainer=cluster" if args.device == "cuda" else "trainer=local"]
    results: dict[str, Any] = {}
    with head(args.gpus) as address:
        for gpus in sorted({args.gpus, 1}, reverse=True):  # the N-GPU runs first: they are the figures asked for
            for model, zero in runs:
                name = f"{model}-zero{zero}-{gpus}gpu"
                overrides = [f"model={model}", *common, f"trainer.zero_stage={zero}", f"trainer.num_workers={gpus}",
                             *args.extra]
                results[name] = {"gpus": gpus, **run(name, overrides, out, work, budget, address)}
                compare(results[name], baseline[model], args)
    shutil.rmtree(work, ignore_errors=True)
    emit(args, runs, results, baseline)


class Budget:
    def __init__(self, deadline: float, cap_s: float) -> None:
        self.deadline, self.cap_s = deadline, cap_s

    def next_run_s(self) -> float:
        return min(self.cap_s, self.deadline - time.monotonic())


def vocab_size(model: str) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml").vocab_size)


def prepare_data(work: Path, vocab: int) -> tuple[Path, Path]:
    """The embedded corpus repeated into 30 JSONL files (Ray Data reads and tokenizes one task per file, so one
    file would tokenize on one core), and a BPE trained once on it."""
    from raytrain.data.corpus import documents
    from raytrain.data.tokenizer import train_bpe

    docs = documents()
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"part-{i:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = work / "tokenizer"
    train_bpe(docs, vocab).save_pretrained(tokenizer)
    return corpus, tokenizer


def in_process(model: str, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """The in-process step of `train_throughput.py` (its raytrain half) for `model`, at this batch; on CPU with
    one thread, as a Ray Train worker of `trainer=local` (one CPU) gets."""
    left = budget.next_run_s()
    if left < MIN_RUN_S / 2:
        return {"status": "skipped", "reason": f"{left:.0f} s of the budget left"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--device", args.device,
           "--model", model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", "15", "--warmup", "5",
           "--raytrain-only", *([] if args.device == "cuda" else ["--no-compile"])]
    env = {**os.environ, **({} if args.device == "cuda" else {"OMP_NUM_THREADS": "1"})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timed out"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": f"failed (exit status {proc.returncode})", "error": proc.stderr.strip()[-300:]}
    return {"status": "ok", **json.loads(lines[-1])["results"]}


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
    """Mean tokens/s, MFU, data wait and worker CPU time per step of the trainer's logged windows after the first
    `skip` (start-up, compilation)."""
    windows = [(int(m[1]), float(m[2]), float(m[3].replace(",", "")), float(m[4]) / 100 if m[4] else None,
                float(m[5]) / 100 if m[5] else None, float(m[6]) if m[6] else None) for m in STEP_LINE.finditer(log)]
    steady = windows[skip:]
    if not steady:
        return {"windows": len(windows)}
    out = {"tokens_per_s": statistics.mean(w[2] for w in steady), "windows": len(steady),
           "steps": f"{steady[0][0]}..{steady[-1][0]}", "final_loss": windows[-1][1]}
    for key, index in (("mfu", 3), ("data_wait", 4), ("cpu_ms_per_step", 5)):
        if all(w[index] is not None for w in steady):
            out[key] = statistics.mean(w[index] for w in steady)
    return out


def compare(ray_run: dict[str, Any], step: dict[str, Any], args: argparse.Namespace) -> None:
    """Per GPU, the run's tokens/s over the in-process step's and the difference of their step times; and the
    difference of their CPU time per step (what the Ray path adds on the host, which a busy machine does not
    blur the way it blurs wall time)."""
    if "tokens_per_s" not in ray_run or "tokens_per_s" not in step:
        return
    per_gpu = ray_run["tokens_per_s"] / ray_run["gpus"]
    ray_run["vs_in_process"] = per_gpu / step["tokens_per_s"]
    tokens = args.batch * args.seq
    ray_run["step_overhead_ms"] = 1e3 * (tokens / per_gpu - tokens / step["tokens_per_s"])
    if "cpu_ms_per_step" in ray_run and "cpu_s_per_step" in step:
        ray_run["cpu_overhead_ms"] = ray_run["cpu_ms_per_step"] - 1e3 * step["cpu_s_per_step"]


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


def emit(args: argparse.Namespace, runs: list[tuple[str, int]], results: dict[str, Any],
         baseline: dict[str, Any]) -> None:
    import torch

    n = args.gpus
    for model, zero in runs:
        many, one = results[f"{model}-zero{zero}-{n}gpu"], results[f"{model}-zero{zero}-1gpu"]
        if n > 1 and "tokens_per_s" in many and "tokens_per_s" in one:
            many["scaling_efficiency"] = many["tokens_per_s"] / (n * one["tokens_per_s"])
    if n == 1:
        ratios = [r["vs_in_process"] for r in results.values() if "vs_in_process" in r]
        ratio, meaning = (min(ratios) if len(ratios) == len(results) else None), "min vs_in_process at 1 GPU"
    else:
        model, zero = runs[-1]
        ratio, meaning = results[f"{model}-zero{zero}-{n}gpu"].get("scaling_efficiency"), "scaling efficiency"
    device = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if args.device == "cuda"
              and torch.cuda.is_available() else args.device)
    line = {"benchmark": "ray_scaling", "device": device,
            "config": {"gpus": n, "runs": args.runs, "steps": args.steps, "log_every": args.log_every,
                       "per_gpu_batch": f"{args.batch} x {args.seq}", "data": "embedded corpus x30, packed",
                       "precision": "bf16" if args.device == "cuda" else "fp32", "extra_overrides": args.extra,
                       "ratio": meaning},
            "results": results, "baseline": baseline, "ratio": ratio,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    (Path(args.out) / "ray_scaling.json").write_text(json.dumps(line, indent=2) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
