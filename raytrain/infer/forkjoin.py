"""Fork-join prompts for superposition prompting (Merth et al., arXiv 2404.06910): the prompt DAG, its positions and
its single-sequence layout.

A RAG prompt here is not one sequence but a DAG of token segments: the preamble p forks into one path per document,
d_i -> q_i (q_i a copy of the query), and the paths join at the postamble t, after which the response is generated.
Segment v attends to segment u iff the DAG has a path u -> v, so documents never see each other.

Positions are real-valued so that every parallel path spans the same length ("equilibrium": the paper's Alg. 1 as
the official `equilibrium_from_forkjoin_digraphs` computes it), for paths forking at `start` (|p| for the first):

    S = n / sum_i 1/|d_i|   (the harmonic mean of the path lengths)
    pos(d_i) = start + (S / |d_i|) * (0, ..., |d_i| - 1)     pos(q_i) = start + S + (0, ..., |q| - 1)
    pos(t) = start + S + |q| + (0, ..., |t| - 1)             response token m: start + S + |q| + |t| + m

or `left_aligned` (Prompt Cache's): step 1 for every document, the query after the longest one.

`oracle_layout` lays the whole DAG out as one sequence (p, d_1, q_1, ..., d_n, q_n, t, response) with its attention
mask; that is how the official evaluation runs the method, and it is the reference that the path-wise computation of
`superposition.py` is tested against. `prompt_cache_layout` does the same for the Prompt Cache baseline's graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from raytrain.config import RaytrainError
from raytrain.models.decoder import Decoder
from raytrain.models.kv_cache import CachedAttention

POSITIONS = ("equilibrium", "left_aligned")


@dataclass
class ForkJoinPrompt:
    """A RAG request's prompt as fork-join segments of token ids, with its per-request choices."""

    preamble: list[int]
    documents: list[list[int]]
    query: list[int]
    postamble: list[int]
    superpose: bool | None = None  # None: as the engine is configured (generation.superposition.enabled)
    top_k: int | None = None  # paths kept after pruning; None: as the engine is configured; 0: every path
    kept_paths: Any = None  # superposition.KeptPaths: the fork already scored and pruned (a sharded document
    # store); only the postamble is left to run

    def flat(self) -> list[int]:
        """The naive RAG prompt: every document in one sequence, the query once."""
        return [*self.preamble, *(t for d in self.documents for t in d), *self.query, *self.postamble]

    def check(self, vocab_size: int) -> None:
        """One clear error for a segment that is empty or holds a token id outside the vocabulary."""
        segments = {"preamble": self.preamble, "query": self.query, "postamble": self.postamble,
                    **{f"documents[{i}]": d for i, d in enumerate(self.documents)}}
        if not self.documents:
            raise RaytrainError("documents: a fork-join prompt needs at least one document")
        for name, ids in segments.items():
            if not ids:
                raise RaytrainError(f"{name}: the segment is empty")
            if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
                raise RaytrainError(f"{name}: token ids must be integers in [0, {vocab_size})")
        if self.top_k is not None and self.top_k < 0:
            raise RaytrainError(f"top_k={self.top_k} must be >= 0 (0 keeps every path)")


def path_groups(n_documents: int, factor: int | None) -> list[list[int]]:
    """Document indices of each path: adjacent documents merged into paths of round(m / factor) documents (the
    superposition factor; None or m: one document per path, 1: a single path, i.e. naive RAG)."""
    per_path = max(1, round(n_documents / factor)) if factor else 1
    return [list(range(i, min(i + per_path, n_documents))) for i in range(0, n_documents, per_path)]


@dataclass
class Fork:
    """Positions of one fork: each path's (real-valued) positions, and where the query copies start."""

    paths: list[torch.Tensor]  # (|d_i|,) float64 each
    steps: list[float]
    query_start: float  # q0: the same for every path

    def part(self, paths: range) -> Fork:
        """The positions of some of the paths (a shard's), forking and joining as in the whole fork."""
        return Fork(self.paths[paths.start:paths.stop], self.steps[paths.start:paths.stop], self.query_start)


def fork_positions(start: float, lengths: list[int], mode: str = "equilibrium") -> Fork:
    """Positions of paths of the given lengths forking at `start` (one past the prefix's highest position)."""
    if mode == "equilibrium":  # in exact rationals: equal lengths, or lengths with an integer S, stay integers
        exact = Fraction(len(lengths)) / sum(Fraction(1, n) for n in lengths)
        span, steps = float(exact), [float(exact / n) for n in lengths]
    elif mode == "left_aligned":
        span, steps = max(lengths), [1.0] * len(lengths)
    else:
        raise RaytrainError(f"positions={mode!r} is unknown; use one of {', '.join(POSITIONS)}")
    paths = [start + step * torch.arange(n, dtype=torch.float64) for step, n in zip(steps, lengths)]
    return Fork(paths, steps, start + span)


@dataclass
class Layout:
    """The whole DAG as one sequence: tokens, real-valued positions, and mask[a, b] = row a may attend to column b."""

    tokens: list[int]
    positions: torch.Tensor  # (N,) float64
    mask: torch.Tensor  # (N, N) bool
    spans: dict[tuple[str, int], slice] = field(default_factory=dict)  # ("document"|"query", i), ("postamble", 0)
    bias: torch.Tensor | None = None  # (N, N) float32 added to the attention logits (attenuation), or None


def oracle_layout(prompt: ForkJoinPrompt, positions: str = "equilibrium", kept: list[int] | None = None,
                  response: list[int] | None = None, preamble_positions: torch.Tensor | None = None,
                  path_bias: dict[int, float] | None = None) -> Layout:
    """p, d_1, q_1, ..., d_n, q_n, t, response in topological order, one document per path. A row may attend to a
    column of an ancestor segment, or of its own segment at or before it; with `kept`, the rows from t on see none
    of the pruned paths' columns (the official evaluation's pruning by masking). `preamble_positions` (default
    0..|p|-1) places a preamble that earlier rounds extended (iterative superposition). `path_bias` {i: b}: the
    rows from t on add b to the attention logits of path i's document and query columns (the official code's
    attenuation)."""
    n = len(prompt.documents)
    if preamble_positions is None:
        preamble_positions = torch.arange(len(prompt.preamble), dtype=torch.float64)
    start = float(preamble_positions.max()) + 1
    fork = fork_positions(start, [len(d) for d in prompt.documents], positions)
    query = fork.query_start + torch.arange(len(prompt.query), dtype=torch.float64)
    pieces = [(prompt.preamble, preamble_positions, ("preamble", 0))]
    for i, d in enumerate(prompt.documents):
        pieces += [(d, fork.paths[i], ("document", i)), (prompt.query, query, ("query", i))]
    pieces.append(_tail(prompt, response, fork.query_start + len(prompt.query)))
    ancestor = torch.zeros(2 * n + 2, 2 * n + 2, dtype=torch.bool)  # ancestor[v, u]: u -> ... -> v
    ancestor[1:, 0] = True
    for i in range(n):
        ancestor[2 * i + 2, 2 * i + 1] = True
        if kept is None or i in kept:
            ancestor[2 * n + 1, [2 * i + 1, 2 * i + 2]] = True
    layout = _layout(pieces, ancestor)
    if path_bias:
        layout.bias = torch.zeros(layout.mask.shape)
        tail = layout.spans["postamble", 0].start
        for i, b in path_bias.items():
            for name in ("document", "query"):
                layout.bias[tail:, layout.spans[name, i]] = b
    return layout


def prompt_cache_layout(prompt: ForkJoinPrompt, response: list[int] | None = None) -> Layout:
    """The Prompt Cache baseline's graph (spec section 6) as one sequence p, d_1, ..., d_n, q, t, response: the
    preamble and each document are modules that attend only to themselves, the documents at left-aligned positions
    |p|, |p| + 1, ...; one query (after the longest document) attends to all of them, and t to everything."""
    n, p = len(prompt.documents), len(prompt.preamble)
    fork = fork_positions(p, [len(d) for d in prompt.documents], "left_aligned")
    pieces = [(prompt.preamble, torch.arange(p, dtype=torch.float64), ("preamble", 0)),
              *((d, fork.paths[i], ("document", i)) for i, d in enumerate(prompt.documents)),
              (prompt.query, fork.query_start + torch.arange(len(prompt.query), dtype=torch.float64), ("query", 0)),
              _tail(prompt, response, fork.query_start + len(prompt.query))]
    ancestor = torch.zeros(n + 3, n + 3, dtype=torch.bool)  # explicit edges, no propagation through the modules
    ancestor[n + 1:, :n + 1] = True
    ancestor[n + 2, n + 1] = True
    return _layout(pieces, ancestor)


def _tail(prompt: ForkJoinPrompt, response: list[int] | None, start: float) -> tuple[list[int], torch.Tensor, tuple]:
    """The postamble and the response so far, from position `start`."""
    tail = [*prompt.postamble, *(response or [])]
    return tail, start + torch.arange(len(tail), dtype=torch.float64), ("postamble", 0)


def _layout(pieces: list[tuple[list[int], torch.Tensor, tuple[str, int]]], ancestor: torch.Tensor) -> Layout:
    """Pieces (tokens, positions, span name) laid out in order, piece j being segment j of `ancestor`: a row attends
    to the columns of its segment's ancestors, and to its own segment's columns at or before it."""
    tokens, spans, segments = [], {}, []
    for j, (ids, _, name) in enumerate(pieces):
        spans[name] = slice(len(tokens), len(tokens) + len(ids))
        tokens += ids
        segments += [j] * len(ids)
    seg = torch.tensor(segments)
    index = torch.arange(len(tokens))
    mask = ancestor[seg[:, None], seg[None, :]] | ((seg[:, None] == seg[None, :]) & (index[None, :] <= index[:, None]))
    return Layout(tokens, torch.cat([p for _, p, _ in pieces]), mask, spans)


class MaskedAttention(CachedAttention):
    """Attention of one whole sequence under an explicit (N, N) boolean mask, and an additive bias when given."""

    def __init__(self, mask: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.mask = mask[None, None] if bias is None else bias.masked_fill(~mask, float("-inf"))[None, None]

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        return k, v, self.mask, False

    def position_ids(self, q_len: int) -> None:
        return None

    def advance(self, n_tokens: int) -> None:
        """Positions are explicit: nothing to count."""


@torch.inference_mode()
def oracle_logits(model: Decoder, layout: Layout) -> torch.Tensor:
    """(N, vocab_rows) logits of the single-sequence DAG forward."""
    device = model.embed.weight.device
    tokens = torch.tensor([layout.tokens], device=device)
    positions = layout.positions.to(device=device, dtype=torch.float32)[None]
    bias = layout.bias.to(device=device, dtype=model.embed.weight.dtype) if layout.bias is not None else None
    return model(tokens, cache=MaskedAttention(layout.mask.to(device), bias), positions=positions)[0]
