"""Typed configs of a training job, one dataclass per Hydra group (`conf/trainer`, `conf/optim`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raytrain.data.tokenizer import TokenizerFiles


@dataclass
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    micro_batch_size: int = 8  # sequences per worker per forward
    grad_accum: int = 1
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    max_steps: int = 200  # optimizer steps of the whole run (also the schedule length unless set there)
    stop_after_steps: int | None = None  # end this invocation after this step; rerun the run name to continue
    checkpoint_every: int = 100
    keep_checkpoints: int | None = 3
    max_failures: int = 0  # Ray Train restarts from the last checkpoint this many times
    log_every: int = 10
    seed: int = 0
    z_loss: float = 1e-4
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder block
    peak_tflops: float | None = None  # per-device peak for MFU; None = 989 (H100/H200 bf16 dense) on GPU, no MFU on CPU
    storage_path: str = "outputs/runs"
    run_name: str | None = None  # None = a fresh "<model>-<timestamp>"; an existing name resumes that run
    init_from: str | None = None  # checkpoint whose weights start the run (same shapes; config from model=)
    init_optimizer: bool = False  # also take the optimizer state of init_from, a training checkpoint (step*/)
    dist_timeout_s: int = 1800

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage}; expected 0, 1, 2 or 3")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r}; expected auto, bf16 or fp32")
        for key in ("num_workers", "micro_batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adastar
    lr: float = 5.3e-3  # peak LR
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8  # adamw: added to sqrt(v); adastar: added to g^2 inside the square root
    weight_decay: float = 0.1  # adamw: multiplied by the LR (torch style); adastar: by the schedule only (decoupled)
    decay_embeddings: bool = True
    decay_norms: bool = False  # weight decay on 1-D tensors (norm gains)
    update_clip: float = 1.0  # adastar: per-tensor clip of the raw update (0 = off)
    update_clip_by: str = "rms"  # adastar: rms (axlearn) | norm (the paper's wording)
    mup_base_dim: int | None = None  # adastar: block matrices' updates x min(mup_base_dim / d_model, 1); None = off
    skip_grad_norm: float | None = None  # adastar: a step whose global gradient norm is not below this is skipped

    def __post_init__(self) -> None:
        if self.update_clip_by not in ("rms", "norm"):
            raise ValueError(f"update_clip_by={self.update_clip_by!r}; expected rms or norm")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int = 5000
    init_lr: float = 1e-6  # warmup starts here
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    total_steps: int | None = None  # None = trainer.max_steps
    convention: str = "corenet"  # corenet (steps from 0, period total - warmup + 1) | axlearn (from 1, exact floor)

    def __post_init__(self) -> None:
        if self.convention not in ("corenet", "axlearn"):
            raise ValueError(f"convention={self.convention!r}; expected corenet or axlearn")


@dataclass
class ObjectiveConfig:
    name: str = "lm"  # lm (cross-entropy + z-loss) | distill (AFM's teacher/label mix)
    teacher: str | None = None  # distill: teacher checkpoint (same tokenizer); in a recipe, also an earlier stage
    target: str = "top1"  # distill: top1 (the teacher's argmax, AFM) | kl (the teacher's full distribution)
    teacher_weight: float = 0.9  # distill: the teacher's share of the target; the label gets the rest

    def __post_init__(self) -> None:
        if self.name not in ("lm", "distill"):
            raise ValueError(f"name={self.name!r}; expected lm or distill")
        if self.target not in ("top1", "kl"):
            raise ValueError(f"target={self.target!r}; expected top1 or kl")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise ValueError(f"teacher_weight={self.teacher_weight} is not in [0, 1]")
        if self.name == "distill" and not self.teacher:
            raise ValueError("name=distill needs a teacher checkpoint (objective.teacher)")


@dataclass
class TrackingConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "raytrain"
    entity: str | None = None
    dir: str = "outputs/wandb"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"mode={self.mode!r}; expected offline, online or disabled")


@dataclass
class TrainJob:
    """Everything a worker needs; built by the driver, shipped to every Ray Train worker."""

    model: Any
    data: Any  # TextDataConfig for language modelling, ImageTextDataConfig for image tasks
    trainer: TrainerConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    tracking: TrackingConfig
    objective: ObjectiveConfig
    run_name: str
    tokenizer_files: TokenizerFiles
    pad_id: int  # label positions holding it are ignored by the loss
    snapshot: dict[str, Any]  # the resolved Hydra config, for W&B and checkpoint metadata
    task: Any = None  # the task config (raytrain/train/tasks.py); None = language modelling
