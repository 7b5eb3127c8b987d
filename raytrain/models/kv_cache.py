"""Key/value cache for incremental decoding.

Each layer owns a preallocated (B, n_kv, capacity, hd) buffer pair and its own fill length, so layers may hold
different numbers of tokens (the LazyLLM engine prunes per layer). `seen` counts the tokens the model has been fed,
which is the next position id whatever each layer kept.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers
        self.seen = 0

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape (B, n_kv, T, hd) to `layer`; return that layer's keys and values so far."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; layer {layer} needs {end}")
        if self.keys[layer] is None:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_empty(B, H, self.capacity, D)
            self.values[layer] = v.new_empty(B, H, self.capacity, D)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.seen += n_tokens
