"""Exponential moving average of model weights (CatLIP's recipe: `ema = (1 - m) * ema + m * w`, m = 0.0005;
the released weights are the EMA).

As corenet's EMA does, every entry of the state is averaged after each optimizer step, parameters and persistent
buffers alike: BatchNorm running statistics too, and integer counters (`num_batches_tracked`) by the same formula,
truncated back to integers as corenet's `copy_` truncates them. Floating entries are kept in fp32. Each rank keeps its
own copy; under ZeRO stages 0-2 every rank holds the whole weights after a step, so the copies stay identical.
"""

from __future__ import annotations

import torch
from torch import nn

from raytrain.checkpoint.hf import model_state


class EMA:
    def __init__(self, model: nn.Module, momentum: float) -> None:
        self.momentum = momentum
        self.state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone()
                      for k, v in model_state(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model_state(model).items():
            ema = self.state[name]
            if ema.is_floating_point():
                ema.lerp_(value.detach().float(), self.momentum)
            else:
                ema.copy_(ema * (1 - self.momentum) + self.momentum * value.detach())

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.state[name].copy_(value)
