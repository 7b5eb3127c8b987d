"""DeepSpeed inside a Ray Train worker: the engine config from `TrainerConfig`, and building the engine.

The optimizer is always a torch optimizer handed to `deepspeed.initialize` (a DeepSpeed `optimizer` block would
JIT-compile FusedAdam); the LR scheduler is stepped by the engine at each accumulation boundary. ZeRO hands that
optimizer flat fp32 partitions instead of tensors; an optimizer that reduces over whole tensors (adastar) is told
after `initialize` which slice of each partition belongs to which tensor (`zero_layouts`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from raytrain.config import ConfigError
from raytrain.train.config import ObjectiveConfig, TrainerConfig
from raytrain.train.objectives import distill_loss, lm_loss
from raytrain.train.optim import FlatLayout, Segment


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`auto` is bf16 on GPUs and fp32 on CPUs (DeepSpeed's CPU accelerator has no fp16, and bf16 is slow there)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def engine_zero_stage(t: TrainerConfig) -> int:
    """The ZeRO stage the engine runs: `trainer.zero_stage`, except ZeRO-3 on one worker, which partitions nothing
    there (every shard is the whole tensor) and only adds its gather and release hooks around every module: it runs
    as ZeRO-2, whose memory is the same on one rank. Checkpoints still record the configured stage."""
    return 2 if t.zero_stage == 3 and t.num_workers == 1 else t.zero_stage


def deepspeed_config(t: TrainerConfig, precision: str) -> dict[str, Any]:
    """Nothing in it makes the host wait for the device every step: gradient reduction overlaps the backward only
    when there is communication to overlap (DeepSpeed synchronises the device after each backward when it does),
    and bf16 runs without DeepSpeed's per-step overflow check (a device-to-host copy): bf16 has no loss scale to
    adjust, and a non-finite gradient shows as a non-finite loss at the next log step, which ends the run before
    anything is saved."""
    stage = engine_zero_stage(t)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if stage >= 2:
        zero.update(overlap_comm=t.num_workers > 1, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # progress is ours; keep DeepSpeed's own step logs quiet
        "wall_clock_breakdown": False,
    }


def apply_model_options(model: torch.nn.Module, t: TrainerConfig) -> None:
    """Activation checkpointing and torch.compile, both per decoder block (layers differ in width, so each block is
    its own compiled graph and its own recompute unit)."""
    model.activation_checkpointing = t.activation_checkpointing
    if t.compile:
        # every block shares one forward code object but has its own widths: keep one graph per layer rather
        # than letting Dynamo fall back to eager after its default 8 recompilations
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(model.layers))
        for block in model.layers:
            block.compile()


def loss_function(t: TrainerConfig, objective: ObjectiveConfig) -> Callable[..., tuple[torch.Tensor, ...]]:
    """`(logits, labels, teacher_logits) -> (total, *parts)`, parts named by `METRICS[objective.name]`; compiled
    when `trainer.compile` is on: fuses the fp32 upcast, logsumexp and gathers over the (tokens x vocabulary)
    logits, which are otherwise several passes over the largest activation."""
    if objective.name == "distill":
        loss = functools.partial(distill_loss, z_loss=t.z_loss, teacher_weight=objective.teacher_weight,
                                 target=objective.target)
    else:
        loss = functools.partial(_lm_loss, z_loss=t.z_loss)
    return torch.compile(loss) if t.compile else loss


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: None,
             z_loss: float) -> tuple[torch.Tensor, ...]:
    return lm_loss(logits, labels, z_loss)


def model_init_context(ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    """Under ZeRO-3, build the model partitioned from the start so no rank holds the whole of it."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Callable[[torch.optim.Optimizer], Any], ds_config: dict[str, Any]) -> Any:
    """`scheduler` builds the LR schedule on DeepSpeed's wrapped optimizer (whose groups ZeRO may rearrange)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if hasattr(optimizer, "attach"):
        zero = engine.optimizer
        if zero is optimizer:
            raise ConfigError("optim.name=adastar needs trainer.zero_stage >= 1 (its step skipping reads the "
                              "global gradient norm that DeepSpeed's ZeRO optimizers compute)")
        layouts = zero_layouts(zero)
        check_coverage(layouts)
        optimizer.attach(lambda: zero._global_grad_norm, layouts)
    return engine


def zero_layouts(zero: Any) -> dict[torch.Tensor, FlatLayout]:
    """The layout of each flat fp32 partition DeepSpeed's ZeRO optimizer steps, read from its bookkeeping:
    ZeRO-1/2 flatten a parameter group (with per-parameter alignment padding) and give each rank one contiguous
    slice; ZeRO-3 gives each rank a slice of every parameter and concatenates those slices per sub-group."""
    import deepspeed.comm as dist

    def place(group: Any) -> dict[str, Any]:
        return {"rank": dist.get_rank(group=group), "world": dist.get_world_size(group=group), "group": group}

    layouts = {}
    if hasattr(zero, "round_robin_bit16_offsets"):  # DeepSpeedZeroOptimizer (stages 1 and 2)
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            numels = [meta.numel() for meta in zero.round_robin_bit16_meta[i]]
            layouts[flat] = contiguous_layout(zero.round_robin_bit16_offsets[i], numels, zero.partition_size[i],
                                              **place(zero.real_dp_process_group[i]))
    elif hasattr(zero, "fp32_partitioned_groups_flat"):  # DeepSpeedZeroOptimizer_Stage3
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            params = zero.fp16_groups[i]
            layouts[flat] = partitioned_layout([p.ds_numel for p in params], [p.partition_numel() for p in params],
                                               **place(zero.sub_group_process_groups[i]))
    elif hasattr(zero, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1 with bf16 weights)
        for i, flat in enumerate(zero.fp32_groups_flat_partition):
            numels = [p.numel() for p in zero.bf16_groups[i]]
            offsets = [sum(numels[:k]) for k in range(len(numels))]
            layouts[flat] = contiguous_layout(offsets, numels, flat.numel(), **place(zero.real_dp_process_group[i]))
    else:
        raise ConfigError(f"optim.name=adastar does not know DeepSpeed's {type(zero).__name__} partition layout")
    return layouts


def contiguous_layout(offsets: list[int], numels: list[int], size: int, rank: int, world: int = 1,
                      group: Any = None) -> FlatLayout:
    """Tensors laid end to end at `offsets` in one flat buffer cut into `world` slices of `size`; this is `rank`'s."""
    start, segments = rank * size, []
    for k, (offset, numel) in enumerate(zip(offsets, numels)):
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if lo < hi:
            segments.append(Segment(lo - start, hi - lo, k))
    return FlatLayout(segments, numels, group, world)


def partitioned_layout(numels: list[int], partition_numels: list[int], rank: int, world: int = 1,
                       group: Any = None) -> FlatLayout:
    """Each tensor cut into `world` equal padded partitions; `rank`'s partitions concatenated."""
    segments, start = [], 0
    for k, (numel, part) in enumerate(zip(numels, partition_numels)):
        valid = max(0, min(part, numel - rank * part))
        if valid:
            segments.append(Segment(start, valid, k))
        start += part
    return FlatLayout(segments, numels, group, world)


def check_coverage(layouts: dict[torch.Tensor, FlatLayout]) -> None:
    """Across ranks, the segments of every layout must cover each tensor exactly once (collective), so a DeepSpeed
    release that lays partitions out differently fails here rather than clipping the wrong elements."""
    for flat, layout in layouts.items():
        covered = torch.zeros(len(layout.numels), dtype=torch.float64, device=flat.device)
        for s in layout.segments:
            covered[s.tensor] += s.length
        if layout.world > 1:
            torch.distributed.all_reduce(covered, group=layout.group)
        if covered.tolist() != [float(n) for n in layout.numels]:
            raise RuntimeError("DeepSpeed's ZeRO partitions do not tile the parameters as adastar's layout "
                               f"expects (covered {covered.tolist()[:4]} of {layout.numels[:4]} elements)")


def gathered(params: list[torch.nn.Parameter], zero3: bool) -> contextlib.AbstractContextManager:
    """Make ZeRO-3 partitioned parameters whole on every rank for the duration (collective: all ranks enter)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
