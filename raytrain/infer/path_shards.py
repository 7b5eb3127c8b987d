"""A document store's paths sharded over processes: the Ray Serve shape of superposition prompting in the spec
(../shared/specs/superposition.md, section 6).

1. Each shard (`PathShard`) holds the model and a contiguous part of the store's paths, their KV over the preamble in
   its own path cache (computed once, as the shard starts or on the first question).
2. A question is scored on every shard at once (`PathShard.score`: the shard's query copies in one batched forward).
3. The coordinator keeps the top-k paths over all shards (`prune`) and takes only their KV, each kept path's
   document and query copy (`PathShard.take`, on the host); the other paths' KV never leaves its shard.
4. The engine that decodes joins the postamble over its preamble and the kept paths (`KeptPaths`, `join_kept`).

Positions are the whole fork's: every shard lays out the equilibrium positions of all paths' lengths and keeps its
part, so a path's KV, its score and its path-cache key are the ones a single process computes. This is plain
PyTorch; `serving/shards.py` puts each shard in a Ray actor, and the tests call shards in process.

Sharded: one fork-join round with Bayesian or attention saliency. Iterative superposition moves a path into every
later fork's prefix, the random ablation seeds by every path's tokens, and the Prompt Cache prunes nothing; those run
in one process.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.forkjoin import ForkJoinPrompt, fork_positions, path_groups
from raytrain.infer.path_forward import Segment
from raytrain.infer.superposition import (ForkResult, KeptPaths, Selection, Superposer, SuperpositionConfig,
                                          top_k)
from raytrain.models.decoder import Decoder

PENDING = 64  # scored requests a shard holds until the coordinator takes their paths (older ones are dropped)


def check_shardable(config: SuperpositionConfig, key: str) -> None:
    """One error naming the key for a superposition setting whose fork cannot be split over shards."""
    if config.method != "superposition":
        raise ConfigError(f"{key}.method={config.method!r}: only superposition's fork is sharded (the Prompt Cache "
                          "keeps every module; serve it unsharded)")
    if config.hops != 1:
        raise ConfigError(f"{key}.hops={config.hops}: a sharded store runs one round (later rounds fork over the "
                          "moved documents, which every shard would need)")
    if config.saliency == "random":
        raise ConfigError(f"{key}.saliency='random': its draw is seeded by every path's tokens; a sharded store "
                          "scores with bayesian or attention saliency")


def shard_ranges(paths: int, shards: int) -> list[range]:
    """At most `shards` contiguous, non-empty ranges of path indices whose sizes differ by at most one."""
    base, extra = divmod(paths, shards)
    bounds = [0]
    for i in range(shards):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclass
class ShardScores:
    """A shard's answer to a question: its paths' saliency scores, in path order, and how many of its documents'
    KV came from its path cache."""

    scores: list[float]
    cached: int


class PathShard:
    """Paths `owned` of a document store's paths (token ids, every path's given: positions need all lengths)."""

    def __init__(self, model: Decoder, config: SuperpositionConfig, paths: list[list[int]], owned: range,
                 key: str = "superposition") -> None:
        check_shardable(config, key)
        if not 0 <= owned.start < owned.stop <= len(paths):
            raise RaytrainError(f"shard paths {owned.start}..{owned.stop - 1}: the store has {len(paths)} paths")
        self.superposer = Superposer(model, config, key)
        self.lengths, self.owned = [len(p) for p in paths], owned
        self.paths = paths[owned.start:owned.stop]
        self.pending: OrderedDict[str, ForkResult] = OrderedDict()

    def score(self, request: str, preamble: list[int], query: list[int]) -> ShardScores:
        """Score this shard's paths for a question (the preamble and query of its fork-join prompt), holding their
        KV under `request` until `take`."""
        prefix = self.superposer.preamble(preamble)
        fork = fork_positions(len(preamble), self.lengths, self.superposer.config.positions).part(self.owned)
        result = self.superposer.score(prefix, self.paths, fork, query)
        self.pending[request] = result
        while len(self.pending) > PENDING:
            self.pending.popitem(last=False)
        return ShardScores(result.scores.tolist(), result.cached)

    def take(self, request: str, kept: list[int],
             question: tuple[list[int], list[int]] | None = None) -> list[Segment]:
        """The kept paths' (indices within this shard) document and query-copy KV, on the host, in path order; the
        request's other paths are dropped. A request this shard no longer holds (it restarted after scoring it, or
        `PENDING` later ones pushed it out) is scored again from `question` (its preamble and query) when given."""
        result = self.pending.pop(request, None)
        if result is None and question is not None:
            self.score(request, *question)
            result = self.pending.pop(request)
        if result is None:
            raise RaytrainError(f"request {request!r} was not scored on this shard, or was dropped ({PENDING} "
                                "requests were scored after it)")
        return [_on_host(s) for i in kept for s in (result.documents[i].segment, result.queries[i])]


def prune(scores: list[ShardScores], k: int) -> list[list[int]]:
    """Each shard's kept paths, as indices within it: the top k over every shard's scores (k = 0: all), ties to the
    lower path, as one process picks them."""
    kept, starts = top_k(torch.tensor([x for s in scores for x in s.scores]), k), _starts(scores)
    return [[i - a for i in kept if a <= i < b] for a, b in zip(starts, starts[1:])]


def join_kept(superposer: Superposer, prompt: ForkJoinPrompt, scores: list[ShardScores], kept: list[list[int]],
              taken: list[list[Segment]]) -> KeptPaths:
    """What the coordinator's engine joins: the kept paths' KV from the shards (`take`'s answers, shard by shard)
    and the selection one process would report."""
    config, paths = superposer.config, superposer.paths(prompt)
    fork = fork_positions(len(prompt.preamble), [len(p) for p in paths], config.positions)
    groups = path_groups(len(prompt.documents), config.factor)
    chosen = [start + i for start, local in zip(_starts(scores), kept) for i in local]
    selection = Selection(kept=[d for i in chosen for d in groups[i]], moved=[],
                          scores=[x for s in scores for x in s.scores], paths=len(paths),
                          cached=sum(s.cached for s in scores))
    return KeptPaths([s for part in taken for s in part], [selection.scores[i] for i in chosen],
                     fork.query_start + len(prompt.query), selection)


def _starts(scores: list[ShardScores]) -> list[int]:
    """Where each shard's paths start among all paths, then the path count."""
    return [0, *itertools.accumulate(len(s.scores) for s in scores)]


def _on_host(segment: Segment) -> Segment:
    return Segment(segment.tokens, segment.positions, segment.kv.cpu())
