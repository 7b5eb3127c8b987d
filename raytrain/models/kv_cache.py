"""Key/value cache for incremental decoding.

Each layer owns a preallocated (B, n_kv, capacity, hd) buffer pair and its own fill length, so layers may hold
different numbers of tokens. `seen` counts the tokens the model has been fed, which is the next position id whatever
each layer kept. Rows of a batch may be left-padded (`pad[b]` leading slots hold no token): padded keys are masked
for every query, and a padded query attends only to itself so that no softmax row is empty.

Attention talks to a cache through `attend(layer, q, k, v) -> output`. Caches built on `CachedAttention` implement
`update(layer, q, k, v) -> (keys, values, mask, is_causal)` and attend through SDPA; the LazyLLM store
(`raytrain/infer/lazyllm.py`) is one with other key sets, the engine's slot cache (`raytrain/infer/kv_cache.py`)
attends its own way in decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool) -> torch.Tensor:
    """q (B, n_q, T, hd), k and v (B, n_kv, S, hd) -> (B, n_q, T, hd); query heads g*j..g*j+g-1 read KV head j."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def use_inference_attention() -> None:
    """Process-wide, for inference on CUDA: SDPA without its cuDNN backend. cuDNN builds an execution plan for each
    new shape, about 9 ms of host time a call on an H200 (torch 2.11, measured), and inference meets new shapes all
    the time: every prompt length, and every step of an eager decode (the key length grows by one). Flash and
    memory-efficient attention have no per-shape plan. Training keeps cuDNN: its shapes are fixed."""
    torch.backends.cuda.enable_cudnn_sdp(False)


class CachedAttention:
    """Attention through a cache's `update`: the keys and values it returns, masked as it says."""

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, *self.update(layer, q, k, v))


class KVCache(CachedAttention):
    def __init__(self, n_layers: int, capacity: int, pad: torch.Tensor | None = None) -> None:
        self.capacity = capacity
        self.pad = pad  # (B,) left-padding slots per row, or None
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers
        self.seen = 0

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Append k, v of shape (B, n_kv, T, hd) to `layer`; return its keys, values so far and how to mask them."""
        past, T = self.lengths[layer], k.shape[2]
        if past + T > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; layer {layer} needs {past + T}")
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_empty(B, H, self.capacity, D)
            self.values[layer] = v.new_empty(B, H, self.capacity, D)
        self.keys[layer][:, :, past:past + T] = k
        self.values[layer][:, :, past:past + T] = v
        self.lengths[layer] = past + T
        keys, values = self.keys[layer][:, :, :past + T], self.values[layer][:, :, :past + T]
        if self.pad is None:
            return keys, values, causal_mask(T, past, k.device), past == 0 and T > 1
        return keys, values, self._padded_mask(T, past), False

    def _padded_mask(self, q_len: int, past: int) -> torch.Tensor:
        """(B, 1, T, past + T): causal, padded keys hidden, padded queries see themselves."""
        device = self.pad.device
        keys = torch.arange(past + q_len, device=device)
        queries = past + torch.arange(q_len, device=device)
        mask = (keys[None, :] <= queries[:, None])[None] & (keys[None, None, :] >= self.pad[:, None, None])
        mask |= keys[None, None, :] == queries[None, :, None]
        return mask[:, None]

    def position_ids(self, q_len: int) -> torch.Tensor | None:
        """(B, T) position ids of the next `q_len` tokens (a padded row's first real token is position 0)."""
        if self.pad is None:
            return None
        slots = self.seen + torch.arange(q_len, device=self.pad.device)
        return (slots[None, :] - self.pad[:, None]).clamp_min(0)

    def advance(self, n_tokens: int) -> None:
        self.seen += n_tokens


def causal_mask(q_len: int, past: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask for queries that follow `past` cached keys; None where SDPA's own causal flag (past == 0) or no
    mask at all (a single query sees every cached key) is exact."""
    if past == 0 or q_len == 1:
        return None
    keys = torch.arange(past + q_len, device=device)
    return keys[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
