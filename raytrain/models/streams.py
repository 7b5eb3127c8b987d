"""Multi-stream attention (MSA) for Speculative Streaming (Bhendawade et al., arXiv 2402.11131; spec
`specstream.md`), as an option of the decoder family (`DecoderConfig.streams`).

The top `msa_layers` of the decoder run γ speculative streams beside the main stream. At a position t, stream j
starts as the residual entering the first MSA layer plus a learned stream embedding P_j, goes through the same
weights as the main stream (no per-stream projections), and predicts the token j steps after the main stream's
next token. In every MSA layer:
- the main stream attends exactly as in a plain decoder (it never sees a stream, so its outputs are unchanged);
- stream j at t attends to the main keys that the main query at t sees (causal positions in training, committed
  KV plus tree ancestors in tree decoding), plus the streams 1..j of the same position, in one softmax.

Stream keys and values are never written to a KV cache. `MultiStreamAttention` does the routing: it stands in for
the cache of the MSA layers, so blocks and attention modules are the decoder's own, unchanged; main and stream rows
share every projection matmul. Optional: the tree-pruning adapter, an early-exit head on the residual entering the
first MSA layer (`PruningAdapter`). The counting rules of spec section 5 (tree sizes, MSA rows, extra parameters,
Medusa's heads) are here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raytrain.models import ops
from raytrain.models.kv_cache import attention


@dataclass
class StreamConfig:
    """Speculative streams of a decoder (spec sections 2.1 and 3)."""

    gamma: int = 4  # γ: speculative streams; stream j predicts the token j steps after the next one
    msa_layers: int = 2  # Ns: the top layers that run multi-stream attention (the paper: N/6 for SQL, N/2 otherwise)
    pruning_rank: int = 8  # θ of the tree-pruning adapter; 0 = no adapter (no tree pruning)
    embedding_std: float = 0.02  # init of the stream embeddings P_j

    def __post_init__(self) -> None:
        if self.gamma < 1:
            raise ValueError(f"streams.gamma={self.gamma} must be >= 1")
        if self.msa_layers < 1:
            raise ValueError(f"streams.msa_layers={self.msa_layers} must be >= 1")
        if self.pruning_rank < 0:
            raise ValueError(f"streams.pruning_rank={self.pruning_rank} must be >= 0")


class PruningAdapter(nn.Module):
    """o_θ(h) = h + up(down(h)) with rank θ; `up` starts at zero, so the early exit starts as the LM head on the
    residual entering the first MSA layer (spec 2.1 writes o_θ: h -> θ -> h; the residual form is our reading)."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model, bias=False)
        with torch.no_grad():
            self.down.weight.normal_(std=d_model ** -0.5)
            self.up.weight.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.down(h))


@dataclass
class StreamStates:
    """Hidden states (before the final norm; `Decoder.logits` turns any of them into logits)."""

    main: torch.Tensor  # (B, T, d): the main stream at every (kept) row
    streams: torch.Tensor  # (B, R, γ, d): the streams of the R stream rows
    early_exit: torch.Tensor | None  # (B, T, d): o_θ of the residual entering the first MSA layer, all rows
    rows: torch.Tensor | None = None  # (B, T') rows kept by tree pruning (indices into the input), or None


class MultiStreamAttention:
    """The "cache" the MSA layers attend through. The rows of each layer's input are the T main rows followed by
    R·γ stream rows (row T + r·γ + j - 1 is stream j of main row `stream_rows[:, r]`). Main rows go through `cache`
    (`update` of a `CachedAttention`: their K/V are written there and the keys they see come back) or, without a
    cache, plain causal attention; stream rows attend by `stream_attention`."""

    def __init__(self, cache: Any, n_main: int, stream_rows: torch.Tensor, gamma: int) -> None:
        self.cache, self.n_main, self.stream_rows, self.gamma = cache, n_main, stream_rows, gamma

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, n_q, T + R·γ, hd), k and v (B, n_kv, T + R·γ, hd) -> (B, n_q, T + R·γ, hd)."""
        T, G = self.n_main, self.gamma
        B, R = self.stream_rows.shape
        qm, km, vm = q[:, :, :T], k[:, :, :T], v[:, :, :T]
        if self.cache is None:
            keys, values, mask, causal = km, vm, None, T > 1
        else:
            keys, values, mask, causal = self.cache.update(layer, qm, km, vm)
        main = attention(qm, keys, values, mask, causal)
        visible = main_visibility(mask, causal, T, keys.shape[2], q.device)  # (B or 1, T, S)
        visible = visible.expand(B, -1, -1).gather(1, self.stream_rows[..., None].expand(-1, -1, visible.shape[-1]))

        def split(x: torch.Tensor) -> torch.Tensor:
            return x[:, :, T:].unflatten(2, (R, G))  # (B, heads, R, γ, hd)

        streams = stream_attention(split(q), split(k), split(v), keys, values, visible)
        return torch.cat([main, streams.flatten(2, 3)], dim=2)


def main_visibility(mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int,
                    device: torch.device) -> torch.Tensor:
    """(B or 1, T, S) bool: which of the S keys each of the T main queries attends to, from SDPA's (mask, causal)
    arguments (a boolean mask of shape (B or 1, 1, T, S) or (T, S); causal queries follow S - T earlier keys)."""
    if mask is not None:
        return mask.reshape(-1, q_len, k_len)
    if not causal:
        return torch.ones(1, q_len, k_len, dtype=torch.bool, device=device)
    keys = torch.arange(k_len, device=device)
    return (keys[None, :] <= (k_len - q_len + torch.arange(q_len, device=device))[:, None])[None]


def stream_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     visible: torch.Tensor) -> torch.Tensor:
    """Spec 2.2's attention of stream queries: logits against the main keys their row sees and against the streams
    1..j of their own row, one softmax over both (fp32).

    q (B, n_q, R, γ, hd); k, v (B, n_kv, R, γ, hd) the streams' own keys/values; keys, values (B, n_kv, S, hd) the
    main stream's; visible (B, R, S) bool -> (B, n_q, R, γ, hd). Query heads g*i..g*i+g-1 read KV head i."""
    B, n_q, R, G, hd = q.shape
    n_kv, S = keys.shape[1], keys.shape[2]
    grouped = q.unflatten(1, (n_kv, n_q // n_kv))  # (B, n_kv, g, R, γ, hd)
    to_main = torch.matmul(grouped.flatten(2, 4), keys.transpose(-1, -2)).view(B, n_kv, -1, R, G, S)
    to_own = torch.einsum("bkgrjd,bkrid->bkgrji", grouped, k)  # (B, n_kv, g, R, γ, γ)
    own = torch.ones(G, G, dtype=torch.bool, device=q.device).tril()  # stream j sees streams 1..j
    mask = torch.cat([visible[:, None, None, :, None, :].expand(B, 1, 1, R, G, S),
                      own.expand(B, 1, 1, R, G, G)], dim=-1)
    probs = ops.masked_softmax(torch.cat([to_main, to_own], dim=-1), mask, 1 / math.sqrt(hd), values.dtype)
    out = torch.matmul(probs[..., :S].flatten(2, 4), values).view(B, n_kv, -1, R, G, hd)
    out = out + torch.einsum("bkgrji,bkrid->bkgrjd", probs[..., S:], v)
    return out.flatten(1, 2)


# ---- counting rules (spec sections 2.3 and 5) ------------------------------------------------------------------

def tree_size(gamma: int, k: int) -> int:
    """Nodes of the full k-ary draft tree of depth γ: 1 + Σ_{g=1..γ} k^g."""
    return 1 + sum(k ** g for g in range(1, gamma + 1))


def msa_rows(gamma: int, k: int) -> int:
    """Rows in an MSA layer for one tree: every node plus its γ stream slots."""
    return (1 + gamma) * tree_size(gamma, k)


def extra_parameters(d_model: int, gamma: int, pruning_rank: int) -> int:
    """Parameters Speculative Streaming adds to a model: γ stream embeddings and the rank-θ adapter, γh + 2θh."""
    return gamma * d_model + 2 * pruning_rank * d_model


def medusa_parameters(d_model: int, vocab: int, heads: int = 4) -> int:
    """Medusa's heads as counted in the paper's Table 1: per head a d x d residual block and a d x vocab LM head."""
    return heads * (d_model * d_model + d_model * vocab)
