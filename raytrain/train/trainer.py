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

from raytrain.checkpoint.hf import latest_run_checkpoint, read_model_config, resolve_checkpoint
from raytrain.config import ConfigError, RaytrainError
from raytrain.data import text
from raytrain.data.tokenizer import TokenizerFiles, fingerprint, from_files, load_tokenizer, to_files, train_bpe
from raytrain.models.registry import shape_mismatch
from raytrain.models.vlm import VLMConfig
from raytrain.train import checkpoint
from raytrain.train.config import OptimConfig, TrainJob, TrainerConfig
from raytrain.train.optim import check_optim
from raytrain.train.tasks import LMTaskConfig, VLMTaskConfig

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


def check_parts(parts: dict[str, Any], where: str = "") -> None:
    """The typed config groups of a training job fit together (nothing read from disk); `where` prefixes errors."""
    task, data, model, optim = parts["task"], parts["data"], parts["model"], parts["optim"]
    language_model = isinstance(task, LMTaskConfig)
    try:
        if language_model and data.seq_len > model.max_seq_len:
            raise ConfigError(f"data.seq_len={data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
        if isinstance(task, VLMTaskConfig) != isinstance(model, VLMConfig):
            raise ConfigError(f"task.name={task.name} cannot train model={model.name}: task=vlm (job=vlm) trains the "
                              "vision-language models (family vlm), and only those")
        if not language_model and parts["objective"].name != "lm":
            raise ConfigError(f"objective.name={parts['objective'].name} is a language-modelling objective; "
                              f"task.name={task.name} trains with its own loss (leave objective=lm)")
        check_optim(optim)
        if optim.name == "adastar" and parts["trainer"].zero_stage == 0:
            raise ConfigError("optim.name=adastar needs trainer.zero_stage >= 1 (its step skipping reads the global "
                              "gradient norm DeepSpeed's ZeRO optimizers compute)")
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def check_teacher(path: str, files: TokenizerFiles, model: Any, seq_len: int, key: str) -> None:
    """A distillation teacher: a readable checkpoint with the run's tokenizer and vocabulary, long enough RoPE."""
    try:
        directory = resolve_checkpoint(path)
        teacher = read_model_config(directory)
    except RaytrainError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"{key}={path} holds no tokenizer.json, so it cannot be checked to share the run's "
                          "tokenizer")
    if fingerprint({"tokenizer.json": (directory / "tokenizer.json").read_text()}) != fingerprint(files):
        raise ConfigError(f"{key}={path} uses another tokenizer than this run; distillation compares "
                          "distributions over the same vocabulary, so the teacher must share the run's tokenizer")
    if teacher.rows != model.rows:
        raise ConfigError(f"{key}={path} has {teacher.rows} vocabulary rows, model={model.name} {model.rows}")
    if teacher.max_positions < seq_len:
        raise ConfigError(f"{key}={path} has RoPE tables for {teacher.max_positions} positions, fewer than "
                          f"data.seq_len={seq_len}")


def launch(job: TrainJob, storage: str, datasets: dict[str, Any]) -> Any:
    """Check the checkpoints a job starts from, then run it on `datasets` (resuming `{storage}/{run_name}` if it
    exists)."""
    check_init_from(job.trainer, job.model, job.optim)
    if job.objective.name == "distill":
        check_teacher(job.objective.teacher, job.tokenizer_files, job.model, job.data.seq_len, "objective.teacher")
    run_dir = os.path.join(storage, job.run_name)
    resume_step = check_resume(run_dir, job)
    log.info("run %s in %s (%s); rerun with trainer.run_name=%s to resume", job.run_name, run_dir,
             f"resuming at step {resume_step}" if resume_step is not None else "new", job.run_name)
    return fit(job, storage, datasets)


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


def check_init_from(t: TrainerConfig, model: Any, optim: OptimConfig) -> None:
    """`trainer.init_from` must hold parameters of the configured model's shapes; with `trainer.init_optimizer` it
    must be a training checkpoint written by as many workers, the same ZeRO stage and optimizer (checked before any
    worker starts)."""
    if not t.init_from:
        return
    try:
        found = read_model_config(t.init_from)
    except RaytrainError as e:
        raise ConfigError(f"trainer.init_from: {e}") from None
    if (difference := shape_mismatch(found, model)) is not None:
        raise ConfigError(f"trainer.init_from={t.init_from} holds model {found.name}, whose parameters do not fit "
                          f"model={model.name}: {difference}")
    if t.init_optimizer:
        directory = checkpoint.training_checkpoint(t.init_from)
        try:
            manifest = checkpoint.read_manifest(directory, t.num_workers)
        except RaytrainError as e:
            raise ConfigError(f"trainer.init_optimizer: {e}") from None
        for key, ours in (("zero_stage", t.zero_stage), ("optim", optim.name)):
            if manifest.get(key) != ours:
                raise ConfigError(f"trainer.init_optimizer: {directory} has {key}={manifest.get(key)}, this run "
                                  f"{ours}; its optimizer state cannot be loaded")


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
