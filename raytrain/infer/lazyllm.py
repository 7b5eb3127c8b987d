"""LazyLLM (Fu et al., arXiv 2407.14057): dynamic token pruning in prefill and decode, with an Aux Cache.

At every generation step, at each boundary layer b of the schedule, the tokens entering b are ranked by the
attention that the current last token paid them at layer b-1 (softmax probabilities of that one query row in fp32,
averaged over query heads) and only `max(1, ceil(keep * n))` of them (the last token always among them, and every
generated token with `protect_generated`; ties to the lower position) go on to the deeper layers. Token sets are
therefore nested across layers within a step.

Per sequence the state is (spec section 2.2): `depth[i]`, how many leading layers hold KV for token i (always a
boundary or L, never decreasing); the Aux Cache, the hidden state of each token with `depth[i] < L` entering layer
`depth[i]` (an entry is freed when its token is revived); and one KV slot per (layer, position). In a decode step a
token selected at boundary b whose depth is b is revived from the Aux Cache and computed from layer b on, so no
(token, layer) pair is ever computed twice.

The hot path avoids host synchronisation and copies of the cache. Prefill is sync-free: every set size follows from
the prompt length and the schedule, so selection is a sort and a gather. Decode attends over the cache in place (a
view of positions 0..p, masked to the selected tokens after the first boundary; never a gathered copy) and syncs
once per boundary, to learn how many tokens are parked and revived. Only the last query row's probabilities are
computed for scoring; attention itself stays in `scaled_dot_product_attention`. Batch size is 1, as in the paper.

Never slower (`never_slower`): on a small model or a short prompt the scoring, selection and gathers can cost more
than the pruned compute saves, so the first request of each power-of-two prompt length class times this schedule's
prefill against the plain prefill on the model's own device (random tokens: prefill cost does not depend on them)
and runs the plain engine's own sequence (`PlainSequence`) for that class unless the schedule is at least `MARGIN`
faster, so a length class LazyLLM does not speed up costs what plain generation costs, plus one measurement.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from raytrain.config import ConfigError
from raytrain.infer.model_runner import PlainSequence
from raytrain.models.decoder import Decoder
from raytrain.models.kv_cache import CachedAttention

log = logging.getLogger(__name__)
MARGIN = 0.05  # the schedule must beat plain prefill by this fraction to be used (timing noise)


@dataclass
class LazyConfig:
    boundaries: list[float] | None = None  # fractions of depth, layer max(1, floor(f * L)); None = [0.3, 0.6, 0.9]
    keep: Any = 0.7  # keep ratio at each boundary (a float, or one per boundary), relative to the incoming tokens
    layers: dict[int, float] | None = None  # explicit {layer: keep ratio}; replaces boundaries/keep
    min_prompt_tokens: int = 1024  # shorter prompts run the plain engine (scoring would cost more than it saves)
    dynamic: bool = True  # re-select at every decode step and revive from the Aux Cache; False = static ablation
    protect_generated: bool = False  # generated tokens survive every boundary (the spec's default prunes them)
    never_slower: bool = True  # run the plain engine for prompt lengths where this schedule measured no faster

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


def kept_count(n: int, keep: float) -> int:
    """`max(1, ceil(keep * n))`; the epsilon keeps 0.7 * 10 at 7, not 8."""
    return max(1, math.ceil(keep * n - 1e-9))


def select(scores: torch.Tensor, keep: float, protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, parked) indices into `scores` (one per token, in position order): the last `protected` tokens, plus
    the highest-scoring others up to `kept_count(n, keep)` in all, ties going to the lower position. `kept` is
    ascending. No host synchronisation: the sizes follow from n."""
    n = scores.numel()
    m = max(kept_count(n, keep), protected)
    ranked = scores.clone()
    ranked[n - protected:] = float("inf")
    order = torch.sort(-ranked, stable=True).indices  # stable: equal scores keep position order
    return order[:m].sort().values, order[m:]


def last_row_scores(q_last: torch.Tensor, keys: torch.Tensor, attended: torch.Tensor | None = None) -> torch.Tensor:
    """q_last (n_q, hd), keys (n_kv, n, hd) -> (n,): the last query's softmax attention over the keys in fp32,
    averaged over query heads (KV heads expanded to the query heads they serve); `attended` (n,) bool masks keys
    out. Never builds an (n x n) map."""
    n_kv, hd = keys.shape[0], keys.shape[-1]
    grouped = q_last.float().view(n_kv, -1, hd)  # query heads 4j..4j+3 read KV head j (repeat_interleave)
    logits = torch.einsum("kgd,knd->kgn", grouped, keys.float()) / math.sqrt(hd)  # (n_kv, group, n)
    if attended is not None:
        logits = logits.masked_fill(~attended, float("-inf"))
    return logits.softmax(-1).mean((0, 1))


class AuxCache:
    """The Aux Cache: the hidden state of each parked token (depth < L) entering layer depth[i]. Parking appends
    rows, reviving frees them, and the buffer is compacted to the live rows whenever it would exceed twice their
    number, so its memory follows the parked tokens rather than the context (spec section 6, "Memory")."""

    def __init__(self, positions: int, d_model: int, dtype: torch.dtype, device: torch.device) -> None:
        self.row = torch.full((positions,), -1, dtype=torch.long, device=device)  # position -> row; -1: none
        self.states = torch.empty(0, d_model, dtype=dtype, device=device)
        self.positions = torch.empty(0, dtype=torch.long, device=device)
        self.used = 0  # rows written, live or freed
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def reserve(self, rows: int) -> None:
        if rows > self.states.shape[0]:
            self.states = _grown(self.states, rows, self.used)
            self.positions = _grown(self.positions, rows, self.used)

    def park(self, positions: torch.Tensor, states: torch.Tensor) -> None:
        """positions (j,), states (j, d)."""
        j = positions.numel()
        if self.used + j > self.states.shape[0]:
            self._compact()
            self.reserve(2 * (self.live + j) if self.live + j > self.states.shape[0] else 0)
        self.states[self.used:self.used + j] = states
        self.positions[self.used:self.used + j] = positions
        self.row[positions] = torch.arange(self.used, self.used + j, device=positions.device)
        self.used, self.live = self.used + j, self.live + j

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The states of `positions` (all parked), freeing their entries."""
        states = self.states[self.row[positions]]
        self.row[positions] = -1
        self.live -= positions.numel()
        if self.states.shape[0] > 2 * self.live:
            self._compact()
        return states

    def parked(self) -> torch.Tensor:
        """Positions that hold an entry."""
        return self.positions[self._alive()]

    def _alive(self) -> torch.Tensor:
        """Indices of the live rows: those their position still points to (a freed row's position may since have
        been parked again, in another row)."""
        rows = torch.arange(self.used, device=self.row.device)
        return torch.nonzero_static(self.row[self.positions[:self.used]] == rows, size=self.live).squeeze(1)

    def _compact(self) -> None:
        """Live rows only, in new buffers of exactly their size."""
        keep = self._alive()
        self.states, self.positions = self.states[keep], self.positions[keep]
        self.row[self.positions] = torch.arange(self.live, device=self.row.device)
        self.used = self.live


def _grown(buffer: torch.Tensor, rows: int, used: int) -> torch.Tensor:
    out = buffer.new_empty(rows, *buffer.shape[1:])
    out[:used] = buffer[:used]
    return out


class LazySequence:
    """One request's LazyLLM state; `prefill` then `decode` return next-token logits like the plain engine.
    `count_computations` keeps a (position, layer) counter of computed pairs (tests; one small kernel per layer)."""

    def __init__(self, model: Decoder, prompt: list[int], config: LazyConfig, capacity: int,
                 count_computations: bool = False) -> None:
        self.model, self.config = model, config
        self.n_layers = len(model.layers)
        self.revived = 0
        # a length class where the schedule measured no faster runs the plain engine's sequence, and nothing else
        self.plain = (PlainSequence(model, prompt, capacity)
                      if config.never_slower and not pays_off(model, config, len(prompt)) else None)
        if self.plain is not None:
            return
        device, d = model.embed.weight.device, model.cfg.d_model
        self.prompt = torch.tensor(prompt, device=device)
        self.capacity = capacity
        self.schedule = config.schedule(self.n_layers)
        self.positions = torch.arange(capacity, device=device)
        self.depth = torch.zeros(capacity, dtype=torch.long, device=device)
        self.aux = AuxCache(capacity, d, model.embed.weight.dtype, device)
        self.store = _LazyKV(model, capacity, zeroed=bool(self.schedule))
        self.computed = (torch.zeros(capacity, self.n_layers, dtype=torch.int32, device=device)
                         if count_computations else None)
        self.key_sets: list[torch.Tensor] = [self.positions[:0]] * self.n_layers  # last step's attended positions
        self.prefill_sets: dict[int, torch.Tensor] = {}  # the static ablation's sets: what prefill kept per boundary
        self.length = 0  # tokens in the context so far

    # ---- prefill --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        if self.plain is not None:
            return self.plain.prefill()
        n = self.prompt.numel()
        X = self.positions[:n]
        sizes = [n]
        for keep in self.schedule.values():
            sizes.append(kept_count(sizes[-1], keep))
        self.aux.reserve(n - sizes[-1])
        self.store.prefill(X, 0, {b - 1 for b in self.schedule})
        cos, sin = self.model.rope_cos[None, None, :n], self.model.rope_sin[None, None, :n]
        h = self.model.embed(self.prompt)[None]  # (1, n, d)
        for layer, block in enumerate(self.model.layers):
            if layer in self.schedule:
                kept, parked = select(self.store.scores, self.schedule[layer])
                self.aux.park(X[parked], h[0, parked])
                self.depth[X[parked]] = layer
                X, h = X[kept], h[:, kept]
                self.prefill_sets[layer] = X
                self.store.prefill(X, None, self.store.score_layers)
                cos, sin = self.model.rope(X[None])
            h = self._layer(block, layer, h, X, X, cos, sin)
        self.depth[X] = self.n_layers
        self.length = n
        return self.model.logits(h[:, -1])  # (1, V)

    # ---- decode ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        if self.plain is not None:
            return self.plain.decode(token)
        p = self.length
        if p >= self.capacity:
            raise ValueError(f"LazyLLM state holds {self.capacity} tokens")
        scored = {b - 1 for b in self.schedule} if self.config.dynamic else set()
        X = self.positions[:p + 1]  # every context token, and the new one
        A = self.positions[p:p + 1]  # tokens computed in this step (ascending positions)
        self.store.decode(A, p, None, scored)
        cos0, sin0 = self.model.rope_cos[None, None, p:p + 1], self.model.rope_sin[None, None, p:p + 1]
        cos, sin = cos0, sin0
        h = self.model.embed(token.view(1, 1))  # (1, |A|, d)
        for layer, block in enumerate(self.model.layers):
            if layer in self.schedule:
                X, A, h, attended = self._boundary(layer, X, A, h, p)
                self.store.decode(A, p, attended, scored)
                cos, sin = self.model.rope(A[None]) if A.numel() > 1 else (cos0, sin0)
            h = self._layer(block, layer, h, A, X, cos, sin)
        self.depth[A] = self.n_layers
        self.length = p + 1
        return self.model.logits(h[:, -1])  # the new token is the last of A

    def _boundary(self, layer: int, X: torch.Tensor, A: torch.Tensor, h: torch.Tensor,
                  p: int) -> tuple[torch.Tensor, ...]:
        """Re-select the context at a boundary: park computed tokens that fall out, revive parked ones that come
        back in (dynamic mode); in static mode keep exactly the tokens that prefill kept this deep. Returns the new
        X, A, h and X as a (p + 1,) membership mask."""
        if not self.config.dynamic:  # static ablation: A is just this step's token, which is never pruned
            X = torch.cat([self.prefill_sets[layer], self.positions[self.prompt.numel():p + 1]])
            return X, A, h, torch.zeros(p + 1, dtype=torch.bool, device=X.device).index_fill_(0, X, True)
        protected = p + 1 - self.prompt.numel() if self.config.protect_generated else 1
        kept, _ = select(self.store.scores[X], self.schedule[layer], protected)
        X = X[kept]
        attended = torch.zeros(p + 1, dtype=torch.bool, device=X.device).index_fill_(0, X, True)
        stays = attended[A]
        revive = self.depth[X] == layer  # depths of A are only written at the end of the step, so A is not here
        n_parked, n_revived = torch.stack([(~stays).sum(), revive.sum()]).tolist()  # the boundary's one sync
        if n_parked:
            parked = torch.nonzero_static(~stays, size=n_parked).squeeze(1)
            self.aux.park(A[parked], h[0, parked])
            self.depth[A[parked]] = layer
            kept_a = torch.nonzero_static(stays, size=A.numel() - n_parked).squeeze(1)
            A, h = A[kept_a], h[:, kept_a]
        if n_revived:
            back = X[torch.nonzero_static(revive, size=n_revived).squeeze(1)]
            self.revived += n_revived
            A, order = torch.cat([back, A]).sort()
            h = torch.cat([self.aux.take(back)[None], h], dim=1)[:, order]
        return X, A, h, attended

    # ---- one layer on a token subset -------------------------------------------------------------------------

    def _layer(self, block: torch.nn.Module, layer: int, h: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Run `block` for the tokens at positions `queries` (hidden states `h`) attending to `keys`."""
        if self.computed is not None:
            self.computed[queries, layer] += 1
        self.key_sets[layer] = keys
        return block(h, cos, sin, self.store, layer)

    # ---- reporting --------------------------------------------------------------------------------------------

    def prompt_fraction_computed(self) -> float:
        """Σ_i depth_i / (n · L) over prompt tokens: the share of prompt (token, layer) pairs ever computed."""
        if self.plain is not None:
            return self.plain.prompt_fraction_computed()
        n = self.prompt.numel()
        return float(self.depth[:n].sum()) / (n * self.n_layers)


class _LazyKV(CachedAttention):
    """Per-layer K/V indexed by position, answering attention's `update` for the current token subsets.

    Prefill: the queries are the keys (in position order), so attention is plain causal SDPA over the new k, v.
    Decode: the keys are the cache itself, positions 0..p as a view; after a boundary a boolean mask keeps the
    selected positions (and, for revived tokens, causality by original position). Layers listed in `score_layers`
    also leave the last query's attention probabilities in `scores`."""

    def __init__(self, model: Decoder, capacity: int, zeroed: bool) -> None:
        self.keys: list[torch.Tensor | None] = [None] * len(model.layers)
        self.values: list[torch.Tensor | None] = [None] * len(model.layers)
        self.capacity = capacity
        # with boundaries, masked positions below p may never have been written at a layer: zeros, not NaN garbage
        # (0 x NaN poisons attention); without, nothing unwritten is ever read (the plain path allocates as KVCache)
        self.allocate = torch.Tensor.new_zeros if zeroed else torch.Tensor.new_empty
        self.scores = torch.empty(0)
        self.score_layers: set[int] = set()

    def prefill(self, queries: torch.Tensor, start: int | None, score_layers: set[int]) -> None:
        """`start`: the queries are positions start.. (a slice write), or None (an index write)."""
        self.queries, self.start, self.upto, self.score_layers = queries, start, None, score_layers
        self.attended, self.mask, self.causal = None, None, queries.numel() > 1

    def decode(self, queries: torch.Tensor, p: int, attended: torch.Tensor | None, score_layers: set[int]) -> None:
        """`attended` (p + 1,) bool: the positions the queries may see; None: all of 0..p."""
        self.queries, self.upto, self.attended, self.score_layers = queries, p + 1, attended, score_layers
        self.start = p if queries.numel() == 1 else None  # this step's own token: a slice write
        self.causal = False
        if attended is None:
            self.mask = None  # one query, every key up to itself
        elif queries.numel() == 1:
            self.mask = attended[None, None, None]  # (1, 1, 1, p + 1)
        else:  # revived tokens see the selected keys up to their own position
            keys = torch.arange(p + 1, device=queries.device)
            self.mask = (attended[None, :] & (keys[None, :] <= queries[:, None]))[None, None]

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        if self.keys[layer] is None:
            _, H, _, D = k.shape
            self.keys[layer] = self.allocate(k, (1, H, self.capacity, D))
            self.values[layer] = self.allocate(v, (1, H, self.capacity, D))
        K, V = self.keys[layer], self.values[layer]
        if self.start is not None:
            K[:, :, self.start:self.start + k.shape[2]] = k
            V[:, :, self.start:self.start + k.shape[2]] = v
        else:
            K.index_copy_(2, self.queries, k)
            V.index_copy_(2, self.queries, v)
        if self.upto is not None:
            k, v = K[:, :, :self.upto], V[:, :, :self.upto]
        if layer in self.score_layers:
            self.scores = last_row_scores(q[0, :, -1], k[0], self.attended)
        return k, v, self.mask, self.causal


_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(schedule, length, ...): bool}


def pays_off(model: Decoder, config: LazyConfig, prompt_tokens: int) -> bool:
    """Whether `config`'s schedule prefills faster than the plain engine's sequence on `model` for prompts of this
    length class (the largest power of two <= prompt_tokens), timed once per class on the model's device."""
    schedule = config.schedule(len(model.layers))
    length = 1 << max(prompt_tokens, 1).bit_length() - 1
    weight = model.embed.weight
    key = (tuple(schedule.items()), length, weight.device, weight.dtype)
    verdicts = _VERDICTS.setdefault(model, {})
    if key not in verdicts:
        lazy = LazyConfig(layers=schedule, never_slower=False)
        prompt = torch.randint(0, model.cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"plain": [], "lazy": []}
        for _ in range(4):  # the first round warms up; rounds alternate, so drifting load hits both alike
            for name, cfg in (("plain", None), ("lazy", lazy)):
                times[name].append(prefill_seconds(model, prompt.tolist(), cfg))
        plain_s, lazy_s = (statistics.median(times[k][1:]) for k in ("plain", "lazy"))
        verdicts[key] = lazy_s < (1 - MARGIN) * plain_s
        log.info("LazyLLM schedule %s at %d tokens: prefill %.2f ms vs %.2f ms plain; %s", schedule, length,
                 1e3 * lazy_s, 1e3 * plain_s, "lazy" if verdicts[key] else "the plain engine for this length")
    return verdicts[key]


def prefill_seconds(model: Decoder, prompt: list[int], config: LazyConfig | None) -> float:
    """Wall time of one prefill to next-token logits: LazyLLM with `config`, or the plain engine's sequence (None)."""
    device = model.embed.weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    runner = (PlainSequence(model, prompt, len(prompt)) if config is None
              else LazySequence(model, prompt, config, len(prompt)))
    runner.prefill()[0, 0].item()
    return time.perf_counter() - start
