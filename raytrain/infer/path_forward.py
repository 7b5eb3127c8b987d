"""Batched forwards of prompt segments over per-row pasts: the compute under superposition prompting
(`superposition.py`), eagerly or replayed as CUDA graphs.

One forward takes B new segments (right-padded to T tokens) at explicit, real-valued positions. Row b attends to a
`shared` past (S tokens, the same for every row), then its own past segment (the first len_b of R right-padded
keys), then causally to its own new tokens: rows never see each other (`PathAttention`). Each new token's keys and
values are written, token-major for every layer (`KVLayout`), after its row's pasts in one (B, S + R + T, W) tensor.

Why this shape: warm, a superposed prompt's first token waits on two small forwards (the query copies: at 34 paths of
a 7B model ~500 tokens; the postamble: a few). Eagerly they were 2,833 operator calls to the first token and 63 ms on
an H200 (`benchmarks/superposition.py --shape llama2_7b --doc-words 100`, 2026-12-05). With `graph_tokens` > 0 a
forward of at most that many padded new tokens is padded to a shape bucket (`row_buckets` for B, at most 1.5x for T,
S and R) and, on CUDA, captured once per bucket as a CUDA graph and replayed: its inputs are copied into static
buffers (grown on demand, every graph then recaptured), its mask is built inside the graph from the per-row lengths,
and its outputs land in static buffers. Padded rows, tokens and past columns compute values nobody reads; padded past
columns are masked. Every row's keys and values (shared past, own past, new tokens) sit in one tensor that each
layer attends through as a strided view, where a per-layer concatenation copied every past key and value once more
per layer. Graphs alone took the 7B first token to 58 ms; with the strided KV and rows padded to multiples of 4 (not
up to 1.5x), 42 ms.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from raytrain.infer.model_runner import bucket, capture_graph, geometric_buckets
from raytrain.models.decoder import Decoder
from raytrain.models.kv_cache import CachedAttention

MIN_BUCKET = 16  # smallest padded T, S and R of a static forward


def row_buckets(high: int) -> list[int]:
    """Padded row counts: 1, 2, 3, then multiples of 4 up to 64 and of 16 beyond. Rows are paths, and each padded
    one costs a whole query copy's compute, so they pad less than the token lengths (geometric, up to 1.5x)."""
    return [1, 2, 3, *range(4, 65, 4), *range(80, high + 16, 16)]


class KVLayout:
    """Where a decoder's layers sit in a token's packed KV row: layer 0's keys, its values, layer 1's keys, ...,
    n_kv_l * hd entries each (head counts may differ between layers)."""

    def __init__(self, model: Decoder) -> None:
        self.sizes = [(layer.attn.n_kv, layer.attn.head_dim) for layer in model.layers]
        widths = [2 * n * hd for n, hd in self.sizes]
        self.starts = [0, *itertools.accumulate(widths)][:-1]
        self.width = sum(widths)

    def split(self, kv: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., T, W) packed rows -> the layer's keys and values, (..., n_kv, T, hd) views."""
        (n, hd), start = self.sizes[layer], self.starts[layer]
        k, v = kv[..., start:start + 2 * n * hd].unflatten(-1, (2, n, hd)).unbind(-3)
        return k.transpose(-3, -2), v.transpose(-3, -2)

    def unpack(self, kv: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(T, W) -> per-layer (n_kv, T, hd) keys and values (views)."""
        keys, values = zip(*(self.split(kv, layer) for layer in range(len(self.sizes))))
        return list(keys), list(values)


@dataclass
class Segment:
    """Tokens of one or more prompt segments, their positions and their KV, packed token-major (`KVLayout`)."""

    tokens: list[int]
    positions: torch.Tensor  # (T,) float64, on the host
    kv: torch.Tensor  # (T, W)

    @classmethod
    def cat(cls, parts: list[Segment]) -> Segment:
        return cls([t for p in parts for t in p.tokens], torch.cat([p.positions for p in parts]),
                   torch.cat([p.kv for p in parts]))

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PathInputs:
    """A batched forward's device tensors at one shape (B, T, S, R); the new tokens' part of `kv`, `hidden` and
    `mass` are written by the forward."""

    ids: torch.Tensor  # (B, T) long
    positions: torch.Tensor  # (B, T) float32
    lengths: torch.Tensor  # (B, 3) long, each row's real tokens: of the shared past, its own past, its new segment
    kv: torch.Tensor  # (B, S + R + T, W): every key and value row b attends to (shared past, own past, new tokens)
    shared: int  # S: where the own pasts' rows start
    past: int  # S + R: where the new tokens' rows start
    hidden: torch.Tensor  # (B, T, d): final hidden states
    mass: torch.Tensor  # (B,): attention paid to the own past segment (with `track`)

    @property
    def new(self) -> torch.Tensor:
        """(B, T, W): the new tokens' keys and values."""
        return self.kv[:, self.past:]


def path_mask(lengths: torch.Tensor, S: int, R: int, T: int) -> torch.Tensor:
    """(B, 1, T, S + R + T) bool: row b's queries see the shared past's first lengths[b, 0] columns, their own
    past's first lengths[b, 1] columns, and their own new tokens causally."""
    B, device = len(lengths), lengths.device
    shared = torch.arange(S, device=device)[None] < lengths[:, :1]
    own = torch.arange(R, device=device)[None] < lengths[:, 1:2]
    past = torch.cat([shared, own], 1)[:, None, None].expand(B, 1, T, S + R)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, 1, T, T)
    return torch.cat([past, causal], -1)


class PathAttention(CachedAttention):
    """Attention of a batch of new segments over the rows of `inputs.kv`, their new keys and values written there
    first: each layer's keys are then a strided view of that one tensor, never concatenated. With `track`, the
    attention the new tokens pay their row's own past segment is summed into `inputs.mass` (mean over layers' heads,
    summed over token pairs and layers): the attention saliency. `shared_bias` (S,) is added to the attention
    logits of the shared past's keys (superposition's attenuation)."""

    def __init__(self, inputs: PathInputs, layout: KVLayout, track: bool,
                 shared_bias: torch.Tensor | None = None) -> None:
        self.inputs, self.layout, self.track = inputs, layout, track
        T = inputs.ids.shape[1]
        self.mask = path_mask(inputs.lengths, inputs.shared, inputs.past - inputs.shared, T)
        self.attend_mask = self.mask
        if shared_bias is not None:  # an additive float mask: the bias on the shared columns, -inf where masked
            bias = torch.zeros(self.mask.shape[-1], device=self.mask.device)
            bias[:len(shared_bias)] = shared_bias
            self.attend_mask = bias.masked_fill(~self.mask, float("-inf")).to(inputs.kv.dtype)
        self.own = slice(inputs.shared, inputs.past)
        self.real = torch.arange(T, device=inputs.ids.device)[None] < inputs.lengths[:, 2:]  # (B, T): unpadded

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        keys, values = self.layout.split(self.inputs.kv, layer)  # (B, n_kv, S + R + T, hd) views
        keys[:, :, self.inputs.past:].copy_(k)
        values[:, :, self.inputs.past:].copy_(v)
        if self.track:
            self.inputs.mass += self._own_attention(q, keys)
        return keys, values, self.attend_mask, False

    def _own_attention(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B,) attention probability the real queries put on their own past segment, summed over queries and keys,
        averaged over heads."""
        B, n_q, T, hd = q.shape
        grouped = q.reshape(B, keys.shape[1], n_q // keys.shape[1], T, hd)  # query heads g*j.. read KV head j
        scores = torch.einsum("bkgtd,bksd->bkgts", grouped.float(), keys.float()) / math.sqrt(hd)
        probs = scores.masked_fill(~self.mask[:, :, None], float("-inf")).softmax(-1)
        return (probs[..., self.own].sum(-1).mean((1, 2)) * self.real).sum(-1)

    def position_ids(self, q_len: int) -> None:
        return None

    def advance(self, n_tokens: int) -> None:
        """Positions are explicit: nothing to count."""


class PathForward:
    """Batched segment forwards for one model: eager at their own shapes, or (`graph_tokens` > 0) padded to a shape
    bucket, each bucket a CUDA graph on CUDA (on the CPU the padded forward runs eagerly: what tests check)."""

    def __init__(self, model: Decoder, layout: KVLayout, graph_tokens: int = 0) -> None:
        self.model, self.layout, self.graph_tokens = model, layout, graph_tokens
        self.device, self.dtype = model.embed.weight.device, model.embed.weight.dtype
        self.cuda_graphs = self.device.type == "cuda"
        self.rows_buckets = row_buckets(1 << 16)
        self.length_buckets = geometric_buckets(MIN_BUCKET, 1 << 24)
        self.buffers: dict[str, torch.Tensor] = {}  # flat static buffers that bucket views share
        self.graphs: dict[tuple[int, int, int, int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def __call__(self, tokens: list[list[int]], positions: list[torch.Tensor], shared: Segment | None = None,
                 rows: list[Segment] | None = None, track: bool = False,
                 shared_bias: torch.Tensor | None = None) -> tuple[list[Segment], torch.Tensor, torch.Tensor]:
        """New segments over their pasts -> each row's Segment, hidden states (B, T, d) and attention mass (B,) (all
        on the device; `hidden` and `mass` are valid until the next call). `shared_bias` (S,) float32: added to the
        attention logits of the shared past's keys; such a forward runs eagerly (an ablation's, not worth graphs)."""
        B, T = len(tokens), max(map(len, tokens))
        S = len(shared.tokens) if shared is not None else 0
        R = max(len(r.tokens) for r in rows) if rows is not None else 0
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.float32)
        for b, (row, p) in enumerate(zip(tokens, positions)):
            ids[b, :len(row)] = torch.tensor(row)
            pos[b, :len(row)] = p
        lengths = torch.tensor([[S, len(rows[b].tokens) if rows is not None else 0, len(row)]
                                for b, row in enumerate(tokens)])
        static = 0 < B * T <= self.graph_tokens and shared_bias is None
        key = self._bucket(B, T, S, R, track) if static else None
        inputs = self._inputs(*key[:4]) if static else self._allocate(B, T, S, R)
        self._load(inputs, ids, pos, lengths, shared, rows)
        if static and self.cuda_graphs:
            if key not in self.graphs:
                self.graphs[key] = self._capture(inputs, track)
            self.graphs[key].replay()
        else:
            inputs.hidden.copy_(self._run(inputs, track, shared_bias))
        kv = [torch.empty(len(row), self.layout.width, dtype=self.dtype, device=self.device) for row in tokens]
        torch._foreach_copy_(kv, [inputs.new[b, :len(row)] for b, row in enumerate(tokens)])  # one launch, not B
        segments = [Segment(row, p, k) for row, p, k in zip(tokens, positions, kv)]
        return segments, inputs.hidden[:B, :T], inputs.mass[:B]

    def _bucket(self, B: int, T: int, S: int, R: int, track: bool) -> tuple[int, int, int, int, bool]:
        """The padded (B, T, S, R) of a static forward, and `track` (graphs differ with it)."""
        def length(n: int) -> int:
            return bucket(n, self.length_buckets) if n else 0

        return bucket(B, self.rows_buckets), length(T), length(S), length(R), track

    def _allocate(self, B: int, T: int, S: int, R: int) -> PathInputs:
        """An eager forward's tensors at its own shape (`_load` zeroes what the rows' pasts leave as padding)."""
        device = self.device
        kv = torch.empty(B, S + R + T, self.layout.width, dtype=self.dtype, device=device)
        return PathInputs(torch.empty(B, T, dtype=torch.long, device=device), torch.empty(B, T, device=device),
                          torch.empty(B, 3, dtype=torch.long, device=device), kv, S, S + R,
                          torch.empty(B, T, self.model.cfg.d_model, dtype=self.dtype, device=device),
                          torch.zeros(B, device=device))

    def _inputs(self, B: int, T: int, S: int, R: int) -> PathInputs:
        """Views of the static buffers at one bucket's shape (zero-filled when allocated; later forwards write only
        finite keys and values, so masked columns stay finite)."""
        W, d = self.layout.width, self.model.cfg.d_model
        return PathInputs(self._view("ids", (B, T), torch.long), self._view("positions", (B, T), torch.float32),
                          self._view("lengths", (B, 3), torch.long), self._view("kv", (B, S + R + T, W), self.dtype),
                          S, S + R, self._view("hidden", (B, T, d), self.dtype),
                          self._view("mass", (B,), torch.float32))

    @staticmethod
    def _load(inputs: PathInputs, ids: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor,
              shared: Segment | None, rows: list[Segment] | None) -> None:
        """Host inputs into `inputs` (padding: token 0 at position 0, lengths 0), the pasts' KV into their rows, each
        row's own past right-padded with zeros (a masked key's value still meets a zero weight: it must be finite)."""
        B, T = ids.shape
        inputs.ids.zero_()[:B, :T].copy_(ids)
        inputs.positions.zero_()[:B, :T].copy_(pos)
        inputs.lengths.zero_()[:B].copy_(lengths)
        if shared is not None:
            inputs.kv[:B, :len(shared.tokens)].copy_(shared.kv.expand(B, -1, -1))
        if rows:  # one launch each for all rows (a request has dozens of paths), not two per row
            owns = inputs.kv[:len(rows), inputs.shared:inputs.past].unbind(0)
            torch._foreach_copy_([own[:len(row.tokens)] for own, row in zip(owns, rows)], [row.kv for row in rows])
            padding = [own[len(row.tokens):] for own, row in zip(owns, rows) if len(row.tokens) < len(own)]
            if padding:
                torch._foreach_zero_(padding)

    def _run(self, inputs: PathInputs, track: bool, shared_bias: torch.Tensor | None = None) -> torch.Tensor:
        inputs.mass.zero_()
        return self.model.hidden(inputs.ids, cache=PathAttention(inputs, self.layout, track, shared_bias),
                                 positions=inputs.positions)

    def _view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of the flat buffer `name`; a larger one replaces it, and then every graph (they read the old)."""
        size = math.prod(shape)
        if name not in self.buffers or self.buffers[name].numel() < size:
            self.buffers[name] = torch.zeros(size, dtype=dtype, device=self.device)
            self.graphs.clear()
            self.pool = None
        return self.buffers[name][:size].view(shape)

    def _capture(self, inputs: PathInputs, track: bool) -> torch.cuda.CUDAGraph:
        """The bucket's forward as a CUDA graph, its hidden states into `inputs.hidden`."""
        def run() -> None:
            inputs.hidden.copy_(self._run(inputs, track))

        graph = capture_graph(run, self.pool)
        self.pool = graph.pool()
        return graph
