"""Superposition prompting (Merth et al., arXiv 2404.06910): RAG over many documents as parallel prompt paths that are
scored, pruned and joined, on the decoder family. Spec: ../shared/specs/superposition.md.

One request (`Superposer.prefill`: the paper's Alg. 2 and 3, with path caching and path parallelism):
1. the preamble p is computed at positions 0..|p|-1 (or taken from the path cache);
2. every document path d_i is computed over p at its equilibrium positions (`forkjoin.fork_positions`), all of them
   in one batched forward (right-padded, the padding masked), or taken from the path cache; each path's KV is kept
   with its mean log-likelihood doc_ll[i] (its tokens 2.. given p and its own earlier tokens);
3. a copy of the query q runs over each prefix p + d_i, all copies in one batched forward; query_ll[i] is the mean
   log-likelihood of the copy's tokens 2..;
4. score[i] = query_ll[i] + w * doc_ll[i] (the official code's form of Eq. 2), or with `saliency: attention` the
   attention the query copy pays its document (mean over layers and heads, summed over token pairs), or with
   `saliency: random` a draw seeded by the request's tokens (the official code's ablation); the top-k paths are kept,
   ties to the lower index, and the others' KV is dropped;
5. the context is KV_p + (KV_di + KV_qi for each kept i, in document order); the postamble t runs over it, its last
   logits give the first response token, and decoding continues over that context, token m at position
   q0 + |q| + |t| + m (the engine's decode batch, `Context.next_position`). With `attenuation` T (an ablation of
   the official code, off by default) the postamble and every answer token add (score_i - best) / T to the attention
   logits of kept path i's keys (`Context.key_bias`, carried into the engine's KV slot).
With `hops` > 1 (iterative superposition) every round but the last moves its best path's documents into the prefix,
where they keep their positions, and the next fork starts one past the prefix's highest position (the official
MuSiQue flow, one document per round); only the first round uses the path cache, since later forks are conditioned
on the moved documents.

`method: prompt_cache` runs the spec's baseline instead (Prompt Cache, Gim et al.): the preamble and each document are
modules computed alone (no preamble -> document edge) at left-aligned positions and cached; one query and the
postamble attend to all of them, nothing is scored or pruned (`forkjoin.prompt_cache_layout` is its oracle).

The batched forwards are `path_forward.PathForward`'s: row b's new tokens see their own past (the shared prefix, then
the row's own right-padded segment) and, causally, the row's earlier new tokens, so paths never see each other; small
ones (the query copies, the postamble) are CUDA graphs on the GPU (`graph_tokens`). A segment's KV is one token-major
tensor, each token's row holding every layer's keys and values (`KVLayout`): joining, padding and splitting segments
is then one operation for all layers, not one per layer and path, which matters when a request has 50 paths, 32
layers and each operation is a kernel launch.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch

from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.forkjoin import POSITIONS, Fork, ForkJoinPrompt, fork_positions, path_groups
from raytrain.infer.path_cache import PathCache, digest
from raytrain.infer.path_forward import KVLayout, PathForward, Segment
from raytrain.models.decoder import Decoder

METHODS = ("superposition", "prompt_cache")
SALIENCY = ("bayesian", "attention", "random")
CACHE_POLICIES = ("keyed", "off")
LOGPROB_CHUNK = 2048  # token positions per output-head product when scoring (bounds the (tokens, vocab) logits)


@dataclass
class SuperpositionConfig:
    enabled: bool = False  # requests with documents run through superposition; off: naive RAG (one prompt)
    method: str = "superposition"  # or prompt_cache: the spec's baseline (documents as independent cached modules,
    # one query over all of them, nothing pruned); top_k, positions, saliency and hops are then unused
    top_k: int = 1  # paths kept after pruning; 0 = every path (no pruning)
    positions: str = "equilibrium"  # equilibrium | left_aligned
    saliency: str = "bayesian"  # bayesian (query + document likelihood) | attention (query -> document attention)
    # | random (the official code's ablation: scores drawn from a generator seeded by the request's tokens)
    doc_ll_weight: float = 1.0  # w in score = query_ll + w * doc_ll
    factor: int | None = None  # superposition factor: documents merged into paths of round(m / factor); None = m
    hops: int = 1  # fork-join rounds; each round but the last moves its best path into the prefix
    cache_policy: str = "keyed"  # keyed: document KV cached by (model, preamble, document, step, start) | off
    cache_mb: float = 1024.0  # path cache bound (least recently used entries are evicted)
    max_batch_tokens: int = 16384  # padded tokens per batched path forward; larger forks run in several
    interleave: bool = True  # in an engine, one stage (batched forward) of a superposed prefill per step, so that
    # running requests decode between stages; false: the whole prefill in one step
    graph_tokens: int = 4096  # batched forwards of at most this many padded new tokens (rows x tokens) run padded to
    # a shape bucket, each bucket a CUDA graph (GPU only); 0 = every forward eager
    attenuation: float | None = None  # an ablation, off (null) for the paper's method: the official code's score
    # temperature T; every kept path's keys then get the bias log softmax(score / T) - max = (score - best) / T in
    # the attention of the postamble and the answer (T = 0.01 in its attenuation configs; no effect at top_k = 1)

    def check(self, key: str = "superposition") -> None:
        if self.top_k < 0:
            raise ConfigError(f"{key}.top_k={self.top_k} must be >= 0 (0 keeps every path)")
        choices = {"method": METHODS, "positions": POSITIONS, "saliency": SALIENCY, "cache_policy": CACHE_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{key}.{name}={getattr(self, name)!r} is unknown; use {' or '.join(allowed)}")
        if self.factor is not None and self.factor < 1:
            raise ConfigError(f"{key}.factor={self.factor} must be >= 1 (or null: one document per path)")
        if self.graph_tokens < 0:
            raise ConfigError(f"{key}.graph_tokens={self.graph_tokens} must be >= 0 (0: eager forwards)")
        for name in ("hops", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}={getattr(self, name)} must be >= 1")
        if not self.cache_mb >= 0:
            raise ConfigError(f"{key}.cache_mb={self.cache_mb} must be >= 0")
        if self.method == "prompt_cache" and self.hops != 1:
            raise ConfigError(f"{key}.hops={self.hops}: method=prompt_cache has no hops (it prunes nothing)")
        if self.attenuation is not None and not self.attenuation > 0:
            raise ConfigError(f"{key}.attenuation={self.attenuation} must be > 0 (a temperature), or null (off)")
        if self.attenuation is not None and self.method == "prompt_cache":
            raise ConfigError(f"{key}.attenuation={self.attenuation}: method=prompt_cache scores no paths to "
                              "attenuate")


@dataclass
class PathKV:
    """A computed document path: its segment and its mean log-likelihood given the prefix (doc_ll)."""

    segment: Segment
    log_likelihood: float


@dataclass
class ForkResult:
    """One fork over a prefix: the paths' positions, their KV, their query copies' KV and their scores."""

    fork: Fork
    documents: list[PathKV]
    queries: list[Segment]
    scores: torch.Tensor  # (n,) float32
    cached: int  # paths taken from the path cache


@dataclass
class Selection:
    """What a superposed request kept, and why."""

    kept: list[int]  # documents of the kept paths (last round), ascending
    moved: list[int]  # documents moved into the prefix by earlier rounds, in round order
    scores: list[float]  # the last round's score of each path it forked (document order, moved ones left out)
    paths: int  # paths of the first fork
    cached: int  # of those, taken from the path cache


@dataclass
class KeptPaths:
    """A fork scored and pruned outside the engine (a sharded document store, `path_shards.py`): each kept path's
    document and query copy KV, in path order, the kept paths' scores, and where the postamble starts."""

    segments: list[Segment]
    scores: list[float]
    query_end: float
    selection: Selection


@dataclass
class Context:
    """A superposed prompt ready to decode from: the kept KV in context order, the postamble's last logits, and the
    real-valued position of the first generated token."""

    tokens: list[int]
    keys: list[torch.Tensor]  # per layer (n_kv, C, hd)
    values: list[torch.Tensor]
    logits: torch.Tensor  # (1, vocab_rows)
    next_position: float
    selection: Selection
    key_bias: torch.Tensor | None = None  # (C,) float32 on the device: each context key's attenuation (or None)

    @property
    def rope_offset(self) -> float:
        """Position minus KV index of every generated token (the context is packed at indices 0..C-1)."""
        return self.next_position - len(self.tokens)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (k = 0: all), ascending; equal scores go to the lower index."""
    order = torch.sort(-scores, stable=True).indices
    return sorted(order[:k or len(scores)].tolist())


class Superposer:
    """Runs superposed prefills for one model, with its path cache."""

    def __init__(self, model: Decoder, config: SuperpositionConfig, key: str = "superposition") -> None:
        config.check(key)
        self.model, self.config = model, config
        self.device = model.embed.weight.device
        self.cache = PathCache(int(config.cache_mb * 2 ** 20)) if config.cache_policy == "keyed" else None
        self.layout = KVLayout(model)
        self.forward = PathForward(model, self.layout, config.graph_tokens if self.device.type == "cuda" else 0)
        self.model_key = (model.cfg.name, str(model.embed.weight.dtype), id(model))

    # ---- checks before any compute ----------------------------------------------------------------------------

    def paths(self, prompt: ForkJoinPrompt) -> list[list[int]]:
        """Token ids of each path (documents merged by the superposition factor)."""
        groups = path_groups(len(prompt.documents), self.config.factor)
        return [[t for i in group for t in prompt.documents[i]] for group in groups]

    def bound(self, prompt: ForkJoinPrompt) -> int:
        """The most KV entries, or positions, the superposed prompt can need before its first generated token (the
        worst case over every pruning outcome): what the context window must hold besides the output."""
        lengths = sorted((len(p) for p in self.paths(prompt)), reverse=True)
        if self.config.method == "prompt_cache":
            return len(prompt.preamble) + sum(lengths) + len(prompt.query) + len(prompt.postamble)
        moved = sum(lengths[:self.config.hops - 1])
        kept = min(self.keep(prompt) or len(lengths), len(lengths) - (self.config.hops - 1))
        context = moved + sum(lengths[self.config.hops - 1:][:kept]) + kept * len(prompt.query)
        last_position = moved + lengths[0] + len(prompt.query)
        return len(prompt.preamble) + max(context, last_position) + len(prompt.postamble)

    def check(self, prompt: ForkJoinPrompt, max_new_tokens: int, max_len: int) -> None:
        """Refuse what cannot run: bad segments, too few documents for the hops, and a context or positions beyond
        `max_len` tokens."""
        prompt.check(self.model.cfg.vocab_size)
        paths, hops = len(path_groups(len(prompt.documents), self.config.factor)), self.config.hops
        if hops > paths:
            raise RaytrainError(f"documents: {paths} path(s); superposition with hops={hops} needs at least {hops}")
        needed = self.bound(prompt)
        if needed + max_new_tokens > max_len:
            raise RaytrainError(f"the superposed prompt may need {needed} tokens (or positions) + max_new_tokens "
                                f"({max_new_tokens}), beyond the model's context window of {max_len}")

    def keep(self, prompt: ForkJoinPrompt) -> int:
        """Paths the request keeps after pruning (0: every path)."""
        return self.config.top_k if prompt.top_k is None else prompt.top_k

    # ---- the request ------------------------------------------------------------------------------------------

    def prefill(self, prompt: ForkJoinPrompt) -> Context:
        """Fork, score, prune and join; the context to decode from."""
        return run_stages(self.stages(prompt))

    @torch.inference_mode()
    def stages(self, prompt: ForkJoinPrompt) -> Generator[None, None, Context]:
        """`prefill` as a generator that pauses after each batched forward that ran (the preamble, each fork's
        documents, each fork's query copies; the postamble's ends it), so that an engine can run decode steps in
        between; it returns the context."""
        if self.config.method == "prompt_cache":
            return (yield from self._modules(prompt))
        if prompt.kept_paths is not None:
            return (yield from self._rejoin(prompt))
        groups = path_groups(len(prompt.documents), self.config.factor)
        paths = self.paths(prompt)
        prefix, computed = self._preamble(prompt.preamble)
        if computed:
            yield
        remaining, moved = list(range(len(paths))), []
        for hop in range(self.config.hops):
            result = yield from self._fork(prefix, [paths[i] for i in remaining], prompt.query, cacheable=hop == 0)
            if hop == 0:
                cached = result.cached
            if hop == self.config.hops - 1:
                break
            best = top_k(result.scores, 1)[0]
            prefix = Segment.cat([prefix, result.documents[best].segment])
            moved.append(remaining.pop(best))
        kept = top_k(result.scores, self.keep(prompt))
        pairs = [(result.documents[i].segment, result.queries[i]) for i in kept]
        selection = Selection(kept=[d for i in kept for d in groups[remaining[i]]],
                              moved=[d for i in moved for d in groups[i]], scores=result.scores.tolist(),
                              paths=len(paths), cached=cached)
        return self._join(prefix, pairs, result.scores[kept].tolist(), prompt.postamble,
                          result.fork.query_start + len(prompt.query), selection)

    def _modules(self, prompt: ForkJoinPrompt) -> Generator[None, None, Context]:
        """The Prompt Cache baseline (spec section 6): the preamble and each path are modules computed alone, the
        paths at left-aligned positions |p|, |p| + 1, ... and cached by (model, path, start); then one forward of the
        query and the postamble over every module, nothing scored or pruned."""
        paths = self.paths(prompt)
        preamble, computed = self._preamble(prompt.preamble)
        if computed:
            yield
        fork = fork_positions(len(prompt.preamble), [len(p) for p in paths], "left_aligned")
        modules, cached = self._documents(None, paths, fork, cacheable=True)
        if cached < len(paths):
            yield
        selection = Selection(kept=list(range(len(prompt.documents))), moved=[], scores=[], paths=len(paths),
                              cached=cached)
        return self._join(Segment.cat([preamble, *(m.segment for m in modules)]), [], [],
                          prompt.query + prompt.postamble, fork.query_start, selection)

    def _rejoin(self, prompt: ForkJoinPrompt) -> Generator[None, None, Context]:
        """A fork scored and pruned elsewhere (`path_shards`: a sharded document store) joined here: the preamble
        (from the path cache when it has it), the kept paths' KV brought to this device, then the postamble."""
        kept: KeptPaths = prompt.kept_paths
        prefix, computed = self._preamble(prompt.preamble)
        if computed:
            yield
        moved = [Segment(s.tokens, s.positions, s.kv.to(self.device)) for s in kept.segments]
        return self._join(prefix, list(zip(moved[::2], moved[1::2])), kept.scores, prompt.postamble, kept.query_end,
                          kept.selection)

    def _join(self, prefix: Segment, paths: list[tuple[Segment, Segment]], scores: list[float], tail: list[int],
              start: float, selection: Selection) -> Context:
        """`tail` (the postamble; for the Prompt Cache, the query and the postamble) in one forward over the prefix
        and the kept paths (each a document and its query copy, with its score) from position `start`: the context
        to decode from, its first generated token at start + |tail|."""
        context = Segment.cat([prefix, *(s for pair in paths for s in pair)])
        bias = self._key_bias(len(prefix.tokens), paths, scores)
        joined, hidden, _ = self.forward([tail], [start + _arange(len(tail))], shared=context, shared_bias=bias)
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(len(tail))])
        context = Segment.cat([context, joined[0]])
        return Context(context.tokens, *self.layout.unpack(context.kv), self.model.logits(hidden[:, -1]),
                       start + len(tail), selection, bias)

    def _key_bias(self, prefix: int, paths: list[tuple[Segment, Segment]], scores: list[float]) -> torch.Tensor | None:
        """With `attenuation` T, (C,) float32: 0 on the prefix, (score - best) / T on each kept path's keys (the
        official code's log softmax(score / T) - max); None when off."""
        if self.config.attenuation is None or not paths:
            return None
        best, temperature = max(scores), self.config.attenuation
        parts = [torch.zeros(prefix), *(torch.full((len(d.tokens) + len(q.tokens),), (s - best) / temperature)
                                        for (d, q), s in zip(paths, scores))]
        return torch.cat(parts).to(self.device)

    def fork(self, prefix: Segment, paths: list[list[int]], query: list[int], cacheable: bool = True) -> ForkResult:
        """The paths over `prefix`, forking one past its highest position, each with a query copy, scored."""
        return run_stages(self._fork(prefix, paths, query, cacheable))

    def _fork(self, prefix: Segment, paths: list[list[int]], query: list[int],
              cacheable: bool) -> Generator[None, None, ForkResult]:
        fork = fork_positions(float(prefix.positions.max()) + 1, [len(p) for p in paths], self.config.positions)
        return (yield from self._scored(prefix, paths, fork, query, cacheable))

    def score(self, prefix: Segment, paths: list[list[int]], fork: Fork, query: list[int]) -> ForkResult:
        """Some paths of a larger fork (a shard of a document store: `fork` holds these paths' positions), each with
        a query copy, scored; the documents' KV from the path cache where it has it."""
        return run_stages(self._scored(prefix, paths, fork, query, cacheable=True))

    @torch.inference_mode()
    def _scored(self, prefix: Segment, paths: list[list[int]], fork: Fork, query: list[int],
                cacheable: bool) -> Generator[None, None, ForkResult]:
        documents, cached = self._documents(prefix, paths, fork, cacheable)
        if cached < len(paths):
            yield
        queries, scores = self._queries(prefix, documents, query, fork.query_start)
        yield
        return ForkResult(fork, documents, queries, scores, cached)

    def preamble(self, preamble: list[int]) -> Segment:
        """The preamble's KV at positions 0..|p|-1 (from the path cache when it has it)."""
        return self._preamble(preamble)[0]

    @torch.inference_mode()
    def _preamble(self, preamble: list[int]) -> tuple[Segment, bool]:
        """The preamble's segment, and whether it was computed (not found in the path cache)."""
        key = (self.model_key, "preamble", digest(preamble))
        found = self.cache.get(key) if self.cache is not None else None
        if found is not None:
            return found, False
        found = self.forward([preamble], [_arange(len(preamble))])[0][0]
        if self.cache is not None:
            self.cache.put(key, found, found.nbytes)
        return found, True

    def _documents(self, prefix: Segment | None, paths: list[list[int]], fork: Fork,
                   cacheable: bool) -> tuple[list[PathKV], int]:
        """Each path over the prefix (None: alone, a Prompt Cache module, not scored) at its fork positions: from the
        cache, or computed together; and the hits."""
        use_cache = cacheable and self.cache is not None
        over = digest(prefix.tokens) if prefix is not None else "module"
        keys = [(self.model_key, over, digest(p), step, float(pos[0])) if use_cache else None
                for p, step, pos in zip(paths, fork.steps, fork.paths)]
        found = [self.cache.get(k) if use_cache else None for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            segments, likelihoods, _ = self._paths([paths[i] for i in missing], [fork.paths[i] for i in missing],
                                                   shared=prefix, score=prefix is not None)
            for i, segment, ll in zip(missing, segments, likelihoods.tolist()):
                found[i] = PathKV(segment, ll)
                if use_cache:
                    self.cache.put(keys[i], found[i], segment.nbytes)
        return found, len(paths) - len(missing)

    def _queries(self, prefix: Segment, docs: list[PathKV], query: list[int],
                 start: float) -> tuple[list[Segment], torch.Tensor]:
        """A query copy over every prefix + document path, all in one batch; the paths' saliency scores."""
        n, positions = len(docs), start + _arange(len(query))
        attention = self.config.saliency == "attention"
        segments, query_ll, mass = self._paths([query] * n, [positions] * n, shared=prefix,
                                               rows=[d.segment for d in docs], track=attention)
        if attention:
            return segments, mass / len(self.model.layers)
        if self.config.saliency == "random":
            seed = int(digest([*query, *(t for d in docs for t in d.segment.tokens)])[:15], 16)
            return segments, torch.rand(n, generator=torch.Generator().manual_seed(seed))
        doc_ll = torch.tensor([d.log_likelihood for d in docs])
        return segments, query_ll + self.config.doc_ll_weight * doc_ll

    # ---- batched forwards -------------------------------------------------------------------------------------

    def _paths(self, tokens: list[list[int]], positions: list[torch.Tensor], shared: Segment | None,
               rows: list[Segment] | None = None, track: bool = False,
               score: bool = True) -> tuple[list[Segment], torch.Tensor, torch.Tensor]:
        """New segments over their pasts, in forwards of at most `max_batch_tokens` padded tokens: the segments,
        their mean log-likelihoods (with `score`, else zeros) and (with `track`) the attention they paid their own
        past segments, (B,) each."""
        segments, likelihoods, masses = [], [], []
        for chunk in self._chunks([len(t) for t in tokens]):
            part = [tokens[i] for i in chunk]
            new, hidden, mass = self.forward(part, [positions[i] for i in chunk], shared,
                                             [rows[i] for i in chunk] if rows is not None else None, track)
            segments += new
            likelihoods.append(self._mean_logprob(hidden, part) if score
                               else torch.zeros(len(part), device=self.device))
            masses.append(mass.clone())
        return segments, torch.cat(likelihoods).cpu(), torch.cat(masses).cpu()

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """Consecutive rows whose padded size (rows x longest) stays within max_batch_tokens (at least one row)."""
        chunks, longest = [[]], 0
        for i, n in enumerate(lengths):
            if chunks[-1] and (len(chunks[-1]) + 1) * max(longest, n) > self.config.max_batch_tokens:
                chunks.append([])
                longest = 0
            chunks[-1].append(i)
            longest = max(longest, n)
        return chunks

    def _mean_logprob(self, hidden: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
        """(B,) mean log-probability of each row's tokens 2.. given the earlier ones (0 for one-token rows), in fp32,
        over the vocabulary's real entries."""
        rows = torch.tensor([b for b, ids in enumerate(tokens) for _ in ids[1:]], dtype=torch.long)
        cols = torch.tensor([j for ids in tokens for j in range(len(ids) - 1)], dtype=torch.long)
        targets = torch.tensor([t for ids in tokens for t in ids[1:]], dtype=torch.long).to(self.device)
        total = torch.zeros(len(tokens), device=self.device)
        vocab = self.model.cfg.vocab_size
        for s in range(0, len(rows), LOGPROB_CHUNK):
            r, c = rows[s:s + LOGPROB_CHUNK].to(self.device), cols[s:s + LOGPROB_CHUNK].to(self.device)
            logp = self.model.logits(hidden[r, c])[:, :vocab].float().log_softmax(-1)
            total.index_add_(0, r, logp.gather(1, targets[s:s + LOGPROB_CHUNK, None])[:, 0])
        counts = torch.tensor([max(len(ids) - 1, 1) for ids in tokens], device=self.device)
        return total / counts


def run_stages(stages: Generator[None, None, Any]) -> Any:
    """Run a staged computation to its end; its return value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


def _arange(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64)
