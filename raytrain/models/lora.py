"""LoRA adapters on a frozen decoder (plain PyTorch): AFM's feature and accuracy-recovery adapters.

`apply_lora` replaces every targeted projection (attention qkv and output, FFN in and out: AFM puts adapters on all
of them) with a `LoRALinear`: the frozen base layer (an `nn.Linear`, or a `CompressedLinear` for a palettized base)
plus `scale * B A x`, with A (r x in) drawn like PEFT's default and B (out x r) zero, so a new adapter leaves the
model's outputs exactly unchanged. Our decoder fuses q, k, v into one projection and the SwiGLU gate and up
projections into another; with `split_qkv` / `split_gate_up` such a projection carries one (A, B) pair per part
(A stacked as (parts * r, in), B as (out, r) cut by rows), which is exactly separate LoRA on separate q, k, v (gate,
up) projections: AFM-3B then has 22,417,408 adapter parameters at rank 16, the paper's count; without the q, k, v
split, one pair on the fused projection, 19,861,504.

A `LoRALinear` holds a bank of `slots` adapters (A (slots, parts * r, in), B (slots, out, r), a scale per slot),
and the model's `AdapterSelection` says which slot each batch row uses (-1: none, the base alone). Training uses
one slot and no selection; a server loads several adapters into slots and runs a batch mixing them in one forward.
A decode step (one token per row) of at least as many rows as slots runs every slot at once in two dense matmuls
rather than a per-row gather (what punica's BGMV kernel does in one): x A_all^T gives every slot's (parts * r)
codes, each row keeps its own slot's (times its scale; zeros elsewhere), and one matmul per part against B laid out
as (out, slots * r) sums them, so the bank is read once per step however many rows there are. B is stored out-major
(its (slots, out, r) shape is a transposed view) so that layout is a view, not a copy. Other batches (a prefill
chunk: one row of many tokens, where every slot's codes would cost slots x the LoRA FLOPs) gather each row's own A
and B. Adapters of a lower rank
than the bank sit in its first columns; the others stay zero, so every slot computes its own adapter exactly.

`merge_lora` folds an adapter into the model in place; `merged_state` returns the merged weights under the base
model's parameter names and leaves the model as it is (an export during fine-tuning: Speculative Streaming's
checkpoint is the base decoder with its LoRA folded in).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raytrain.models.decoder import Attention, FeedForward

TARGETS = ("qkv_proj", "out_proj", "proj_1", "proj_2")


@dataclass
class LoRAConfig:
    rank: int = 16  # AFM's feature adapters (accuracy-recovery adapters: 8, 16 or 32 explored)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training
    targets: list[str] = field(default_factory=lambda: list(TARGETS))  # projection names (module name suffixes)
    split_qkv: bool = True  # one adapter each for q, k and v inside the fused projection (AFM's count)
    split_gate_up: bool = True  # one adapter each for the SwiGLU gate and up projections

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}: need rank >= 1, "
                             "alpha > 0 and 0 <= dropout < 1")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"targets={list(self.targets)}: choose among {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class AdapterSelection:
    """The adapter slot of each batch row, shared by every LoRA layer of a model; set around a forward."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # (B,) int64; None: every row uses slot `slot`
        self.slot = 0
        self.base_only = False  # every row on the base alone, whatever its batch size

    @contextlib.contextmanager
    def rows(self, ids: torch.Tensor | None) -> Iterator[None]:
        previous, self.ids = self.ids, ids
        try:
            yield
        finally:
            self.ids = previous

    @contextlib.contextmanager
    def single(self, slot: int) -> Iterator[None]:
        """Every row on one slot, known on the host: its A and B are views of the bank, not gathers (not for a
        captured graph that other slots replay)."""
        previous, self.slot = self.slot, slot
        try:
            yield
        finally:
            self.slot = previous

    @contextlib.contextmanager
    def base(self) -> Iterator[None]:
        """No adapter on any row: forwards that run outside per-row selection (superposed prefill, draft trees)."""
        previous, self.base_only = self.base_only, True
        try:
            yield
        finally:
            self.base_only = previous


class LoRALinear(nn.Module):
    """A frozen base projection plus a bank of LoRA adapters; see the module docstring."""

    def __init__(self, base: nn.Module, parts: list[int], rank: int, slots: int = 1, dropout: float = 0.0,
                 selection: AdapterSelection | None = None, dtype: torch.dtype | None = None) -> None:
        """`dtype`: of the bank (default float32, the trainable adapter's; a server's bank takes the model's)."""
        super().__init__()
        if sum(parts) != base.out_features:
            raise ValueError(f"parts {parts} do not add up to the {base.out_features} outputs")
        self.base, self.parts, self.rank, self.slots = base, list(parts), rank, slots
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = next(base.parameters(), None)  # a CompressedLinear holds no parameters, only its device
        device = weight.device if weight is not None else base.device
        self.lora_A = nn.Parameter(torch.empty(slots, len(parts) * rank, self.in_features, device=device,
                                               dtype=dtype))
        # stored (out, slots, r): each part's rows are an (out_p, slots * r) matrix for the all-slots matmul
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, slots, rank, device=device, dtype=dtype)
                                   .transpose(0, 1))
        self.register_buffer("scale", torch.zeros(slots, device=device, dtype=dtype))
        self.register_buffer("slot_index", torch.arange(slots, device=device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.selection = selection
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0 (the adapter starts as the identity map)."""
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_ with a = sqrt(5) on fan_in = in_features
        nn.init.uniform_(self.lora_A, -bound, bound)
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return f"parts={self.parts}, rank={self.rank}, slots={self.slots}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.selection is not None and self.selection.base_only:
            return self.base(x)
        return self.base(x) + self.delta(self.dropout(x))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * B A x of each row's adapter; x (B, ..., in) -> (B, ..., out)."""
        ids = self.selection.ids if self.selection is not None else None
        if ids is None:
            s = self.selection.slot if self.selection is not None else 0
            z = F.linear(x, self.lora_A[s].to(x.dtype)) * self.scale[s].to(x.dtype)  # (..., parts * r)
            B = self.lora_B[s].to(x.dtype).split(self.parts)
            return torch.cat([F.linear(zp, bp) for zp, bp in zip(z.split(self.rank, -1), B)], dim=-1)
        one_token_rows = x.numel() == x.shape[0] * self.in_features
        if one_token_rows and ids.numel() >= self.slots:  # a decode step: the bank costs less than the rows' gathers
            return self._all_slots(x, ids)
        return self._gathered(x, ids)

    def _all_slots(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every slot's codes for every row, each row's own kept (reads the bank once; see the module docstring)."""
        K, P, r = self.slots, len(self.parts), self.rank
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        z = F.linear(x, A.reshape(K * P * r, self.in_features)).unflatten(-1, (K, P, r))  # (B, ..., K, P, r)
        weight = torch.where(ids[:, None] == self.slot_index, self.scale.to(x.dtype), 0)  # (B, K): own slot's scale
        weight = weight.view(-1, *[1] * (x.dim() - 2), K, 1)  # (B, ..., K, 1)
        B_parts = B.transpose(0, 1).split(self.parts)  # per part (out_p, K, r): views of the out-major bank
        return torch.cat([F.linear((z[..., p, :] * weight).flatten(-2), bp.reshape(len(bp), K * r))
                          for p, bp in enumerate(B_parts)], dim=-1)

    def _gathered(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row's own A and B gathered: (B, parts * r, in) and (B, out, r) copies, then batched matmuls."""
        slot = ids.clamp_min(0)
        scale = (self.scale[slot] * (ids >= 0)).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        A, B = self.lora_A[slot].to(x.dtype), self.lora_B[slot].to(x.dtype)  # (B, parts * r, in), (B, out, r)
        z = torch.einsum("b...i,bki->b...k", x, A) * scale  # (B, ..., parts * r)
        return torch.cat([torch.einsum("b...k,bok->b...o", zp, bp)
                          for zp, bp in zip(z.split(self.rank, -1), B.split(self.parts, dim=1))], dim=-1)

    def weight_delta(self, slot: int = 0) -> torch.Tensor:
        """scale * B A of one slot as an (out, in) matrix: what merging adds to the base weight."""
        A = self.lora_A[slot].split(self.rank)
        B = self.lora_B[slot].split(self.parts)
        return self.scale[slot] * torch.cat([b @ a for a, b in zip(A, B)])

    def load(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Put one adapter (A (parts * r', in), B (out, r'), r' <= the bank's rank) into `slot`."""
        r = B.shape[1]
        if r > self.rank or A.shape != (len(self.parts) * r, self.in_features) or B.shape[0] != self.out_features:
            raise ValueError(f"an adapter with A {tuple(A.shape)}, B {tuple(B.shape)} does not fit slots of "
                             f"{len(self.parts)} parts x rank {self.rank} over {self.in_features} -> "
                             f"{self.out_features}")
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            for p, a in enumerate(A.split(r)):
                self.lora_A[slot, p * self.rank:p * self.rank + r] = a
            self.lora_B[slot, :, :r] = B
            self.scale[slot] = scale

    def adapter(self, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one slot, as `load` takes them."""
        return self.lora_A[slot].detach(), self.lora_B[slot].detach()


def projection_parts(model: nn.Module, name: str, cfg: LoRAConfig) -> list[int]:
    """Output sizes of the logical projections inside the fused projection `name` (one part when not split)."""
    parent_name, _, child = name.rpartition(".")
    parent, module = model.get_submodule(parent_name), model.get_submodule(name)
    if isinstance(parent, Attention) and child == "qkv_proj" and cfg.split_qkv:
        return [parent.n_q * parent.head_dim, parent.n_kv * parent.head_dim, parent.n_kv * parent.head_dim]
    if isinstance(parent, FeedForward) and child == "proj_1" and cfg.split_gate_up:
        return [module.out_features // 2] * 2
    return [module.out_features]


def apply_lora(model: nn.Module, cfg: LoRAConfig, slots: int = 1,
               dtype: torch.dtype | None = None) -> AdapterSelection:
    """Freeze `model` and put a LoRA bank of `slots` adapters (of `dtype`, default float32) on every targeted
    projection (slot 0 gets `cfg.scale`, the others stay empty until loaded); returns the model's selection."""
    model.requires_grad_(False)
    selection = AdapterSelection()
    names = [n for n, m in model.named_modules() if n.rpartition(".")[2] in cfg.targets and hasattr(m, "in_features")]
    if not names:
        raise ValueError(f"the model has no projection named {', '.join(cfg.targets)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(model.get_submodule(name), projection_parts(model, name, cfg), cfg.rank, slots,
                           cfg.dropout, selection, dtype)
        layer.scale[0] = cfg.scale
        setattr(model.get_submodule(parent_name), child, layer)
    model.adapter_selection = selection
    return selection


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module, slot: int = 0) -> dict[str, torch.Tensor]:
    """One slot's adapter as tensors `<projection>.lora_A` (parts * r, in) and `.lora_B` (out, r)."""
    state = {}
    for name, layer in lora_layers(model).items():
        A, B = layer.adapter(slot)
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = A.cpu().clone(), B.cpu().clone()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], scale: float, slot: int = 0) -> None:
    """Load an adapter written by `adapter_state` into `slot`; it must cover exactly the model's LoRA layers."""
    layers = lora_layers(model)
    expected = {f"{n}.lora_{x}" for n in layers for x in "AB"}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"the adapter does not match the model's LoRA layers: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, layer in layers.items():
        layer.load(slot, state[f"{name}.lora_A"], state[f"{name}.lora_B"], scale)


def merge_lora(model: nn.Module, slot: int = 0) -> None:
    """Fold one slot's adapter into dense base weights and remove the LoRA layers (a palettized base cannot take
    a merge without re-quantising: keep its adapters unmerged)."""
    for name, layer in lora_layers(model).items():
        if not isinstance(layer.base, nn.Linear):
            raise ValueError(f"{name}: merging needs a dense base weight, not {type(layer.base).__name__}")
        with torch.no_grad():
            layer.base.weight += layer.weight_delta(slot).to(layer.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    if hasattr(model, "adapter_selection"):
        del model.adapter_selection


def lora_parameters(model: nn.Module) -> int:
    """Adapter parameters of one slot."""
    return sum(layer.lora_A[0].numel() + layer.lora_B[0].numel() for layer in lora_layers(model).values())


@torch.no_grad()
def merged_state(model: nn.Module, slot: int = 0) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers (as `checkpoint.hf.model_state` stores them) under the names of
    the model without LoRA, one slot's update folded into each adapted weight; the model itself is unchanged."""
    from raytrain.checkpoint.hf import model_state

    layers = lora_layers(model)
    for name, layer in layers.items():
        if not isinstance(layer.base, nn.Linear):
            raise ValueError(f"{name}: merging needs a dense base weight, not {type(layer.base).__name__}")
    state = {}
    for key, tensor in model_state(model).items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:  # lora_A, lora_B, scale: folded below
            continue
        module = owner.removesuffix(".base")
        if owner.endswith(".base") and module in layers:
            value = tensor + layers[module].weight_delta(slot).to(tensor.dtype) if leaf == "weight" else tensor
            state[f"{module}.{leaf}"] = value.detach().clone()
        else:
            state[key] = tensor.detach().clone()
    return state
