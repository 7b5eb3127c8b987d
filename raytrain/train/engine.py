"""DeepSpeed inside a Ray Train worker: the engine config from `TrainerConfig`, and building the engine.

The optimizer is always a torch optimizer handed to `deepspeed.initialize` (a DeepSpeed `optimizer` block would
JIT-compile FusedAdam); the LR scheduler is stepped by the engine at each accumulation boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from raytrain.train.config import TrainerConfig
from raytrain.train.objectives import lm_loss


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`auto` is bf16 on GPUs and fp32 on CPUs (DeepSpeed's CPU accelerator has no fp16, and bf16 is slow there)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def deepspeed_config(t: TrainerConfig, precision: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
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


def loss_function(t: TrainerConfig) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`lm_loss`, compiled when `trainer.compile` is on: fuses the fp32 upcast, logsumexp and gather over the
    (tokens x vocabulary) logits, which are otherwise several passes over the largest activation."""
    return torch.compile(lm_loss) if t.compile else lm_loss


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
    return engine


def gathered(params: list[torch.nn.Parameter], zero3: bool) -> contextlib.AbstractContextManager:
    """Make ZeRO-3 partitioned parameters whole on every rank for the duration (collective: all ranks enter)."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
