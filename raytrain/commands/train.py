"""`raytrain train [overrides]`: train a model on Ray Train + DeepSpeed (the task: language modelling by default,
`job=lora` (adapters on a frozen base), `job=catlip`, `job=clip`, `job=probe`, `job=specstream`), then print a sample
(language models) or the skipped-record counts.
`raytrain train recipe=NAME` runs a staged recipe (`conf/recipe/`) instead, one Ray Train run per stage: a
language-model recipe, or `job=vlm`, whose two VLM stages (projector alignment, then fine-tuning) are a recipe."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from omegaconf import DictConfig

from raytrain.commands.generate import print_completion, sampling_params
from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.data.imagetext import skip_counter
from raytrain.data.text import check_paths
from raytrain.infer.engine import Engine
from raytrain.infer.sampling import SamplingParams
from raytrain.models.registry import model_config
from raytrain.train import recipe as recipes
from raytrain.train import tasks, trainer
from raytrain.train.config import (ObjectiveConfig, OptimConfig, ScheduleConfig, TrackingConfig, TrainerConfig,
                                   TrainJob)
from raytrain.train.recipe import RecipeConfig

CONFIG_NAME = "train"
HELP = "pretrain a model with Ray Train + DeepSpeed (resumes when the run name exists)"
log = logging.getLogger("raytrain")


def typed_parts(cfg: DictConfig) -> dict[str, Any]:
    """The validated, typed config groups of a training job."""
    task = tasks.task_config(plain(cfg.get("task")))
    model = tasks.fit_model(task, model_config(cfg.model))
    if isinstance(task, tasks.LMTaskConfig) and not hasattr(model, "max_seq_len"):
        raise ConfigError(f"model={model.name} is not a language model; pick a job for it (job=catlip, job=clip, "
                          "job=probe)")
    parts = {"task": task, "model": model, "data": tasks.data_config(task, cfg.data),
             "trainer": to_dataclass(TrainerConfig, cfg.trainer, "trainer"),
             "optim": to_dataclass(OptimConfig, cfg.optim, "optim"),
             "schedule": to_dataclass(ScheduleConfig, cfg.schedule, "schedule"),
             "objective": to_dataclass(ObjectiveConfig, cfg.objective, "objective"),
             "tracking": to_dataclass(TrackingConfig, cfg.tracking, "tracking")}
    trainer.check_parts(parts)
    return parts


def run(cfg: DictConfig) -> Any:
    """One run (returns Ray Train's `Result`) or, with `recipe=NAME`, its stages (returns the recipe's outcome)."""
    import ray
    import ray.data

    parts = typed_parts(cfg)
    recipe = to_dataclass(RecipeConfig, cfg.recipe, "recipe") if cfg.get("recipe") is not None else None
    name = trainer.run_name(parts["trainer"], recipe.name if recipe else parts["model"].name)
    storage = trainer.storage_root(parts["trainer"].storage_path)
    run_dir = os.path.join(storage, name)
    stages = recipes.plan(recipe, parts, name) if recipe else None
    if recipe is None:
        trainer.check_init_from(parts["trainer"], parts["model"], parts["optim"])
    language_model = isinstance(parts["task"], tasks.LMTaskConfig)
    if language_model:
        check_paths(parts["data"])  # fail before starting Ray
    params = sampling_params(cfg.sample, "sample") if cfg.sample.prompt and language_model else None
    parts["tracking"].dir = os.path.abspath(parts["tracking"].dir)
    if not ray.is_initialized():
        ray.init(address=_ray_address(cfg), num_cpus=_local_cpus(cfg, parts["trainer"]),
                 include_dashboard=cfg.ray.dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator bars flood worker logs
    if stages is not None:
        files = trainer.prepare_tokenizer(parts["data"], run_dir, parts["model"].vocab_size) if language_model \
            else None
        recipes.check_before_start(stages, files)
        log.info("recipe %s in %s: stages %s; rerun with trainer.run_name=%s to continue", recipe.name, run_dir,
                 ", ".join(s.name for s in stages), name)
        outcome = recipes.run(stages, run_dir, files, plain(cfg))
        if outcome["status"] == "finished" and params is not None:
            _print_sample(os.path.join(outcome["outputs"][stages[-1].name], "model"), cfg.sample.prompt, params)
        return outcome
    counter = skip_counter(f"raytrain-skips-{name}")
    prepared = tasks.prepare(parts, run_dir, counter)
    parts["model"] = prepared.model
    if prepared.init_from is not None:
        parts["trainer"] = dataclasses.replace(parts["trainer"], init_from=prepared.init_from)
    job = TrainJob(**parts, run_name=name, tokenizer_files=prepared.files, pad_id=prepared.pad_id,
                   snapshot=plain(cfg))
    result = trainer.launch(job, storage, prepared.datasets)
    model_dir = os.path.join(result.checkpoint.path, "model")
    log.info("final checkpoint: %s", model_dir)
    if skipped := ray.get(counter.get.remote()):
        log.warning("skipped or unlabelled records: %s", skipped)
    if params is not None:
        _print_sample(model_dir, cfg.sample.prompt, params, job.task)
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


def _print_sample(model_dir: str, prompt: str, params: SamplingParams, task: Any = None) -> None:
    """A completion from the final checkpoint (a LoRA run's `model/` is an adapter of its base)."""
    log.info("sample from %s:", model_dir)
    if isinstance(task, tasks.LoRATaskConfig):
        engine = Engine.from_checkpoint(task.base, adapter=model_dir)
    else:
        engine = Engine.from_checkpoint(model_dir)
    print_completion(engine, prompt, params)
