"""LoRA (Hu et al., 2021) on the decoder's projections, for fine-tuning with frozen base weights (plain PyTorch).

`add_lora` wraps every attention and FFN projection of the blocks in a `LoRALinear`: y = W x + (α / r) B A x with W
frozen, A drawn as PEFT draws it and B zero, so the wrapped model starts as the base model. The decoder fuses q, k, v
into one projection and gate, up into another; LoRA is applied per projection, as on a Llama with separate ones: a
fused layer gets one (A, B) pair per part (`splits`), never one low-rank update across its parts. `merged_state`
folds the updates back into plain weights under the base model's parameter names, for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("qkv_proj", "out_proj", "proj_1", "proj_2")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, splits: list[int] | None = None) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base = base.requires_grad_(False)
        self.splits = splits or [out_features]
        if sum(self.splits) != out_features:
            raise ValueError(f"LoRA splits {self.splits} do not add up to {out_features} outputs")
        self.rank, self.scale = rank, alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(len(self.splits) * rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.nn.functional.linear(x, self.lora_a).unflatten(-1, (len(self.splits), self.rank))  # (..., s, r)
        parts = [torch.nn.functional.linear(low[..., i, :], b) for i, b in enumerate(self.lora_b.split(self.splits))]
        return self.base(x) + self.scale * torch.cat(parts, dim=-1)

    def delta(self) -> torch.Tensor:
        """(α / r) B A as one (out, in) matrix, block by block."""
        a = self.lora_a.unflatten(0, (len(self.splits), self.rank))
        return self.scale * torch.cat([b @ a[i] for i, b in enumerate(self.lora_b.split(self.splits))])


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """Freeze every parameter of a decoder and wrap its blocks' projections in LoRA; returns the LoRA parameter
    count. Parameters created afterwards (or unfrozen by the caller) are trained besides."""
    model.requires_grad_(False)
    added = 0
    for block in model.layers:
        attn, ffn = block.attn, block.ffn
        qkv = [attn.n_q * attn.head_dim, attn.n_kv * attn.head_dim, attn.n_kv * attn.head_dim]
        half = ffn.proj_1.weight.shape[0] // 2
        for owner, name, splits in ((attn, "qkv_proj", qkv), (attn, "out_proj", None), (ffn, "proj_1", [half, half]),
                                    (ffn, "proj_2", None)):
            wrapped = LoRALinear(getattr(owner, name), rank, alpha, splits)
            setattr(owner, name, wrapped)
            added += wrapped.lora_a.numel() + wrapped.lora_b.numel()
    return added


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under the names of the model without LoRA, each LoRA update folded into its weight
    (tied weights once, as `checkpoint.hf.model_state` stores them)."""
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in lora:  # lora_a / lora_b: folded below
            continue
        if owner.endswith(".base") and owner.removesuffix(".base") in lora:
            module = owner.removesuffix(".base")
            state[f"{module}.{leaf}"] = (p + lora[module].delta().to(p.dtype)).detach().clone()
        else:
            state[name] = p.detach().clone()
    return state
