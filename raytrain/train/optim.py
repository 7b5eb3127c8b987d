"""Optimizers and LR schedules (plain PyTorch).

`adamw`: torch AdamW with OpenELM's decay groups. `adastar`: AFM's optimizer (axlearn `adastar`, spec section 2.2),
RMSProp with momentum on per-tensor clipped updates, no bias correction of the momentum, weight decay decoupled
from the LR, and steps skipped when the global gradient norm is too large. Schedules: linear warmup + cosine to a
floor, in corenet's or axlearn's convention.

Under DeepSpeed ZeRO the optimizer sees flat fp32 partitions, not tensors. `AdaStar.attach` takes, for each flat
partition, a `FlatLayout` saying which slice belongs to which whole tensor, so the per-tensor clip reduces over
whole tensors (across ranks), and the global gradient norm DeepSpeed computed before calling the optimizer. On
CUDA adastar's step is two fused Triton kernels (`adastar_kernels.py`), elsewhere foreach ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from raytrain.config import ConfigError
from raytrain.train.config import OptimConfig, ScheduleConfig

OPTIMIZERS = ("adamw", "adastar")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three kinds of tensor: block matrices (attention and FFN weights) always decay; the embedding (and an
    untied head) unless `decay_embeddings` is off; vectors (norm gains) only with `decay_norms`. adastar scales the
    block matrices' updates by `min(mup_base_dim / d_model, 1)` (axlearn's "mup-simple")."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    kinds: dict[str, list[nn.Parameter]] = {"blocks": [], "embedding": [], "vectors": []}
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions are flat; ds_shape is the real shape
        if ndim < 2:
            kinds["vectors"].append(p)
        elif id(p) in embedding_ids or not name.startswith("layers."):
            kinds["embedding"].append(p)
        else:
            kinds["blocks"].append(p)
    decays = {"blocks": True, "embedding": cfg.decay_embeddings, "vectors": cfg.decay_norms}
    groups = []
    for kind, params in kinds.items():
        if not params:
            continue
        group = {"params": params, "kind": kind, "weight_decay": cfg.weight_decay if decays[kind] else 0.0}
        if cfg.name == "adastar":
            group["update_scale"] = _mup_scale(model, cfg) if kind == "blocks" else 1.0
        groups.append(group)
    return groups


def _mup_scale(model: nn.Module, cfg: OptimConfig) -> float:
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    if cfg.mup_base_dim is None or d_model is None:
        return 1.0
    return min(cfg.mup_base_dim / d_model, 1.0)


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False,
                    grad_clip: float = 1.0) -> torch.optim.Optimizer:
    """`grad_clip` is adastar's own global-norm clip when it runs without DeepSpeed (under DeepSpeed the engine
    clips with the same value before the optimizer sees the gradients)."""
    check_optim(cfg)
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    return AdaStar(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, update_clip=cfg.update_clip,
                   update_clip_by=cfg.update_clip_by, skip_grad_norm=cfg.skip_grad_norm, grad_clip=grad_clip)


def check_optim(cfg: OptimConfig) -> None:
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r} is unknown; known: {', '.join(OPTIMIZERS)}")
    if cfg.name == "adamw" and cfg.skip_grad_norm is not None:
        raise ConfigError("optim.skip_grad_norm is an adastar option; set optim.name=adastar or leave it null")


# ---- adastar ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """`length` elements at `start` of a flat tensor belong to whole tensor number `tensor` of its layout."""

    start: int
    length: int
    tensor: int


@dataclass
class FlatLayout:
    """Which whole tensors a flat tensor holds pieces of: `segments` (elements outside every segment are padding),
    `numels` (each whole tensor's size), and the process group of `world` ranks whose flat tensors hold the other
    pieces (world 1: every piece is here)."""

    segments: list[Segment]
    numels: list[int]
    group: Any = None
    world: int = 1


class AdaStar(torch.optim.Optimizer):
    """AFM's "RMSProp with momentum" (axlearn `adastar`), per step t = 1, 2, ... (spec section 2.2):

        G = global gradient norm; skip the step (no change at all) unless G < skip_grad_norm
        g = g * min(1, grad_clip / G)
        v = b2 v + (1 - b2) (g^2 + eps);   u = g / sqrt(v / (1 - b2^t))
        u = u / max(1, rms(u) / update_clip)            per whole tensor (or its L2 norm: update_clip_by="norm")
        m = b1 m + (1 - b1) u                           no bias correction
        p = p - lr_t * update_scale * m - (lr_t / lr_peak) * weight_decay * p

    `lr_t` is the group's scheduled LR and `lr_peak` the LR it was built with, so the decay follows the schedule
    but not the peak LR (decoupled). Groups may carry `update_scale` (mup-simple) and `weight_decay`.

    One step, two implementations: on CUDA two fused Triton kernels (`adastar_kernels`, about AdamW's memory
    traffic; `fused=None` uses them when triton is installed, `fused=True` everywhere, e.g. under
    TRITON_INTERPRET=1), elsewhere `torch._foreach_*` ops (a handful of launches per group, not per tensor).
    """

    def __init__(self, params: Any, lr: float = 0.01, betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-30,
                 weight_decay: float = 0.0, update_clip: float = 1.0, update_clip_by: str = "rms",
                 skip_grad_norm: float | None = 100.0, grad_clip: float = 1.0, update_scale: float = 1.0,
                 fused: bool | None = None) -> None:
        if update_clip_by not in ("rms", "norm"):
            raise ValueError(f"update_clip_by={update_clip_by!r}; expected rms or norm")
        defaults = dict(lr=lr, peak_lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        update_scale=update_scale)
        super().__init__(params, defaults)
        self.update_clip, self.update_clip_by = update_clip, update_clip_by
        self.skip_grad_norm, self.grad_clip, self.fused = skip_grad_norm, grad_clip, fused
        self.layouts: dict[torch.Tensor, FlatLayout] = {}
        self.external_grad_norm: Callable[[], float] | None = None
        self._pieces: dict[tuple[int, ...], _Pieces] = {}
        self.skipped_last = False

    def attach(self, grad_norm: Callable[[], float], layouts: dict[torch.Tensor, FlatLayout]) -> None:
        """Run inside a DeepSpeed ZeRO optimizer: `grad_norm` returns the global norm DeepSpeed computed (and
        clipped by) before calling `step`; `layouts` maps each flat fp32 partition to the tensors it holds."""
        self.external_grad_norm, self.layouts = grad_norm, layouts
        self._pieces.clear()

    def skips(self, grad_norm: float) -> bool:
        """The skip rule; a NaN or infinite norm is skipped too."""
        return self.skip_grad_norm is not None and not grad_norm < self.skip_grad_norm

    def last_step_skipped(self) -> bool:
        """Whether the last `step` left everything unchanged (the LR schedule must not advance either)."""
        return self.skipped_last

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        grad_norm, clip = self._grad_norm()
        self.skipped_last = self.skips(grad_norm)
        if self.skipped_last:
            return None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            b2 = group["betas"][1]
            bias_corrections = [1 - b2 ** self._state(p)["step"] for p in params]
            kernels = self._kernels(params)
            if kernels is not None:
                self._fused_step(kernels, params, group, bias_corrections, clip)
            else:
                self._foreach_step(params, group, bias_corrections, clip)
        return None

    def _foreach_step(self, params: list[torch.Tensor], group: dict[str, Any], bias_corrections: list[float],
                      clip: float) -> None:
        b1, b2 = group["betas"]
        grads = [p.grad.float() for p in params]
        v, m = [self.state[p]["v"] for p in params], [self.state[p]["m"] for p in params]
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=(1 - b2) * clip * clip)
        torch._foreach_add_(v, (1 - b2) * group["eps"])
        updates = torch._foreach_div(grads, torch._foreach_sqrt(v))  # g / sqrt(v), then x c sqrt(1 - b2^t)
        torch._foreach_mul_(updates, [clip * math.sqrt(bc) for bc in bias_corrections])
        if self.update_clip > 0:
            pieces = self._pieces_of(params)
            views = [updates[i].view(-1).narrow(0, start, length) for i, start, length in pieces.views]
            sums = torch.stack(torch._foreach_norm(views)).square() if views else updates[0].new_zeros(0)
            factors = self._clip_factors(pieces, sums)  # every rank of a partitioned tensor takes part
            if views:
                torch._foreach_mul_(views, list(factors.unbind()))
        torch._foreach_lerp_(m, updates, 1 - b1)
        if (decay := _decay(group)) != 1.0:
            torch._foreach_mul_(params, decay)
        step_size = group["lr"] * group["update_scale"]
        torch._foreach_add_(params, [x.to(p.dtype) for x, p in zip(m, params)], alpha=-step_size)

    def _fused_step(self, kernels: ModuleType, params: list[torch.Tensor], group: dict[str, Any],
                    bias_corrections: list[float], clip: float) -> None:
        """Updates the pieces only: the rest of a flat partition is alignment padding."""
        pieces = self._pieces_of(params)
        if not pieces.views:  # nothing but padding here (a small group over many ranks); the clip's all-reduce
            if self.update_clip > 0:  # still needs this rank
                self._clip_factors(pieces, params[0].new_zeros(0, dtype=torch.float32))
            return

        def views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [tensors[i].view(-1).narrow(0, start, length) for i, start, length in pieces.views]

        b1, b2 = group["betas"]
        grads, p = views([x.grad for x in params]), views(params)
        v, m = views([self.state[x]["v"] for x in params]), views([self.state[x]["m"] for x in params])
        corrections = [bias_corrections[i] for i, _, _ in pieces.views]
        sums = kernels.second_moments(grads, v, corrections, clip, b2, group["eps"])
        factors = self._clip_factors(pieces, sums) if self.update_clip > 0 else torch.ones_like(sums)
        kernels.apply_updates(grads, v, m, p, corrections, factors, clip, b1, _decay(group),
                              group["lr"] * group["update_scale"])

    def _kernels(self, params: list[torch.Tensor]) -> ModuleType | None:
        """The Triton kernels, if this step should use them: contiguous tensors on CUDA (or `fused=True`)."""
        if self.fused is False or (self.fused is None and not params[0].is_cuda):
            return None
        if self.fused is None and not all(p.is_contiguous() and p.grad.is_contiguous() for p in params):
            return None
        try:
            from raytrain.train import adastar_kernels
        except ImportError:
            if self.fused:
                raise
            return None
        return adastar_kernels

    def _grad_norm(self) -> tuple[float, float]:
        """The global gradient norm and the factor that clips the gradients to `grad_clip` (1 when DeepSpeed
        computed the norm: it has clipped already)."""
        if self.external_grad_norm is not None:
            return float(self.external_grad_norm()), 1.0
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item() if grads else 0.0
        return norm, min(1.0, self.grad_clip / norm) if self.grad_clip > 0 and norm > 0 else 1.0

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state.update(step=0, v=torch.zeros_like(p, dtype=torch.float32), m=torch.zeros_like(p, dtype=torch.float32))
        state["step"] += 1
        return state

    def _pieces_of(self, params: list[torch.Tensor]) -> _Pieces:
        """The pieces of whole tensors `params` hold (cached: layouts do not change between steps)."""
        key = tuple(id(p) for p in params)
        if key not in self._pieces:
            views, slots, numels, shared = [], [], [], []
            for i, p in enumerate(params):
                layout, base = self.layouts.get(p) or _whole(p), len(numels)
                views += [(i, s.start, s.length) for s in layout.segments]
                slots += [base + s.tensor for s in layout.segments]
                numels += layout.numels
                if layout.world > 1:
                    shared.append((base, len(layout.numels), layout.group))
            device = params[0].device
            self._pieces[key] = _Pieces(views, torch.tensor(slots, dtype=torch.long, device=device),
                                        torch.tensor(numels, dtype=torch.float32, device=device), shared)
        return self._pieces[key]

    def _clip_factors(self, pieces: _Pieces, sums: torch.Tensor) -> torch.Tensor:
        """1 / max(1, size(u) / update_clip) for the whole tensor of each piece, from each piece's sum of u^2
        (summed over the pieces of a tensor, across ranks for partitioned ones); (pieces,), on the device."""
        totals = torch.zeros(len(pieces.numels), device=sums.device).index_add_(0, pieces.slots, sums)
        for base, count, group in pieces.shared:
            torch.distributed.all_reduce(totals[base:base + count], group=group)
        size = totals.sqrt()
        if self.update_clip_by == "rms":
            size = size / pieces.numels.sqrt()
        return (size / self.update_clip).clamp_min(1.0).reciprocal()[pieces.slots]


@dataclass
class _Pieces:
    """The contiguous pieces of whole tensors a group's parameters hold: piece k is `views[k]` = (parameter index,
    start, length) of a flattened parameter and belongs to whole tensor `slots[k]`; `numels[slot]` is that tensor's
    size; `shared` lists (first slot, count, process group) of tensors partitioned over other ranks too."""

    views: list[tuple[int, int, int]]
    slots: torch.Tensor
    numels: torch.Tensor
    shared: list[tuple[int, int, Any]]


def _decay(group: dict[str, Any]) -> float:
    """The factor decoupled weight decay multiplies p by: 1 - wd * lr_t / lr_peak."""
    if not group["weight_decay"] or group["peak_lr"] <= 0:
        return 1.0
    return 1 - group["weight_decay"] * group["lr"] / group["peak_lr"]


def _whole(p: torch.Tensor) -> FlatLayout:
    return FlatLayout([Segment(0, p.numel(), 0)], [p.numel()])


# ---- schedules -------------------------------------------------------------------------------------------------

def cosine_lr(step: int, peak: float, cfg: ScheduleConfig, total_steps: int) -> float:
    """Linear warmup from `init_lr` over `warmup_steps`, then cosine to `min_lr_ratio * peak` at `total_steps`.
    corenet's cosine period is `total - warmup + 1` (the reference's +1); axlearn's (`cosine_with_linear_warmup`) is
    `total - warmup`, so the floor is reached exactly. Past the end the LR stays at the floor."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio * peak
    if step < warmup:
        return cfg.init_lr + step * (peak - cfg.init_lr) / warmup
    period = total_steps - warmup + (1 if cfg.convention == "corenet" else 0)
    progress = min((step - warmup) / max(period, 1), 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR indexed by applied updates: a `step` after an update the optimizer skipped (`skipped()` true) leaves
    the LR where it is, as axlearn's schedule, which counts the optimizer's own steps, does. DeepSpeed steps the
    scheduler after every optimizer step it did not skip itself, so the check lives here."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float],
                 skipped: Callable[[], bool] | None = None) -> None:
        self.skipped = skipped
        super().__init__(optimizer, factor)

    def step(self, epoch: int | None = None) -> None:
        if self.skipped is None or not self.skipped():
            super().step()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "skipped"}


def build_scheduler(optimizer: torch.optim.Optimizer, peak: float, cfg: ScheduleConfig, total_steps: int,
                    skipped: Callable[[], bool] | None = None) -> Schedule:
    """LambdaLR calls the factor with 0 for the first update. corenet's schedule is indexed from 0; axlearn's from
    1 (its first update already uses s(1) = 1 / warmup). `skipped` says whether the optimizer skipped its last
    update (adastar's `last_step_skipped`)."""
    if cfg.name != "cosine":
        raise ConfigError(f"schedule.name={cfg.name!r} is unknown; known: cosine")
    offset = 1 if cfg.convention == "axlearn" else 0
    factor: Callable[[int], float] = lambda step: (  # noqa: E731
        cosine_lr(step + offset, peak, cfg, total_steps) / peak if peak > 0 else 0.0)
    return Schedule(optimizer, factor, skipped)
