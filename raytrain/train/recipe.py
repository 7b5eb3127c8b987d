"""Staged training recipes (`conf/recipe/*.yaml`): AFM's prune -> core (distilled) -> continued -> context
lengthening, or a VLM's projector alignment -> fine-tuning (Victor, LLaVA-1.5), as successive Ray Train runs that
each start from an earlier stage's final checkpoint.

A stage overrides the base training config: its length (`steps`, or `tokens` turned into steps), sequence length
and RoPE base (context lengthening), data mixture weights, any optimizer, schedule, trainer, data or model keys,
its task keys (a VLM stage's frozen parts) and its objective (a distillation teacher may be an earlier stage). Each
stage's data and run files come from its task (`tasks.prepare`). It starts from the previous stage (`init`),
from a named earlier stage, from a checkpoint path, or from scratch; with `carry_optimizer` it also takes that
stage's optimizer state. A `kind: prune` stage cuts a larger model (an earlier stage or a path) down to the
stage's model shape (`raytrain/train/prune.py`), learning its masks in one Ray task.

A recipe run lives in `{storage}/{run}/`: the tokenizer all stages share, and one directory per stage,
`{run}.{stage}` (a Ray Train run, or a pruned checkpoint in its `model/`). Re-running the recipe skips stages whose
final checkpoint exists and resumes the first unfinished one. Stage references, parameter shapes, mixtures,
teachers and pruning targets are all checked before the first stage starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from raytrain.checkpoint.hf import CheckpointError, latest_run_checkpoint, read_model_config, save_pretrained
from raytrain.config import ConfigError, RaytrainError, to_dataclass
from raytrain.data.imagetext import skip_counter
from raytrain.data.text import TextDataConfig, build_dataset, check_paths
from raytrain.data.tokenizer import TokenizerFiles, from_files
from raytrain.models.registry import config_dict, model_config, shape_mismatch
from raytrain.train import checkpoint, tasks, trainer
from raytrain.train.config import ObjectiveConfig, OptimConfig, ScheduleConfig, TrainerConfig, TrainJob
from raytrain.train.objectives import next_token_pairs
from raytrain.train.prune import PruneConfig, check_target
from raytrain.train.tasks import LMTaskConfig, VLMTaskConfig

log = logging.getLogger("raytrain.recipe")
PREVIOUS, SCRATCH = "previous", "none"


@dataclass
class StageConfig:
    kind: str = "train"  # train | prune
    steps: int | None = None  # optimizer steps of the stage (train)
    tokens: float | None = None  # or tokens, turned into steps with the stage's batch and sequence length
    seq_len: int | None = None  # data.seq_len (and model.max_seq_len where that is shorter)
    rope_theta: float | None = None  # model.rope_theta
    mixture: dict[str, float] | None = None  # data.mixture: source name -> weight
    init: str = PREVIOUS  # previous | none (random init) | an earlier stage's name | a checkpoint path
    carry_optimizer: bool = False  # also take the optimizer state of `init` (an earlier train stage or step*/)
    objective: dict[str, Any] = field(default_factory=dict)  # objective keys; teacher may name an earlier stage
    task: dict[str, Any] = field(default_factory=dict)  # task keys (e.g. a VLM stage's `freeze`)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of each config group for this stage
    data: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)  # kind=prune: PruneConfig keys; source may name a stage

    def __post_init__(self) -> None:
        if self.kind not in ("train", "prune"):
            raise ValueError(f"kind={self.kind!r}; expected train or prune")
        if self.kind == "train" and (self.steps is None) == (self.tokens is None):
            raise ValueError("a train stage needs exactly one of steps and tokens")


@dataclass
class RecipeConfig:
    name: str = "recipe"
    stages: dict[str, StageConfig] = field(default_factory=dict)  # run in this order
    models: dict[str, Any] = field(default_factory=dict)  # further model configs for stages (${recipe.models.X})
    checkpoints: dict[str, str] = field(default_factory=dict)  # named inputs for stages (${recipe.checkpoints.X})


@dataclass
class Stage:
    """A planned stage: typed config groups with the stage's overrides, and what it starts from."""

    name: str
    kind: str
    run_name: str
    parts: dict[str, Any]
    init: Stage | str | None = None  # an earlier stage, a checkpoint path, or None (scratch)
    teacher: Stage | str | None = None
    prune: PruneConfig | None = None
    source: Stage | str | None = None  # kind=prune: the model to cut down
    carry_optimizer: bool = False


def plan(recipe: RecipeConfig, base: dict[str, Any], run: str) -> list[Stage]:
    """Every stage with its overrides applied and its references resolved and checked (no training)."""
    if not recipe.stages:
        raise ConfigError(f"recipe {recipe.name} has no stages")
    if type(base["task"]) not in (LMTaskConfig, VLMTaskConfig):  # LoRA (an LMTaskConfig too) trains adapters
        raise ConfigError(f"recipe={recipe.name}: task.name={base['task'].name} cannot run as a recipe (recipes "
                          "train language models and VLMs; drop the job= or the recipe=)")
    stages: list[Stage] = []
    for name, cfg in recipe.stages.items():
        key = f"recipe.stages.{name}"
        stage = Stage(name, cfg.kind, f"{run}.{name}", _stage_parts(cfg, base, key),
                      carry_optimizer=cfg.carry_optimizer)
        (_plan_prune if cfg.kind == "prune" else _plan_train)(stage, cfg, stages, key)
        trainer.check_parts(stage.parts, f"{key}: ")
        stages.append(stage)
    vocabularies = {s.parts["model"].vocab_size for s in stages}
    if len(vocabularies) > 1:
        raise ConfigError(f"recipe {recipe.name}: stages use vocabularies of sizes {sorted(vocabularies)}; every "
                          "stage shares one tokenizer")
    return stages


def _plan_prune(stage: Stage, cfg: StageConfig, stages: list[Stage], key: str) -> None:
    """The model to cut down, and a target it can be cut down to."""
    stage.prune = _typed(PruneConfig, {}, cfg.prune, f"{key}.prune")
    if stage.prune.source is None:
        raise ConfigError(f"{key}.prune.source: name the model to prune (an earlier stage or a checkpoint)")
    stage.source = _reference(stage.prune.source, stages, f"{key}.prune.source")
    try:
        check_target(_model_of(stage.source, f"{key}.prune.source"), stage.parts["model"], stage.prune.heads)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _plan_train(stage: Stage, cfg: StageConfig, stages: list[Stage], key: str) -> None:
    """What the stage starts from (shapes that fit, optimizer state that can move) and its teacher."""
    if cfg.init == PREVIOUS and not stages:
        raise ConfigError(f"{key}.init=previous, but it is the first stage; use none or a checkpoint path")
    if cfg.init != SCRATCH:
        stage.init = stages[-1] if cfg.init == PREVIOUS else _reference(cfg.init, stages, f"{key}.init")
        _check_fits(stage, _model_of(stage.init, f"{key}.init"), f"{key}.init")
    if cfg.carry_optimizer:
        _check_carry(stage, key)
    if stage.parts["objective"].name == "distill":
        stage.teacher = _reference(stage.parts["objective"].teacher, stages, f"{key}.objective.teacher")
        _model_of(stage.teacher, f"{key}.objective.teacher")


def _stage_parts(cfg: StageConfig, base: dict[str, Any], key: str) -> dict[str, Any]:
    text_data = isinstance(base["data"], TextDataConfig)
    for name in ("seq_len", "mixture", "tokens"):
        if getattr(cfg, name) is not None and not text_data:
            raise ConfigError(f"{key}.{name}: only language-model stages have it (task.name={base['task'].name})")
    model_changes = dict(cfg.model)
    data_changes = dict(cfg.data)
    if cfg.rope_theta is not None:
        model_changes["rope_theta"] = cfg.rope_theta
    if cfg.seq_len is not None:
        data_changes["seq_len"] = cfg.seq_len
        merged_max = OmegaConf.merge(config_dict(base["model"]), cfg.model).get("max_seq_len")
        model_changes["max_seq_len"] = max(merged_max, cfg.seq_len)
    parts = dict(base)
    parts["model"] = model_config(OmegaConf.merge(config_dict(base["model"]), model_changes), f"{key}.model")
    data = _typed(type(base["data"]), base["data"], data_changes, f"{key}.data")
    if cfg.mixture is not None:  # replaces the base weights (a merge would keep sources the stage leaves out)
        data = _typed(TextDataConfig, dataclasses.replace(data, mixture=None), {"mixture": cfg.mixture},
                      f"{key}.mixture")
    parts["data"] = data
    parts["optim"] = _typed(OptimConfig, base["optim"], cfg.optim, f"{key}.optim")
    parts["schedule"] = _typed(ScheduleConfig, base["schedule"], cfg.schedule, f"{key}.schedule")
    parts["objective"] = _typed(ObjectiveConfig, base["objective"], cfg.objective, f"{key}.objective")
    parts["task"] = _typed(type(base["task"]), base["task"], cfg.task, f"{key}.task")
    t = _typed(TrainerConfig, base["trainer"], cfg.trainer, f"{key}.trainer")
    if cfg.kind == "train":
        if cfg.steps is not None:
            t.max_steps = cfg.steps
        else:
            per_step = t.micro_batch_size * t.grad_accum * t.num_workers * parts["data"].seq_len
            t.max_steps = max(1, math.ceil(cfg.tokens / per_step))
    parts["trainer"] = t
    return parts


def _typed(cls: type, base: Any, changes: dict[str, Any], key: str) -> Any:
    start = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else {}
    return to_dataclass(cls, OmegaConf.merge(start, changes), key)


def _reference(value: str, stages: list[Stage], key: str) -> Stage | str:
    """An earlier stage by name, or a checkpoint path that exists."""
    earlier = {s.name: s for s in stages}
    if value in earlier:
        return earlier[value]
    if not Path(value).exists():
        raise ConfigError(f"{key}={value} is neither an earlier stage ({', '.join(earlier) or 'none'}) nor an "
                          "existing checkpoint")
    return value


def _model_of(ref: Stage | str, key: str) -> Any:
    if isinstance(ref, Stage):
        return ref.parts["model"]
    try:
        return read_model_config(ref)
    except RaytrainError as e:
        raise ConfigError(f"{key}: {e}") from None


def _check_fits(stage: Stage, start: Any, key: str) -> None:
    if (difference := shape_mismatch(start, stage.parts["model"])) is not None:
        raise ConfigError(f"{key}: stage {stage.name} cannot start from {_describe(stage.init)}: {difference}")


def _check_carry(stage: Stage, key: str) -> None:
    """Optimizer state moves only between runs of one world size, ZeRO stage and optimizer."""
    start = stage.init
    if not isinstance(start, Stage) or start.kind != "train":
        if isinstance(start, str):
            return  # a path: checked against its manifest before the stage runs (trainer.check_init_from)
        raise ConfigError(f"{key}.carry_optimizer: {_describe(start)} has no optimizer state")
    ours, theirs = stage.parts, start.parts
    for label, a, b in (("trainer.num_workers", ours["trainer"].num_workers, theirs["trainer"].num_workers),
                        ("trainer.zero_stage", ours["trainer"].zero_stage, theirs["trainer"].zero_stage),
                        ("optim.name", ours["optim"].name, theirs["optim"].name)):
        if a != b:
            raise ConfigError(f"{key}.carry_optimizer: {label} is {a} here but {b} in stage {start.name}")


def _describe(ref: Stage | str | None) -> str:
    return f"stage {ref.name}" if isinstance(ref, Stage) else f"checkpoint {ref}" if ref else "scratch"


# ---- running ---------------------------------------------------------------------------------------------------

def check_before_start(stages: list[Stage], files: TokenizerFiles | None) -> None:
    """Checks that read files: every data source resolves, and teachers given as paths share the tokenizer."""
    for stage in stages:
        if isinstance(stage.parts["data"], TextDataConfig):
            check_paths(stage.parts["data"])
        if isinstance(stage.teacher, str):
            trainer.check_teacher(stage.teacher, files, stage.parts["model"], stage.parts["data"].seq_len,
                                  f"recipe.stages.{stage.name}.objective.teacher")


def output(stage: Stage, recipe_dir: str) -> Path | None:
    """A finished stage's final checkpoint (a training step*/ or a pruned model directory); None if unfinished."""
    run_dir = Path(recipe_dir) / stage.run_name
    if stage.kind == "prune":
        return run_dir / "model" if (run_dir / "model" / "config.json").is_file() else None
    latest = latest_run_checkpoint(run_dir)
    if latest is None:
        return None
    manifest = checkpoint.read_manifest(latest, stage.parts["trainer"].num_workers)
    return latest if manifest["step"] >= stage.parts["trainer"].max_steps else None


def run(stages: list[Stage], recipe_dir: str, files: TokenizerFiles | None,
        snapshot: dict[str, Any]) -> dict[str, Any]:
    """Run the unfinished stages in order; returns each stage's final checkpoint and the recipe's status. `files`
    is the language-model tokenizer all stages share (pruning uses it); other tasks find theirs in `recipe_dir`."""
    outputs: dict[str, str] = {}
    counter = skip_counter(f"raytrain-skips-{Path(recipe_dir).name}")
    for stage in stages:
        done = output(stage, recipe_dir)
        if done is not None:
            log.info("stage %s: finished earlier (%s)", stage.name, done)
            outputs[stage.name] = str(done)
            continue
        log.info("stage %s: %s", stage.name, "pruning" if stage.kind == "prune" else _describe_steps(stage))
        if stage.kind == "prune":
            outputs[stage.name] = str(_prune(stage, recipe_dir, files, outputs))
            continue
        parts = _inputs(stage, outputs)
        prepared = tasks.prepare(parts, recipe_dir, counter)  # the stage's data (its mixture, length) and files
        parts["model"] = prepared.model
        if prepared.init_from is not None:
            parts["trainer"] = dataclasses.replace(parts["trainer"], init_from=prepared.init_from)
        job = TrainJob(**parts, run_name=stage.run_name, tokenizer_files=prepared.files, pad_id=prepared.pad_id,
                       snapshot={**snapshot, "recipe_stage": stage.name})
        result = trainer.launch(job, recipe_dir, prepared.datasets)
        if (result.return_value or {}).get("status") != "finished":
            log.info("stage %s stopped at step %s; rerun the recipe to continue", stage.name,
                     result.return_value.get("step"))
            return {"status": "stopped", "stage": stage.name, "outputs": outputs}
        outputs[stage.name] = result.checkpoint.path
    return {"status": "finished", "outputs": outputs}


def _describe_steps(stage: Stage) -> str:
    seq_len = getattr(stage.parts["data"], "seq_len", None)
    return f"{stage.parts['trainer'].max_steps} steps" + (f" at sequence length {seq_len}" if seq_len else "")


def _path(ref: Stage | str | None, outputs: dict[str, str], key: str) -> str | None:
    if ref is None or isinstance(ref, str):
        return ref
    if ref.name not in outputs:
        raise CheckpointError(f"{key}: stage {ref.name} has no final checkpoint")
    return outputs[ref.name]


def _inputs(stage: Stage, outputs: dict[str, str]) -> dict[str, Any]:
    """The stage's config groups with the checkpoints it starts from (and its teacher) as paths."""
    key = f"recipe.stages.{stage.name}"
    parts = dict(stage.parts)
    parts["trainer"] = dataclasses.replace(parts["trainer"], init_from=_path(stage.init, outputs, f"{key}.init"),
                                           init_optimizer=stage.carry_optimizer)
    if stage.teacher is not None:
        parts["objective"] = dataclasses.replace(parts["objective"],
                                                 teacher=_path(stage.teacher, outputs, f"{key}.objective.teacher"))
    return parts


def _prune(stage: Stage, recipe_dir: str, files: TokenizerFiles, outputs: dict[str, str]) -> Path:
    """Run the pruning stage as one Ray task (on a GPU when the trainer uses them), which writes the checkpoint."""
    import ray

    cfg = dataclasses.replace(stage.prune, source=_path(stage.source, outputs,
                                                        f"recipe.stages.{stage.name}.prune.source"))
    t = stage.parts["trainer"]
    task = ray.remote(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0)(prune_checkpoint)
    out = Path(recipe_dir) / stage.run_name / "model"
    return ray.get(task.remote(cfg, stage.parts["model"], stage.parts["data"], files, out, t.use_gpu))


def prune_checkpoint(cfg: PruneConfig, target: Any, data: TextDataConfig, files: TokenizerFiles, out: Path,
                     use_gpu: bool) -> Path:
    """Cut `cfg.source` down to `target` (learning the masks on `data` for soft_topk) and save it at `out`."""
    import torch

    from raytrain.checkpoint.hf import load_pretrained
    from raytrain.train.prune import learn_masks, magnitude_keep, prune_state

    import ray.data

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if use_gpu else "cpu")
    source = load_pretrained(cfg.source, device=device).model
    if cfg.method == "magnitude":
        ffn, groups = magnitude_keep(source, target, cfg.heads)
    else:
        batches = _token_batches(build_dataset(data, files), cfg.micro_batch_size, from_files(files).pad_token_id,
                                 device)

        def report(step: int, loss: float, temperature: float) -> None:
            if step % 10 == 0 or step == cfg.steps:
                log.info("prune step %d/%d | masked loss %.4f | temperature %.3f", step, cfg.steps, loss,
                         temperature)

        ffn, groups = learn_masks(source, target, batches, cfg, report).keep()
    meta = {"pruned_from": str(cfg.source), "method": cfg.method, "heads": cfg.heads, "mask_steps": cfg.steps,
            "model": target.name}
    return save_pretrained(out, target, prune_state(source, ffn, groups), files, meta)


def _token_batches(dataset: Any, batch_size: int, pad_id: int, device: Any) -> Iterator[tuple[Any, Any]]:
    """(inputs, labels) batches of a Ray Dataset of token rows, epoch after epoch."""
    import torch

    while True:
        for batch in dataset.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.int64,
                                                device=device):
            yield next_token_pairs(batch["tokens"], pad_id)
