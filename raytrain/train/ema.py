"""Exponential moving average of model weights (CatLIP's recipe: `ema = (1 - m) * ema + m * w`, m = 0.0005;
the released weights are the EMA).

The average is an fp32 copy of every parameter and persistent buffer (BatchNorm statistics are copied, not
averaged, as corenet does), updated after each optimizer step. Each rank keeps its own copy; under ZeRO stages 0-2
every rank holds the whole weights after a step, so the copies stay identical.
"""

from __future__ import annotations

import torch
from torch import nn

from raytrain.checkpoint.hf import model_state


class EMA:
    def __init__(self, model: nn.Module, momentum: float) -> None:
        self.momentum = momentum
        self.state = {k: v.detach().float().clone() for k, v in model_state(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model_state(model).items():
            if value.is_floating_point() and isinstance(value, nn.Parameter):
                self.state[name].lerp_(value.detach().float(), self.momentum)
            else:
                self.state[name].copy_(value.detach())

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.state[name].copy_(value)
