"""Training checkpoints: DeepSpeed state for exact resume, plus a Hugging Face export for inference.

One checkpoint directory, merged by Ray Train from every rank's local directory:

    ds/<tag>/...         DeepSpeed engine, optimizer and scheduler state (each rank writes its own shard files)
    rng/rank00000.pt     each rank's RNG state
    model/               Hugging Face layout weights + tokenizer + raytrain.json (rank 0)
    raytrain.json        manifest (rank 0): step, world size, ZeRO stage, model config, tokenizer fingerprint

Every rank calls `save` and `ray.train.report` (both are collective). Ray Train registers a checkpoint only once
every rank's upload finished, so a crash mid-save leaves no registered checkpoint; `read_manifest` also refuses a
directory whose rank files are missing. Names are unique per step, so a good checkpoint is never overwritten.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytrain.checkpoint.hf import CheckpointError, latest_run_checkpoint, model_state
from raytrain.data.tokenizer import fingerprint
from raytrain.models.registry import config_dict
from raytrain.train.config import TrainJob
from raytrain.train.engine import gathered

MANIFEST = "raytrain.json"


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    epoch_batches: int = 0  # micro-batches each rank consumed in the current epoch
    tokens: int = 0  # tokens trained on, all ranks together
    skipped_steps: int = 0  # optimizer steps that changed nothing (gradient norm too large or not finite)


def checkpoint_name(step: int) -> str:
    return f"step{step:09d}"


def save(engine: Any, model: torch.nn.Module, job: TrainJob, progress: Progress, rank: int, world: int,
         zero3: bool, work: Any) -> str:
    """Write this rank's part of the checkpoint for `progress.step` into a fresh local directory; the task's worker
    `work` (`tasks.Worker`) chooses what `model/` holds (e.g. EMA weights, an adapter; by default the model's
    weights) and whether frozen parameters stay out of the DeepSpeed state."""
    d = Path(tempfile.mkdtemp(prefix="raytrain-ckpt-"))
    tag = checkpoint_name(progress.step)
    engine.save_checkpoint(str(d / "ds"), tag=tag, client_state={"progress": asdict(progress)},
                           exclude_frozen_parameters=work.frozen_base)
    (d / "rng").mkdir()
    torch.save(_rng_state(), d / "rng" / f"rank{rank:05d}.pt")
    state = work.export_state()
    if state is None:
        state = _gather_state(model, rank, zero3)
    if rank == 0:
        meta = {"run": job.run_name, "step": progress.step, "tokens": progress.tokens, "model": job.model.name,
                "seq_len": getattr(job.data, "seq_len", None),  # None for image tasks
                "skipped_steps": progress.skipped_steps, "init_from": job.trainer.init_from,
                "teacher": job.objective.teacher}
        work.write_export(d / "model", state, meta)
        manifest = {"tag": tag, "step": progress.step, "world_size": world,
                    "zero_stage": job.trainer.zero_stage, "optim": job.optim.name, "model": config_dict(job.model),
                    "tokenizer": fingerprint(job.tokenizer_files), "run": job.run_name}
        (d / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return str(d)


def _gather_state(model: torch.nn.Module, rank: int, zero3: bool) -> dict[str, torch.Tensor]:
    """Whole weights on rank 0 (one tensor at a time under ZeRO-3, so no rank ever holds the full model twice)."""
    state = {}
    for name, param in model_state(model).items():
        with gathered([param] if isinstance(param, torch.nn.Parameter) else [], zero3):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    return state


def read_manifest(directory: str | Path, world: int) -> dict[str, Any]:
    d = Path(directory)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {d}: missing or unreadable {MANIFEST} ({e})") from None
    if manifest["world_size"] != world:
        raise CheckpointError(
            f"checkpoint {d} was written by {manifest['world_size']} workers; this run has {world}. ZeRO shards "
            "do not reshard: keep trainer.num_workers, or start a new run with trainer.init_from=<its model/ dir>")
    missing = [r for r in range(world) if not (d / "rng" / f"rank{r:05d}.pt").is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {d} is incomplete: no state for ranks {missing}")
    return manifest


def check_compatible(manifest: dict[str, Any], job: TrainJob, where: str) -> None:
    """A resumed run must train the same model with the same tokenizer, optimizer and ZeRO stage."""
    if manifest["model"] != config_dict(job.model):
        raise CheckpointError(f"run {job.run_name} was started with model {manifest['model'].get('name')} of "
                              f"another shape or config ({where}); pick a new trainer.run_name for this model")
    if manifest["tokenizer"] != fingerprint(job.tokenizer_files):
        raise CheckpointError(f"run {job.run_name} was trained with another tokenizer ({where}); "
                              "pick a new trainer.run_name")
    if manifest.get("optim", job.optim.name) != job.optim.name:
        raise CheckpointError(f"run {job.run_name} was trained with optim.name={manifest['optim']} ({where}); its "
                              f"optimizer state cannot resume optim.name={job.optim.name}")
    if manifest["zero_stage"] != job.trainer.zero_stage:
        raise CheckpointError(f"run {job.run_name} used ZeRO stage {manifest['zero_stage']} ({where}); "
                              f"trainer.zero_stage={job.trainer.zero_stage} cannot load its shards")


def restore(engine: Any, directory: str, job: TrainJob, rank: int, world: int, frozen_base: bool = False) -> Progress:
    """`frozen_base`: the checkpoint holds only the trainable parameters (the rest came from the base)."""
    manifest = read_manifest(directory, world)
    check_compatible(manifest, job, directory)
    path, client = engine.load_checkpoint(str(Path(directory) / "ds"), tag=manifest["tag"],
                                          load_module_strict=not frozen_base)
    if path is None:
        raise CheckpointError(f"checkpoint {directory}: DeepSpeed found no state under ds/{manifest['tag']}")
    _set_rng_state(torch.load(Path(directory) / "rng" / f"rank{rank:05d}.pt", weights_only=False))
    return Progress(**client["progress"])


def training_checkpoint(path: str | Path) -> Path:
    """A training checkpoint directory (`step*/` with `ds/` and a manifest): the path itself, or a run's latest."""
    latest = latest_run_checkpoint(Path(path))
    return latest if latest is not None else Path(path)


def load_optimizer(engine: Any, optimizer: torch.optim.Optimizer, path: str, world: int) -> None:
    """Start from another run's training checkpoint: its weights and optimizer state (moments, step counts), but
    this run's hyperparameters (LR, decay, betas) and a fresh schedule and data position. The driver checked that
    world size, ZeRO stage, optimizer and parameter shapes match."""
    directory = training_checkpoint(path)
    manifest = read_manifest(directory, world)
    hyperparameters = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    path, _ = engine.load_checkpoint(str(Path(directory) / "ds"), tag=manifest["tag"], load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"checkpoint {directory}: DeepSpeed found no state under ds/{manifest['tag']}")
    for group, saved in zip(optimizer.param_groups, hyperparameters):  # loading restored the old run's values
        group.update(saved)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
