"""`raytrain train [overrides]`: train a model on Ray Train + DeepSpeed (the task: language modelling by default,
`job=catlip`, `job=clip`, `job=probe`), then print a sample (language models) or the skipped-record counts."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from raytrain.commands.generate import print_completion, sampling_params
from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.data.imagetext import skip_counter
from raytrain.data.text import TextDataConfig, resolve_files
from raytrain.infer.engine import Engine
from raytrain.infer.sampling import SamplingParams
from raytrain.models.registry import model_config
from raytrain.train import tasks, trainer
from raytrain.train.config import OptimConfig, ScheduleConfig, TrackingConfig, TrainerConfig, TrainJob

CONFIG_NAME = "train"
HELP = "pretrain a model with Ray Train + DeepSpeed (resumes when the run name exists)"
log = logging.getLogger("raytrain")


def typed_parts(cfg: DictConfig) -> dict[str, Any]:
    """The validated, typed config groups of a training job."""
    task, model = tasks.task_config(plain(cfg.get("task"))), model_config(cfg.model)
    if isinstance(task, tasks.LMTaskConfig) and not hasattr(model, "max_seq_len"):
        raise ConfigError(f"model={model.name} is not a language model; pick a job for it (job=catlip, job=clip, "
                          "job=probe)")
    parts = {"task": task, "model": model, "data": tasks.data_config(task, cfg.data),
             "trainer": to_dataclass(TrainerConfig, cfg.trainer, "trainer"),
             "optim": to_dataclass(OptimConfig, cfg.optim, "optim"),
             "schedule": to_dataclass(ScheduleConfig, cfg.schedule, "schedule"),
             "tracking": to_dataclass(TrackingConfig, cfg.tracking, "tracking")}
    if isinstance(task, tasks.LMTaskConfig) and parts["data"].seq_len > parts["model"].max_seq_len:
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
    if parts["data"].path is not None and isinstance(parts["task"], tasks.LMTaskConfig):
        resolve_files(parts["data"].path, parts["data"].format)  # fail before starting Ray
    language_model = isinstance(parts["task"], tasks.LMTaskConfig)
    params = sampling_params(cfg.sample, "sample") if cfg.sample.prompt and language_model else None
    parts["tracking"].dir = os.path.abspath(parts["tracking"].dir)
    if not ray.is_initialized():
        ray.init(address=_ray_address(cfg), num_cpus=_local_cpus(cfg, parts["trainer"]),
                 include_dashboard=cfg.ray.dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator bars flood worker logs
    counter = skip_counter(f"raytrain-skips-{name}")
    prepared = tasks.prepare(parts, run_dir, counter)
    parts["model"] = prepared.model
    job = TrainJob(**parts, run_name=name, tokenizer_files=prepared.files, pad_id=prepared.pad_id,
                   snapshot=plain(cfg))
    resume_step = trainer.check_resume(run_dir, job)
    log.info("run %s in %s (%s); rerun with trainer.run_name=%s to resume", name, run_dir,
             f"resuming at step {resume_step}" if resume_step is not None else "new", name)
    result = trainer.fit(job, storage, prepared.datasets)
    model_dir = os.path.join(result.checkpoint.path, "model")
    log.info("final checkpoint: %s", model_dir)
    if skipped := ray.get(counter.get.remote()):
        log.warning("skipped or unlabelled records: %s", skipped)
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
    log.info("sample from %s:", model_dir)
    print_completion(Engine.from_checkpoint(model_dir), prompt, params)
