"""The training driver: prepares the run (storage, run name, tokenizer, dataset) and runs it as a Ray Train
`TorchTrainer` whose workers execute `loop.train_loop` under DeepSpeed.

A run lives in `{storage_path}/{run_name}`; starting a run whose directory holds checkpoints resumes it from the
latest one (Ray Train V2 semantics), after checking that model, tokenizer and world size still match.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from raytrain.checkpoint.hf import latest_run_checkpoint, read_model_config
from raytrain.config import ConfigError, RaytrainError
from raytrain.data import text
from raytrain.data.tokenizer import TokenizerFiles, from_files, load_tokenizer, to_files, train_bpe
from raytrain.train import checkpoint
from raytrain.train.config import TrainJob, TrainerConfig

log = logging.getLogger("raytrain.train")
PASSED_ENV = re.compile(r"^(WANDB_|HF_|NCCL_|TORCH_|DS_|CUDA_LAUNCH_BLOCKING$)")


class TrainingError(RaytrainError):
    pass


def storage_root(path: str) -> str:
    """An absolute local directory (created and probed for writing) or a URI (s3://, gs://) kept as is."""
    if "://" in path:
        return path
    root = Path(path).expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"trainer.storage_path={path} is not a writable directory ({e.strerror})") from None
    return str(root)


def run_name(t: TrainerConfig, model_name: str) -> str:
    name = t.run_name or f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"trainer.run_name={name!r}: use letters, digits, '.', '_' and '-'")
    return name


def prepare_tokenizer(data: text.TextDataConfig, run_dir: str, vocab_size: int) -> TokenizerFiles:
    """The run's tokenizer: `data.tokenizer` if set, else the one saved in the run directory (resume), else a BPE
    trained now on the corpus and saved there."""
    if data.tokenizer:
        files = to_files(load_tokenizer(data.tokenizer))
    else:
        saved = read_run_files(run_dir, "tokenizer")
        if saved:
            files = saved
        else:
            log.info("training a %d-token byte-level BPE on the corpus", data.vocab_size)
            files = to_files(train_bpe(text.tokenizer_texts(data), data.vocab_size))
            write_run_files(run_dir, "tokenizer", files)
    size = len(from_files(files))
    if size > vocab_size:
        raise ConfigError(f"the tokenizer has {size} tokens but model.vocab_size={vocab_size}; set "
                          f"data.vocab_size <= model.vocab_size or use a model with a larger vocabulary")
    return files


def read_run_files(run_dir: str, sub: str) -> TokenizerFiles:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run_dir)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/{sub}", allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.base_name] = f.read().decode()
    return out


def write_run_files(run_dir: str, sub: str, files: TokenizerFiles) -> None:
    """Write into a temporary sibling, then move it into place, so a crash never leaves half a tokenizer."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run_dir)
    tmp = f"{root}/.{sub}-{uuid.uuid4().hex}"
    fs.create_dir(tmp, recursive=True)
    for name, content in files.items():
        with fs.open_output_stream(f"{tmp}/{name}") as f:
            f.write(content.encode())
    fs.move(tmp, f"{root}/{sub}")


def check_resume(run_dir: str, job: TrainJob) -> int | None:
    """The step a local run would resume from, after checking it fits this job; None for a new run."""
    if "://" in run_dir:
        return None  # remote storage: the workers check on load
    latest = latest_run_checkpoint(Path(run_dir))
    if latest is None:
        return None
    manifest = checkpoint.read_manifest(latest, job.trainer.num_workers)
    checkpoint.check_compatible(manifest, job, str(latest))
    return manifest["step"]


def check_init_from(t: TrainerConfig, model: Any) -> None:
    """`trainer.init_from` must hold the configured model (checked before any worker starts)."""
    if t.init_from:
        try:
            found = read_model_config(t.init_from)
        except RaytrainError as e:
            raise ConfigError(f"trainer.init_from: {e}") from None
        if found != model:
            raise ConfigError(f"trainer.init_from={t.init_from} holds model {found.name} with another shape or "
                              f"config than model={model.name}")


def fit(job: TrainJob, storage: str, datasets: dict[str, Any]) -> Any:
    """Run training; returns Ray Train's `Result` (its checkpoint is the final one, with the export in model/)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytrain.train.loop import train_loop

    t = job.trainer
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same rank in the same order on every run and resume
    trainer = TorchTrainer(
        train_loop, train_loop_config=job, datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest, enable_shard_locality=False),
        torch_config=TorchConfig(timeout_s=t.dist_timeout_s),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=job.run_name, storage_path=storage, failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if PASSED_ENV.match(k)}}))
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; show the root cause in one line
        raise TrainingError(f"training failed: {root_cause(e)}") from None
    outcome = result.return_value or {}
    if outcome.get("status") == "non_finite_loss":
        last = result.checkpoint.path if result.checkpoint else "none"
        raise TrainingError(f"loss became NaN/inf at step {outcome['step']}; nothing was saved after it (last good "
                            f"checkpoint: {last}). Lower optim.lr or enable trainer.grad_clip")
    if result.checkpoint is None:
        raise TrainingError("training ended without a checkpoint")
    return result


def root_cause(error: BaseException) -> str:
    """The innermost worker exception of a Ray Train failure, as `Type: message` on one line."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        error = failures[min(failures)]
    while getattr(error, "cause", None) is not None or error.__cause__ is not None:
        error = getattr(error, "cause", None) or error.__cause__
    if isinstance(error, RaytrainError):
        return str(error)
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
