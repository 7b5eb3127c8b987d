"""Structured pruning of a trained decoder into a smaller shape (plain PyTorch): AFM's pruning-based init.

AFM-on-device starts from a pruned 6.4B model; the spec ([U], section 2.3) has the masks learned on data in the
Sheared-LLaMA style with Soft-Top-K instead of HardConcrete. Here every layer keeps `ffn_dim` of its FFN hidden
units (and, with `heads`, `kv_heads` of its KV groups, each a KV head with its query heads) of the target config:

- `soft_topk`: mask logits per unit, initialised from the magnitude scores, are trained with Adam on the LM loss of
  the masked source model (its weights frozen). The mask `sigmoid((s - tau) / T)` has `tau` chosen so that the mask
  sums to exactly k, and the temperature T anneals geometrically, so the masks end near-binary with the target size
  at every step (no sparsity penalty needed). The final hard top-k of the logits decides what is kept.
- `magnitude` (baseline): keep the units with the largest weight norms, no data.

`prune_state` then cuts the kept rows and columns out of the source weights; the result loads into the target
config as an ordinary checkpoint, and its outputs equal the source model's under the same hard masks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from raytrain.models.decoder import Decoder, DecoderConfig
from raytrain.train.objectives import lm_loss

METHODS = ("soft_topk", "magnitude")


@dataclass
class PruneConfig:
    source: str | None = None  # checkpoint of the trained larger model; in a recipe, also an earlier stage
    method: str = "soft_topk"  # soft_topk (learned masks, the spec's method) | magnitude (baseline)
    heads: bool = False  # also prune attention heads (whole KV groups); the spec prunes FFN units only
    steps: int = 200  # soft_topk: optimizer steps on the mask logits
    lr: float = 0.05  # soft_topk: Adam LR of the mask logits
    temperature: list[float] = field(default_factory=lambda: [0.5, 0.02])  # soft_topk: annealed first -> last
    micro_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {METHODS}")
        if len(self.temperature) != 2 or min(self.temperature) <= 0:
            raise ValueError(f"temperature={self.temperature}; expected [first, last], both > 0")


def check_target(source: DecoderConfig, target: DecoderConfig, heads: bool) -> None:
    """The target must be the source with fewer FFN units (and KV groups, with `heads`) per layer."""
    same = ("d_model", "n_layers", "head_dim", "rows", "qk_norm", "qk_norm_after_rope", "tie_embeddings")
    for key in same:
        if getattr(source, key) != getattr(target, key):
            raise ValueError(f"pruning keeps {key}: the source {source.name} has {getattr(source, key)}, the target "
                             f"{target.name} {getattr(target, key)}")
    for i, (s, t) in enumerate(zip(source.layer_shapes(), target.layer_shapes())):
        if t.ffn_dim > s.ffn_dim or t.q_heads > s.q_heads or t.kv_heads > s.kv_heads:
            raise ValueError(f"the target {target.name} is larger than the source {source.name} at layer {i} "
                             f"(FFN {t.ffn_dim} vs {s.ffn_dim}, heads {t.q_heads}/{t.kv_heads} vs "
                             f"{s.q_heads}/{s.kv_heads})")
        if (t.q_heads, t.kv_heads) != (s.q_heads, s.kv_heads):
            if not heads:
                raise ValueError(f"the target {target.name} has fewer attention heads than {source.name} at layer "
                                 f"{i}; set heads=true to prune heads too")
            if t.q_heads * s.kv_heads != s.q_heads * t.kv_heads:
                raise ValueError(f"head pruning removes whole KV groups: layer {i} has {s.q_heads // s.kv_heads} "
                                 f"query heads per KV head in {source.name} but {t.q_heads}/{t.kv_heads} in "
                                 f"{target.name}")


# ---- scores and masks ------------------------------------------------------------------------------------------

def magnitude_scores(model: Decoder) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: FFN unit j scores ||W_gate[j]|| * ||W_up[j]|| * ||W_down[:, j]|| (the size of its contribution);
    KV group g scores the norm of all its query, key, value and output weights."""
    ffn, groups = [], []
    for block in model.layers:
        gate, up = block.ffn.proj_1.weight.detach().float().chunk(2, dim=0)  # (F, d) each
        down = block.ffn.proj_2.weight.detach().float()  # (d, F)
        ffn.append(gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
        q, k, v, o = _head_weights(block.attn)
        per_group = q.square().sum((1, 2, 3)) + k.square().sum((1, 2)) + v.square().sum((1, 2)) \
            + o.square().sum((0, 2, 3))
        groups.append(per_group.sqrt())
    return ffn, groups


def _head_weights(attn: nn.Module) -> tuple[torch.Tensor, ...]:
    """q (G, q_per_group, hd, d), k and v (G, hd, d), o (d, G, q_per_group, hd) for G KV groups."""
    n_q, n_kv, hd = attn.n_q, attn.n_kv, attn.head_dim
    w = attn.qkv_proj.weight.detach().float()
    q, k, v = w.split([n_q * hd, n_kv * hd, n_kv * hd])
    d = w.shape[1]
    o = attn.out_proj.weight.detach().float()
    return (q.view(n_kv, n_q // n_kv, hd, d), k.view(n_kv, hd, d), v.view(n_kv, hd, d),
            o.view(d, n_kv, n_q // n_kv, hd))


def soft_top_k(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """A mask in (0, 1) summing to k: `sigmoid((scores - tau) / temperature)`, tau found by bisection. Gradients
    reach every score through tau too (implicit differentiation: dtau/ds_i = w_i / sum(w), w = sigmoid')."""
    if k >= scores.numel():
        return torch.ones_like(scores)
    s = scores.detach()
    lo, hi = s.min() - 40 * temperature, s.max() + 40 * temperature  # mask sums ~n at lo, ~0 at hi
    for _ in range(60):
        mid = (lo + hi) / 2
        if torch.sigmoid((s - mid) / temperature).sum() > k:
            lo = mid
        else:
            hi = mid
    tau = (lo + hi) / 2
    m = torch.sigmoid((s - tau) / temperature)
    w = m * (1 - m)
    tau = tau + (w * (scores - s)).sum() / w.sum().clamp_min(1e-12)  # value tau, gradient of the implicit tau
    return torch.sigmoid((scores - tau) / temperature)


def hard_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, ascending (kept units stay in their original order)."""
    return scores.topk(k).indices.sort().values


@contextlib.contextmanager
def masked(model: Decoder, ffn: list[torch.Tensor], groups: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Run `model` with FFN hidden unit j of layer i scaled by ffn[i][j] (and the output of every query head of KV
    group g by groups[i][g]): hooks on the inputs of the down and output projections."""
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.ffn.proj_2.register_forward_pre_hook(_scale_input(lambda x, m=ffn[i]: x * m)))
        if groups is not None:
            attn = block.attn
            per_head = groups[i].repeat_interleave(attn.n_q // attn.n_kv)  # query head h reads KV head h // G

            def heads(x: torch.Tensor, m: torch.Tensor = per_head, hd: int = attn.head_dim) -> torch.Tensor:
                return (x.unflatten(-1, (-1, hd)) * m[:, None]).flatten(-2)  # (B, T, n_q * hd)

            hooks.append(attn.out_proj.register_forward_pre_hook(_scale_input(heads)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _scale_input(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    return lambda module, args: (fn(args[0]), *args[1:])


class Masks(nn.Module):
    """Learned mask logits: one per FFN hidden unit of each layer (and one per KV group with `heads`)."""

    def __init__(self, source: Decoder, target: DecoderConfig, heads: bool) -> None:
        super().__init__()
        ffn, groups = magnitude_scores(source)
        self.ffn_keep = [s.ffn_dim for s in target.layer_shapes()]
        self.group_keep = [s.kv_heads for s in target.layer_shapes()] if heads else None
        self.ffn = nn.ParameterList(nn.Parameter(_standardized_log(s)) for s in ffn)
        self.groups = nn.ParameterList(nn.Parameter(_standardized_log(s)) for s in groups) if heads else None

    def soft(self, temperature: float) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        ffn = [soft_top_k(s, k, temperature) for s, k in zip(self.ffn, self.ffn_keep)]
        groups = None if self.groups is None else [soft_top_k(s, k, temperature)
                                                    for s, k in zip(self.groups, self.group_keep)]
        return ffn, groups

    def keep(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        ffn = [hard_top_k(s.detach(), k) for s, k in zip(self.ffn, self.ffn_keep)]
        groups = None if self.groups is None else [hard_top_k(s.detach(), k)
                                                    for s, k in zip(self.groups, self.group_keep)]
        return ffn, groups


def _standardized_log(scores: torch.Tensor) -> torch.Tensor:
    logs = scores.clamp_min(1e-12).log()
    return ((logs - logs.mean()) / logs.std().clamp_min(1e-6)).detach()


def magnitude_keep(source: Decoder, target: DecoderConfig,
                   heads: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    ffn, groups = magnitude_scores(source)
    shapes = target.layer_shapes()
    return ([hard_top_k(s, t.ffn_dim) for s, t in zip(ffn, shapes)],
            [hard_top_k(s, t.kv_heads) for s, t in zip(groups, shapes)] if heads else None)


def temperature_at(cfg: PruneConfig, step: int) -> float:
    """Geometric annealing from the first temperature (step 0) to the last (step `steps - 1`)."""
    first, last = cfg.temperature
    return first * math.exp(math.log(last / first) * step / max(cfg.steps - 1, 1))


def learn_masks(source: Decoder, target: DecoderConfig, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                cfg: PruneConfig, on_step: Callable[[int, float, float], None] | None = None) -> Masks:
    """Train soft-top-k mask logits on the LM loss of the masked, frozen source model."""
    source.requires_grad_(False)
    masks = Masks(source, target, cfg.heads).to(source.embed.weight.device)
    optimizer = torch.optim.Adam(masks.parameters(), lr=cfg.lr)
    for step in range(cfg.steps):
        temperature = temperature_at(cfg, step)
        inputs, labels = next(batches)
        with masked(source, *masks.soft(temperature)):
            loss, _, _ = lm_loss(source(inputs), labels, 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, loss.item(), temperature)
    return masks


# ---- cutting the kept units out --------------------------------------------------------------------------------

def prune_state(source: Decoder, ffn_keep: list[torch.Tensor],
                group_keep: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The source's parameters with only the kept FFN units (rows of the gate and up halves of proj_1, columns of
    proj_2) and KV groups (their query, key and value rows of qkv_proj, their columns of out_proj)."""
    state = {k: v.detach().clone() for k, v in source.named_parameters()}
    for i, block in enumerate(source.layers):
        prefix = f"layers.{i}."
        units = ffn_keep[i]
        gate, up = state[prefix + "ffn.proj_1.weight"].chunk(2, dim=0)
        state[prefix + "ffn.proj_1.weight"] = torch.cat([gate[units], up[units]])
        state[prefix + "ffn.proj_2.weight"] = state[prefix + "ffn.proj_2.weight"][:, units]
        if group_keep is not None:
            attn = block.attn
            per_group = attn.n_q // attn.n_kv
            kept = group_keep[i]
            q_heads = (kept[:, None] * per_group + torch.arange(per_group)).flatten()
            rows = torch.cat([_head_rows(q_heads, attn.head_dim),
                              attn.n_q * attn.head_dim + _head_rows(kept, attn.head_dim),
                              (attn.n_q + attn.n_kv) * attn.head_dim + _head_rows(kept, attn.head_dim)])
            state[prefix + "attn.qkv_proj.weight"] = state[prefix + "attn.qkv_proj.weight"][rows]
            state[prefix + "attn.out_proj.weight"] = state[prefix + "attn.out_proj.weight"][:, _head_rows(
                q_heads, attn.head_dim)]
    return state


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def hard_masks(source: Decoder, ffn_keep: list[torch.Tensor],
               group_keep: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """0/1 masks over the source's units equal to keeping `ffn_keep` / `group_keep` (for `masked`)."""
    ffn = [torch.zeros(b.ffn.proj_2.weight.shape[1]).index_fill_(0, k, 1.0) for b, k in zip(source.layers, ffn_keep)]
    groups = None if group_keep is None else [torch.zeros(b.attn.n_kv).index_fill_(0, k, 1.0)
                                              for b, k in zip(source.layers, group_keep)]
    return ffn, groups
