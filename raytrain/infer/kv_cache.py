"""The engine's KV memory: preallocated per-layer storage in slots.

Layer l holds keys and values of shape (n_slots, n_kv_l, max_len + 1, hd), allocated once from the memory budget.
A running sequence owns one slot and writes the token at position p to index p; index `max_len` is scratch, where
the idle rows of a decode batch write. Why slots rather than pages: attention reads a slot as a plain strided view,
so decode needs no block table, no gather and no paged-attention kernel, every decode step has a static shape
(CUDA graphs), and the cost, memory reserved up to `max_len` per sequence, is bounded by the `max_len` the engine
is configured with.

Three modes, set by the model runner before each forward:
- prefill: one sequence's chunk of T tokens at positions start..start+T-1 in its slot, causal over the slot's
  first start+T keys (SDPA: the flash kernel when start is 0);
- packed prefill: the first chunks of B prompts as one right-padded (B, T) batch, row b written at positions 0..T-1
  of slot `slots[b]` and causal over its own chunk (flash). A row's padding sits after its last token, so no real
  query attends to it, and its KV lands at indices the row's decode steps overwrite before they read them. Rows that
  only pad a batch to its static shape write to the scratch slot (`scratch_slot`, the slot after the last);
- decode: rows 0..W-1 (row = slot), one token each at `positions`, written at `write_index` (the position, or the
  scratch index for idle rows), attending to the first `length` keys of their slot under a per-row length mask.
  `rope_positions`, when given, are the (real-valued) positions RoPE rotates by instead: a superposed prompt's
  context is packed at indices 0..C-1 while its tokens sit at other positions (`raytrain/infer/superposition.py`).
A superposed prompt's KV, computed outside the slots, is copied in with `write`; with `key_bias` (superposition's
attenuation) the cache also holds a float32 bias per slot and key, added to decode attention's logits (zero except
where a superposed context wrote it, and zeroed when its slot is freed).
With `fused_attention` (CUDA, head_dim a power of two), a decode step's cache write and attention are one Triton
kernel per layer (`raytrain/infer/attention_kernel.py`) that reads only each row's own keys; past 128 keys in the
length bucket it splits them across programs (split-KV: a second, combining kernel).
"""

from __future__ import annotations

import math

import torch

from raytrain.models import ops
from raytrain.models.kv_cache import attention, causal_mask


def fused_attention_supported(head_dim: int) -> bool:
    """The Triton decode attention tiles the head dimension whole: a power of two, at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


class SlotKVCache:
    def __init__(self, kv_heads: list[int], head_dim: int, n_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, fused_attention: bool = False, scratch_slot: bool = False,
                 key_bias: bool = False) -> None:
        self.n_slots, self.max_len = n_slots, max_len
        self.scratch = n_slots if scratch_slot else None  # an extra slot the padding rows of a prefill write to
        self.fused_attention = self.tree_attention = None  # Triton kernels, imported (with triton) where they run
        if fused_attention:
            from raytrain.infer.attention_kernel import decode_attention, tree_attention

            self.fused_attention, self.tree_attention = decode_attention, tree_attention
        shape = [(n_slots + scratch_slot, h, max_len + 1, head_dim) for h in kv_heads]
        self.keys = [torch.zeros(s, dtype=dtype, device=device) for s in shape]
        self.values = [torch.zeros(s, dtype=dtype, device=device) for s in shape]
        self.key_bias = torch.zeros(n_slots, max_len + 1, device=device) if key_bias else None
        self.rows = torch.arange(n_slots, device=device)
        self.slot, self.seen = 0, 0  # prefill: the slot and the chunk's first position
        self.slots: torch.Tensor | None = None  # packed prefill: (B,) each row's slot
        self.positions: torch.Tensor | None = None  # decode: (W,) positions, or None in prefill mode
        self.rope_positions: torch.Tensor | None = None  # decode: (W,) float positions for RoPE, or None
        self.write_index = self.mask = None
        self.length = 0

    @staticmethod
    def bytes_per_token(kv_heads: list[int], head_dim: int, dtype: torch.dtype) -> int:
        return 2 * sum(kv_heads) * head_dim * torch.empty(0, dtype=dtype).element_size()

    def begin_prefill(self, slot: int, start: int) -> None:
        self.slot, self.seen, self.positions, self.slots = slot, start, None, None

    def begin_packed_prefill(self, slots: torch.Tensor) -> None:
        """slots (B,): the slot of each row of a packed batch of first chunks."""
        self.seen, self.positions, self.slots = 0, None, slots

    def begin_decode(self, positions: torch.Tensor, write_index: torch.Tensor, length: int,
                     rope_positions: torch.Tensor | None = None) -> None:
        """positions, write_index: (W,) device tensors (static buffers under CUDA graphs)."""
        self.positions, self.write_index, self.length, self.slots = positions, write_index, length, None
        self.rope_positions = rope_positions
        if self.fused_attention is None:  # the kernel masks by position itself
            keys = torch.arange(length, device=positions.device)
            self.mask = (keys[None, :] <= positions[:, None])[:, None, None]  # (W, 1, 1, length)

    # ---- the decoder's cache protocol ----------------------------------------------------------------------

    def position_ids(self, q_len: int) -> torch.Tensor | None:
        """(W, 1) explicit positions in decode; None in prefill (contiguous from `seen`)."""
        if self.positions is None:
            return None
        return (self.positions if self.rope_positions is None else self.rope_positions)[:, None]

    def write(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor], first: int, end: int,
              bias: torch.Tensor | None = None) -> None:
        """Copy indices first..end-1 of per-layer (n_kv, C, hd) keys and values, and of the keys' (C,) attention
        bias when given, into `slot`."""
        for K, V, k, v in zip(self.keys, self.values, keys, values):
            K[slot, :, first:end] = k[:, first:end]
            V[slot, :, first:end] = v[:, first:end]
        if bias is not None:
            if self.key_bias is None:
                raise ValueError("a context with an attention bias needs a cache built with key_bias")
            self.key_bias[slot, first:end] = bias[first:end]

    def free(self, slot: int) -> None:
        """A slot's sequence ended: its keys' bias back to zero for the next one."""
        if self.key_bias is not None:
            self.key_bias[slot].zero_()

    def advance(self, n_tokens: int) -> None:
        """Positions are the runner's business: nothing to count here."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        K, V = self.keys[layer], self.values[layer]
        if self.slots is not None:
            K[self.slots, :, :k.shape[2]] = k
            V[self.slots, :, :v.shape[2]] = v
            return attention(q, k, v, None, k.shape[2] > 1)
        if self.positions is None:
            s, start, T = self.slot, self.seen, k.shape[2]
            K[s, :, start:start + T] = k[0]
            V[s, :, start:start + T] = v[0]
            keys, values = K[s:s + 1, :, :start + T], V[s:s + 1, :, :start + T]
            return attention(q, keys, values, causal_mask(T, start, q.device), start == 0 and T > 1)
        if self.fused_attention is not None:
            return self.fused_attention(q, k, v, K, V, self.positions, self.write_index, max_position=self.length,
                                        key_bias=self.key_bias)
        W = q.shape[0]
        K[self.rows[:W], :, self.write_index] = k[:, :, 0]
        V[self.rows[:W], :, self.write_index] = v[:, :, 0]
        bias = self.key_bias[:W, None, None, :self.length] if self.key_bias is not None else None
        return decode_attention(q, K[:W, :, :self.length], V[:W, :, :self.length], self.mask, bias)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row over grouped KV heads without expanding them: q (W, n_q, 1, hd), keys/values
    (W, n_kv, L, hd) strided views of the slots, mask (W, 1, 1, L), bias (W, 1, 1, L) fp32 or None ->
    (W, n_q, 1, hd). Scores and softmax in fp32."""
    W, n_q, _, hd = q.shape
    n_kv = keys.shape[1]
    grouped = q.reshape(W, n_kv, n_q // n_kv, hd)  # query heads g*j..g*j+g-1 read KV head j
    scores = torch.matmul(grouped, keys.transpose(-1, -2))  # (W, n_kv, g, L)
    probs = ops.masked_softmax(scores, mask, 1 / math.sqrt(hd), values.dtype, bias)
    return torch.matmul(probs, values).reshape(W, n_q, 1, hd)
