"""`raytrain train [overrides]`: pretrain a model on Ray Train + DeepSpeed, then print a sample from it.
`raytrain train recipe=NAME` runs a staged recipe (`conf/recipe/`) instead, one Ray Train run per stage."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

from raytrain.commands.generate import print_completion, sampling_params
from raytrain.config import plain, to_dataclass
from raytrain.data.text import TextDataConfig, check_paths
from raytrain.data.tokenizer import from_files
from raytrain.infer.engine import Engine
from raytrain.infer.sampling import SamplingParams
from raytrain.models.registry import model_config
from raytrain.train import recipe as recipes
from raytrain.train import trainer
from raytrain.train.config import (ObjectiveConfig, OptimConfig, ScheduleConfig, TrackingConfig, TrainerConfig,
                                   TrainJob)
from raytrain.train.recipe import RecipeConfig

CONFIG_NAME = "train"
HELP = "pretrain a model with Ray Train + DeepSpeed (resumes when the run name exists)"
log = logging.getLogger("raytrain")


def typed_parts(cfg: DictConfig) -> dict[str, Any]:
    """The validated, typed config groups of a training job."""
    parts = {"model": model_config(cfg.model), "data": to_dataclass(TextDataConfig, cfg.data, "data"),
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
    check_paths(parts["data"])  # fail before starting Ray
    params = sampling_params(cfg.sample, "sample") if cfg.sample.prompt else None
    parts["tracking"].dir = os.path.abspath(parts["tracking"].dir)
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, num_cpus=_local_cpus(cfg, parts["trainer"]),
                 include_dashboard=cfg.ray.dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator bars flood worker logs
    files = trainer.prepare_tokenizer(parts["data"], run_dir, parts["model"].vocab_size)
    if stages is not None:
        recipes.check_before_start(stages, files)
        log.info("recipe %s in %s: stages %s; rerun with trainer.run_name=%s to continue", recipe.name, run_dir,
                 ", ".join(s.name for s in stages), name)
        outcome = recipes.run(stages, run_dir, files, plain(cfg))
        if outcome["status"] == "finished" and params is not None:
            _print_sample(os.path.join(outcome["outputs"][stages[-1].name], "model"), cfg.sample.prompt, params)
        return outcome
    job = TrainJob(**parts, run_name=name, tokenizer_files=files, pad_id=from_files(files).pad_token_id,
                   snapshot=plain(cfg))
    result = trainer.launch(job, storage)
    model_dir = os.path.join(result.checkpoint.path, "model")
    log.info("final checkpoint: %s", model_dir)
    if params is not None:
        _print_sample(model_dir, cfg.sample.prompt, params)
    return result


def _local_cpus(cfg: DictConfig, t: TrainerConfig) -> int | None:
    """CPUs of a cluster started here: the workers' plus two for Ray Data, even on a smaller machine."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    needed = int(t.num_workers * t.cpus_per_worker) + 2
    return cfg.ray.num_cpus or max(os.cpu_count() or 1, needed)


def _print_sample(model_dir: str, prompt: str, params: SamplingParams) -> None:
    log.info("sample from %s:", model_dir)
    print_completion(Engine.from_checkpoint(model_dir), prompt, params)
