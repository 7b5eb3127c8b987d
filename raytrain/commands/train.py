"""`raytrain train [overrides]`: pretrain a model on Ray Train + DeepSpeed, then print a sample from it."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from raytrain.commands.generate import print_stream, sampling_params
from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.data.text import TextDataConfig, resolve_files
from raytrain.data.tokenizer import from_files
from raytrain.infer.sampling import SamplingParams
from raytrain.models.registry import model_config
from raytrain.train import trainer
from raytrain.train.config import OptimConfig, ScheduleConfig, TrackingConfig, TrainerConfig, TrainJob

CONFIG_NAME = "train"
HELP = "pretrain a model with Ray Train + DeepSpeed (resumes when the run name exists)"
log = logging.getLogger("raytrain")


def typed_parts(cfg: DictConfig) -> dict[str, Any]:
    """The validated, typed config groups of a training job."""
    parts = {"model": model_config(cfg.model), "data": to_dataclass(TextDataConfig, cfg.data, "data"),
             "trainer": to_dataclass(TrainerConfig, cfg.trainer, "trainer"),
             "optim": to_dataclass(OptimConfig, cfg.optim, "optim"),
             "schedule": to_dataclass(ScheduleConfig, cfg.schedule, "schedule"),
             "tracking": to_dataclass(TrackingConfig, cfg.tracking, "tracking")}
    if parts["data"].seq_len > parts["model"].max_seq_len:
        raise ConfigError(f"data.seq_len={parts['data'].seq_len} exceeds model.max_seq_len="
                          f"{parts['model'].max_seq_len}")
    return parts


def run(cfg: DictConfig) -> Any:
    """Returns Ray Train's `Result` of the run."""
    import ray
    import ray.data

    parts = typed_parts(cfg)
    name = trainer.run_name(parts["trainer"], parts["model"].name)
    storage = trainer.storage_root(parts["trainer"].storage_path)
    run_dir = os.path.join(storage, name)
    trainer.check_init_from(parts["trainer"], parts["model"])
    if parts["data"].path is not None:
        resolve_files(parts["data"].path, parts["data"].format)  # fail before starting Ray
    params = sampling_params(cfg.sample, "sample") if cfg.sample.prompt else None
    parts["tracking"].dir = os.path.abspath(parts["tracking"].dir)
    if not ray.is_initialized():
        ray.init(address=_ray_address(cfg), num_cpus=_local_cpus(cfg, parts["trainer"]),
                 include_dashboard=cfg.ray.dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator bars flood worker logs
    files = trainer.prepare_tokenizer(parts["data"], run_dir, parts["model"].vocab_size)
    job = TrainJob(**parts, run_name=name, tokenizer_files=files, pad_id=from_files(files).pad_token_id,
                   snapshot=plain(cfg))
    resume_step = trainer.check_resume(run_dir, job)
    log.info("run %s in %s (%s); rerun with trainer.run_name=%s to resume", name, run_dir,
             f"resuming at step {resume_step}" if resume_step is not None else "new", name)
    result = trainer.fit(job, storage)
    model_dir = os.path.join(result.checkpoint.path, "model")
    log.info("final checkpoint: %s", model_dir)
    if params is not None:
        _print_sample(model_dir, cfg.sample.prompt, params)
    return result


def _ray_address(cfg: DictConfig) -> str | None:
    """`ray.address`, else RAY_ADDRESS (set inside Ray jobs), else a new local cluster, never whichever cluster a
    `ray start` on this machine registered last (`ray.address=auto` joins that one)."""
    return cfg.ray.address if cfg.ray.address or os.environ.get("RAY_ADDRESS") else "local"


def _local_cpus(cfg: DictConfig, t: TrainerConfig) -> int | None:
    """CPUs of a cluster started here: the workers' plus two for Ray Data, even on a smaller machine."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    needed = int(t.num_workers * t.cpus_per_worker) + 2
    return cfg.ray.num_cpus or max(os.cpu_count() or 1, needed)


def _print_sample(model_dir: str, prompt: str, params: SamplingParams) -> None:
    from raytrain.checkpoint.hf import load_pretrained
    from raytrain.infer.generate import stream_text

    pretrained = load_pretrained(model_dir)
    log.info("sample from %s:", model_dir)
    print_stream(stream_text(pretrained.model, pretrained.tokenizer, prompt, params), prompt)
