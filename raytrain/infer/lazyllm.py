"""LazyLLM (Fu et al., arXiv 2407.14057): dynamic token pruning in prefill and decode, with an Aux Cache.

At every generation step, at each boundary layer b of the schedule, the tokens entering b are ranked by the
attention that the current last token paid them at layer b-1 (softmax probabilities of that one query row, averaged
over query heads) and only `max(1, ceil(keep * n))` of them (the last token always among them; ties to the lower
position) go on to the deeper layers. Token sets are therefore nested across layers within a step.

Per sequence the state is (spec section 2.2): `depth[i]`, how many leading layers hold KV for token i (always a
boundary or L, never decreasing); `aux[i]`, the hidden state of a token entering layer `depth[i]` when that is < L
(the Aux Cache); and one KV slot per (layer, position). In a decode step a token selected at boundary b whose depth is
b is revived from the Aux Cache and computed from layer b on, so no (token, layer) pair is ever computed twice.

Only the last query row's probabilities are computed for scoring (one small product per boundary); attention itself
stays in `scaled_dot_product_attention`. Batch size is 1, as in the paper's measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from raytrain.config import ConfigError
from raytrain.models.decoder import Decoder
from raytrain.models.kv_cache import CachedAttention


@dataclass
class LazyConfig:
    boundaries: list[float] | None = None  # fractions of depth, layer max(1, floor(f * L)); None = [0.3, 0.6, 0.9]
    keep: Any = 0.7  # keep ratio at each boundary (a float, or one per boundary), relative to the incoming tokens
    layers: dict[int, float] | None = None  # explicit {layer: keep ratio}; replaces boundaries/keep
    min_prompt_tokens: int = 1024  # shorter prompts run the plain engine (scoring would cost more than it saves)
    dynamic: bool = True  # re-select at every decode step and revive from the Aux Cache; False = static ablation

    def schedule(self, n_layers: int) -> dict[int, float]:
        """{boundary layer: keep ratio}, validated against the model's depth."""
        if self.layers is not None:
            plan = {int(layer): float(r) for layer, r in self.layers.items()}
        else:
            fractions = self.boundaries if self.boundaries is not None else [0.3, 0.6, 0.9]
            ratios = self.keep if isinstance(self.keep, list) else [self.keep] * len(fractions)
            if len(ratios) != len(fractions):
                raise ConfigError(f"lazy.keep has {len(ratios)} ratios for {len(fractions)} boundaries")
            layers = [max(1, math.floor(f * n_layers)) for f in fractions]  # layer 0 has no previous layer
            if len(set(layers)) < len(layers):
                raise ConfigError(f"lazy boundaries {fractions} map to layers {layers} of a {n_layers}-layer model; "
                                  "use fewer or farther apart boundaries, or an explicit layers map")
            plan = dict(zip(layers, map(float, ratios)))
        for layer, r in plan.items():
            if not 1 <= layer < n_layers:
                raise ConfigError(f"lazy boundary at layer {layer}: must be within 1..{n_layers - 1}")
            if not 0 < r <= 1:
                raise ConfigError(f"lazy keep ratio {r} at layer {layer}: must be in (0, 1] (0 keeps no token)")
        return dict(sorted(plan.items()))


def select(positions: torch.Tensor, scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices (ascending) into `positions` (ascending) of the tokens that survive a boundary: the last token, plus
    the highest-scoring others up to `max(1, ceil(keep * n))` in all, ties going to the lower position."""
    n = positions.numel()
    m = max(1, math.ceil(keep * n - 1e-9))  # the epsilon keeps 0.7 * 10 at 7, not 8
    ranked = scores.clone()
    ranked[-1] = float("inf")
    order = torch.sort(-ranked, stable=True).indices  # stable: equal scores keep position order
    return order[:m].sort().values


class LazySequence:
    """One request's LazyLLM state; `prefill` then `decode` return next-token logits like the plain engine."""

    def __init__(self, model: Decoder, prompt: list[int], config: LazyConfig, capacity: int) -> None:
        self.model, self.config = model, config
        self.n_layers = len(model.layers)
        self.schedule = config.schedule(self.n_layers)
        device, d = model.embed.weight.device, model.cfg.d_model
        self.prompt = torch.tensor(prompt, device=device)
        self.capacity = capacity
        self.depth = torch.zeros(capacity, dtype=torch.long, device=device)
        self.aux = torch.zeros(capacity, d, dtype=model.embed.weight.dtype, device=device)
        self.store = _LazyKV(model, capacity)
        self.computed = torch.zeros(capacity, self.n_layers, dtype=torch.int32, device=device)  # per (token, layer)
        self.key_sets: list[torch.Tensor] = []  # the last step's attended positions per layer (for inspection)
        self.revived = 0
        self.length = 0  # tokens in the context so far

    # ---- prefill --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        n = self.prompt.numel()
        X = torch.arange(n, device=self.prompt.device)
        h = self.model.embed(self.prompt)[None]  # (1, n, d)
        for layer, block in enumerate(self.model.layers):
            if layer in self.schedule:
                keep = select(X, self.store.scores, self.schedule[layer])
                parked = _complement(keep, X.numel())
                self.aux[X[parked]] = h[0, parked]
                self.depth[X[parked]] = layer
                X, h = X[keep], h[:, keep]
            h = self._layer(block, layer, h, X, X, prefill=True)
        self.depth[X] = self.n_layers
        self.length = n
        return self.model.logits(h[:, -1])  # (1, V)

    # ---- decode ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        p = self.length
        if p >= self.capacity:
            raise ValueError(f"LazyLLM state holds {self.capacity} tokens")
        device = self.prompt.device
        X = torch.arange(p + 1, device=device)  # every context token, and the new one
        A = torch.tensor([p], device=device)  # tokens computed in this step (ascending positions)
        h = self.model.embed(token.view(1, 1))  # (1, |A|, d)
        for layer, block in enumerate(self.model.layers):
            if layer in self.schedule:
                X, A, h = self._boundary(layer, X, A, h)
            h = self._layer(block, layer, h, A, X, prefill=False)
            self.depth[A] = layer + 1
        self.length = p + 1
        return self.model.logits(h[:, -1])  # the new token is the last of A

    def _boundary(self, layer: int, X: torch.Tensor, A: torch.Tensor,
                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-select the context at a boundary: park computed tokens that fall out, revive parked ones that come
        back in (dynamic mode); in static mode keep exactly the tokens that prefill computed this deep."""
        if self.config.dynamic:
            X = X[select(X, self.store.scores, self.schedule[layer])]
        else:  # static ablation: what prefill computed this deep, plus this step's token (A is just that token)
            X = torch.cat([X[self.depth[X] > layer], A])
        stays = torch.isin(A, X)
        self.aux[A[~stays]] = h[0, ~stays]
        self.depth[A[~stays]] = layer
        A, h = A[stays], h[:, stays]
        revive = X[(self.depth[X] == layer) & ~torch.isin(X, A)]
        if revive.numel():
            self.revived += revive.numel()
            A, order = torch.cat([revive, A]).sort()
            h = torch.cat([self.aux[revive][None], h], dim=1)[:, order]
        return X, A, h

    # ---- one layer on a token subset -------------------------------------------------------------------------

    def _layer(self, block: torch.nn.Module, layer: int, h: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
               prefill: bool) -> torch.Tensor:
        """Run `block` for the tokens at positions `queries` (hidden states `h`) attending to `keys`."""
        self.store.prepare(layer, queries, keys, score=layer + 1 in self.schedule, prefill=prefill)
        cos, sin = self.model.rope(queries[None])
        self.computed[queries, layer] += 1
        self.key_sets = [*self.key_sets[:layer], keys]
        return block(h, cos, sin, self.store, layer)

    # ---- reporting --------------------------------------------------------------------------------------------

    def prompt_fraction_computed(self) -> float:
        """Σ_i depth_i / (n · L) over prompt tokens: the share of prompt (token, layer) pairs ever computed."""
        n = self.prompt.numel()
        return float(self.depth[:n].sum()) / (n * self.n_layers)


class _LazyKV(CachedAttention):
    """Per-layer K/V indexed by position, answering attention's `update` for the current token subsets."""

    def __init__(self, model: Decoder, capacity: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * len(model.layers)
        self.values: list[torch.Tensor | None] = [None] * len(model.layers)
        self.capacity = capacity
        self.scores = torch.empty(0)

    def prepare(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, score: bool, prefill: bool) -> None:
        self.layer, self.queries, self.key_positions = layer, queries, keys
        self.score, self.prefill = score, prefill

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        if self.keys[layer] is None:
            _, H, _, D = k.shape
            self.keys[layer] = k.new_zeros(1, H, self.capacity, D)
            self.values[layer] = v.new_zeros(1, H, self.capacity, D)
        self.keys[layer][:, :, self.queries] = k
        self.values[layer][:, :, self.queries] = v
        if self.prefill:  # queries are the keys, in position order: plain causal attention
            K, V, mask, causal = k, v, None, k.shape[2] > 1
        else:
            K, V = self.keys[layer][:, :, self.key_positions], self.values[layer][:, :, self.key_positions]
            mask, causal = self.key_positions[None, :] <= self.queries[:, None], False  # by original position
        if self.score:
            self.scores = last_row_scores(q[0, :, -1], K[0])
        return K, V, mask, causal


def last_row_scores(q_last: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q_last (n_q, hd), keys (n_kv, n, hd) -> (n,): the last query's softmax attention over the keys, averaged over
    query heads (KV heads expanded to the query heads they serve). Never builds an (n x n) map."""
    n_kv, hd = keys.shape[0], keys.shape[-1]
    grouped = q_last.view(n_kv, -1, hd).to(keys.dtype)  # query heads 4j..4j+3 read KV head j (repeat_interleave)
    logits = torch.einsum("kgd,knd->kgn", grouped, keys).float() / math.sqrt(hd)  # (n_kv, group, n)
    return logits.softmax(-1).mean((0, 1))


def _complement(indices: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool, device=indices.device)
    keep[indices] = True
    return (~keep).nonzero().squeeze(1)
