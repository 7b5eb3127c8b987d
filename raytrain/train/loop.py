"""The per-worker training loop that Ray Train runs on every rank.

Each rank builds the model, hands it with a torch optimizer and LR schedule to DeepSpeed, resumes from the latest
registered checkpoint if there is one (weights, optimizer, schedule, data position, RNG), and trains on its shard
of the Ray Dataset; the job's task (`tasks.py`) turns batches into inputs and a loss. Every `checkpoint_every`
steps all ranks save and report together; rank 0 logs progress to the console and to W&B. A non-finite loss ends
the run before anything is saved, so the last good checkpoint stays. Steps the optimizer skipped (adastar's
gradient-norm rule, or DeepSpeed's on a non-finite gradient) are counted and logged.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raytrain.data.text import DataError
from raytrain.models.registry import build_model
from raytrain.train import checkpoint, tasks
from raytrain.train.checkpoint import Progress
from raytrain.train.config import TrainJob
from raytrain.train.engine import (apply_model_options, deepspeed_config, engine_zero_stage, initialize,
                                   model_init_context, resolve_precision)
from raytrain.train.optim import build_optimizer, build_scheduler
from raytrain.train.tracking import Tracker

log = logging.getLogger("raytrain.train")
GPU_PEAK_TFLOPS = 989.0  # H100/H200 dense bf16


def train_loop(job: TrainJob) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # DeepSpeed calls collectives that torch has renamed; the warnings repeat on every step of every rank
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = job.trainer
    precision = resolve_precision(t.precision, t.use_gpu)
    ds_config = deepspeed_config(t, precision)
    if rank == 0 and ds_config["zero_optimization"]["stage"] != t.zero_stage:
        log.info("trainer.zero_stage=%d on one worker runs as ZeRO-%d: there is nothing to partition", t.zero_stage,
                 ds_config["zero_optimization"]["stage"])

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = _build(job, ds_config, device)
    work = tasks.worker(job, model, torch.bfloat16 if precision == "bf16" else torch.float32, device)
    optimizer = build_optimizer(model, job.optim, fused=t.use_gpu, grad_clip=t.grad_clip)
    total = job.schedule.total_steps or t.max_steps
    skipped = getattr(optimizer, "last_step_skipped", None)  # adastar: a skipped update does not advance the LR
    engine = initialize(model, optimizer, lambda opt: build_scheduler(opt, job.optim.lr, job.schedule, total, skipped),
                        ds_config)

    progress = Progress()
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            progress = checkpoint.restore(engine, d, job, rank, world, work.frozen_base)
            work.restore(Path(d) / "model")
        if rank == 0:
            log.info("resumed run %s at step %d", job.run_name, progress.step)
    elif t.init_from and t.init_optimizer:
        checkpoint.load_optimizer(engine, optimizer, t.init_from, world)
        if rank == 0:
            log.info("weights and optimizer state from %s", t.init_from)

    tracker = Tracker(job.tracking, job.run_name, job.snapshot, rank)
    try:
        return _train(engine, model, optimizer, work, job, progress, tracker, rank, world, device)
    finally:
        tracker.finish()


def _build(job: TrainJob, ds_config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    if job.trainer.init_from:  # the driver checked that its parameters have this model's shapes
        from raytrain.checkpoint.hf import load_pretrained

        model = load_pretrained(job.trainer.init_from, config=job.model).model.train()
    else:
        with model_init_context(ds_config):
            model = build_model(job.model, device)
    apply_model_options(model, job.trainer)
    return model.to(device)


def _train(engine: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, work: tasks.Worker, job: TrainJob,
           progress: Progress, tracker: Tracker, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Optimizer steps until `max_steps` (or `stop_after_steps`). Losses stay on the device and are reduced across
    ranks only at log and checkpoint steps, so the host never waits on the GPU in between; a non-finite mean at
    such a step ends the run before anything is saved. The time the loop waits for batches is logged as a share of
    each window (`data_wait`)."""
    import ray.train

    t = job.trainer
    stop_at = min(t.max_steps, t.stop_after_steps or t.max_steps)
    batches = _batches(ray.train.get_dataset_shard("train"), job, progress, device, work)
    meter = _Throughput(job, work, world)
    step_units = units_per_step(job, work, world)
    skipped = getattr(optimizer, "last_step_skipped", None)  # adastar's skip rule (DeepSpeed does not see it)
    window, window_steps = torch.zeros(len(work.metrics), device=device), 0
    while progress.step < stop_at:
        work.step = progress.step
        for _ in range(t.grad_accum):
            waited = time.perf_counter()
            inputs = next(batches)
            meter.data_wait_s += time.perf_counter() - waited
            loss, parts = work.loss(engine, inputs)
            engine.backward(loss)
            engine.step()
            window += parts
        if not engine.was_step_applied() or (skipped is not None and skipped()):
            progress.skipped_steps += 1
        work.after_step()
        progress.step += 1
        progress.tokens += step_units
        window_steps += 1
        log_now, save_now = (progress.step % every == 0 or progress.step == stop_at
                             for every in (t.log_every, t.checkpoint_every))
        if not (log_now or save_now):
            continue
        torch.distributed.all_reduce(window)
        values = dict(zip(work.metrics, (window / (window_steps * t.grad_accum * world)).tolist()))
        window, window_steps = torch.zeros(len(work.metrics), device=device), 0
        loss = values["loss"]
        if not math.isfinite(loss):
            if rank == 0:
                log.error("loss is %s at step %d; stopping without saving", loss, progress.step)
            return {"status": "non_finite_loss", "step": progress.step}
        metrics = {**values, "lr": engine.get_lr()[0], "skipped_steps": progress.skipped_steps}
        if log_now:
            metrics.update(meter.measure(progress.step), grad_norm=_grad_norm(engine))
            if rank == 0:
                log.info(_format(progress.step, t.max_steps, metrics))
            tracker.log(metrics, progress.step)
        if save_now:
            _save_and_report(engine, model, work, job, progress, metrics, rank, world)
    status = "finished" if progress.step >= t.max_steps else "stopped"
    return {"status": status, "step": progress.step}


def units_per_step(job: TrainJob, work: tasks.Worker, world: int) -> int:
    """Tokens (language modelling) or images trained on per optimizer step, all ranks together."""
    t = job.trainer
    return t.micro_batch_size * t.grad_accum * work.units_per_sample() * world


def _save_and_report(engine: Any, model: torch.nn.Module, work: tasks.Worker, job: TrainJob, progress: Progress,
                     metrics: dict[str, float], rank: int, world: int) -> None:
    import ray.train

    directory = checkpoint.save(engine, model, job, progress, rank, world, engine_zero_stage(job.trainer) == 3,
                                work)
    ray.train.report({"step": progress.step, "loss": metrics["loss"]},
                     checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_dir_name=checkpoint.checkpoint_name(progress.step))


def _batches(shard: Any, job: TrainJob, progress: Progress, device: torch.device, work: tasks.Worker) -> Iterator[Any]:
    """The task's inputs, a micro-batch at a time, epoch after epoch; on resume, skips what the checkpoint consumed.
    Ray Train splits the dataset equally and in order, so every rank sees the same number of batches. Ray Data
    collates and copies each batch to the GPU in a background thread; from pinned memory that copy is queued on the
    device without the thread waiting for the work already queued there, so the next batch is ready when the loop
    asks for it (a copy from pageable memory would wait for the device to drain, every step)."""
    skip = progress.epoch_batches
    while True:
        buffer = job.data.shuffle_buffer or None
        seen = 0
        stream = shard.iter_torch_batches(batch_size=job.trainer.micro_batch_size, drop_last=True,
                                          dtypes=work.dtypes, device=device, pin_memory=device.type == "cuda",
                                          local_shuffle_buffer_size=buffer,
                                          local_shuffle_seed=job.data.shuffle_seed + progress.epoch
                                          if buffer else None)
        for batch in work.regroup(stream, progress.epoch):
            seen += 1
            if skip:
                skip -= 1
                continue
            progress.epoch_batches += 1
            yield work.inputs(batch)
        if seen == 0:
            raise DataError(f"the dataset has fewer than trainer.micro_batch_size={job.trainer.micro_batch_size} "
                            f"samples per worker")
        progress.epoch += 1
        progress.epoch_batches = 0


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


class _Throughput:
    """Over the steps since the last measurement: tokens/s (or images/s), model FLOPs utilisation, the share of the
    time the loop waited for data (`data_wait_s`, added to by the loop) and the CPU time this worker process spent
    per step (all its threads: the loop, Ray Data's collation, DeepSpeed), which says how much host work a step
    costs even on a shared or busy machine."""

    def __init__(self, job: TrainJob, work: tasks.Worker, world: int) -> None:
        t = job.trainer
        self.unit = work.unit
        self.tokens_per_step = units_per_step(job, work, world)
        self.flops_per_token = work.flops_per_unit()
        peak = t.peak_tflops or (GPU_PEAK_TFLOPS if t.use_gpu else None)
        self.peak_flops = peak * 1e12 * world if peak else None
        self.last_time, self.last_cpu, self.last_step = time.perf_counter(), time.process_time(), None
        self.data_wait_s = 0.0

    def measure(self, step: int) -> dict[str, float]:
        now, cpu = time.perf_counter(), time.process_time()
        steps = step - self.last_step if self.last_step is not None else None
        elapsed, cpu_s, waited = now - self.last_time, cpu - self.last_cpu, self.data_wait_s
        self.last_time, self.last_cpu, self.last_step, self.data_wait_s = now, cpu, step, 0.0
        if not steps:  # the first interval includes start-up; report nothing rather than a wrong figure
            return {}
        tokens_per_s = steps * self.tokens_per_step / elapsed
        out = {f"{self.unit}_per_s": tokens_per_s, "data_wait": waited / elapsed,
               "cpu_ms_per_step": 1e3 * cpu_s / steps}
        if self.peak_flops and self.flops_per_token:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        return out


def _format(step: int, max_steps: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}",
             f"grad_norm {m.get('grad_norm', float('nan')):.3f}"]
    for unit in ("tokens", "images"):
        if f"{unit}_per_s" in m:
            parts.append(f"{unit}/s {m[f'{unit}_per_s']:,.0f}")
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if "data_wait" in m:
        parts.append(f"data wait {100 * m['data_wait']:.1f}%")
    if "cpu_ms_per_step" in m:
        parts.append(f"cpu {m['cpu_ms_per_step']:.1f} ms/step")
    if "distill" in m:
        parts.append(f"distill {m['distill']:.4f}")
    parts += [f"{name} {m[name]:.3f}" for name in ("main_ce", "stream_ce", "early_exit_ce") if name in m]
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)
