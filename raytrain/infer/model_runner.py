"""The model runner: prefill chunks and batched decode steps over the slot KV cache, CUDA graphs on the GPU.

Decode inputs live on the device in per-slot buffers (`tokens`, `positions`, `write_index`, `live`), so a decode
step whose batch did not change needs no host-to-device copy: sampled tokens go straight back into `tokens` and
live rows' positions advance by one. A decode step covers rows 0..W-1 for a width bucket W and attends to the first
L keys of each slot for a length bucket L; on CUDA each (W, L) is captured once as a CUDA graph (the whole forward
as one launch, all graphs sharing one memory pool) and replayed, with its logits written into a static buffer. A
step whose rows are all greedy (`decode_greedy`) has graphs of its own that also take the argmax and advance the
inputs, so such a step launches nothing but its graph and the copy of its tokens to the host. A step of one row
runs `FusedDecodeStep` (`fused_decode.py`: five Triton kernels a layer) in place of the model's forward, where the
model allows it, also at real-valued positions.
Prefill takes the first chunks of a step's new prompts as one right-padded batch (`prefill_packed`: one forward for
many prompts, so a burst of arrivals costs one pass of kernel launches, not one per prompt) and a later chunk of a
long prompt alone (`prefill`, eager); SDPA's flash kernel for first chunks. An eager forward of a 1B model waits on
its kernel launches whatever its size (H200, 2026-12-04, `benchmarks/decode.py --prefill`: 1x256 tokens 45 ms
eagerly, 2.5 ms as a graph), so with `static_prefill_tokens` a packed batch is padded to a (rows, tokens) bucket
(at most 1.5x each way; padding rows write to the cache's scratch slot) and, on CUDA, each bucket is captured once
as a CUDA graph and replayed like a decode step. A superposed prompt's KV,
computed by `superposition.py`, is copied into its slot instead (`install`). Its rows then decode at real-valued
positions: slot index + `rope_offset` (a decode step with such rows is a graph of its own).
With a `selection` (a model carrying LoRA adapter slots, `raytrain.infer.adapters`) every forward runs with each
row's adapter slot read from `adapter_ids` (per KV slot, -1: the base alone), a static buffer the engine fills before
the step (`select_adapters`), so the captured graphs read the step's adapters too. The ids are also kept on the host:
a forward none of whose rows has an adapter runs the base alone, without the LoRA terms (a decode step of such rows
is a graph of its own), and a prefill chunk uses its adapter's weights directly, not gathered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from raytrain.infer.kv_cache import SlotKVCache
from raytrain.models.decoder import Decoder
from raytrain.models.lora import AdapterSelection

MIN_LENGTH_BUCKET = 128
MIN_PREFILL_TOKENS = 16


def width_buckets(n_slots: int) -> list[int]:
    """Decode batch widths: 1, 2, 4, 8, then multiples of 8 up to 32 and of 16 beyond (few graphs, little padding)."""
    widths = [w for w in (1, 2, 4) if w < n_slots] + list(range(8, 33, 8)) + list(range(48, n_slots + 16, 16))
    return sorted({min(w, n_slots) for w in widths})


def geometric_buckets(low: int, high: int) -> list[int]:
    """low, 1.5 low, 2 low, 3 low, 4 low, ... up to high (included): at most 1.5x padding from a few dozen shapes."""
    sizes, size = {high}, low
    while size < high:
        sizes |= {size, size * 3 // 2}
        size *= 2
    return sorted(s for s in sizes if s <= high)


def bucket(value: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= value)


class ModelRunner:
    def __init__(self, model: Decoder, n_slots: int, max_len: int, cuda_graphs: bool = True,
                 compile_decode: bool = False, selection: AdapterSelection | None = None,
                 fused_attention: bool = False, static_prefill_tokens: int = 0, fused_decode: bool = False,
                 dependent_launch: bool = True, key_bias: bool = False) -> None:
        """static_prefill_tokens: the most padded tokens (rows x tokens) a packed prefill runs as a static-shape
        bucket (a CUDA graph with `cuda_graphs` on CUDA); larger ones, and all with 0, run eagerly as they come.
        fused_decode: one-row decode steps through `FusedDecodeStep` (Triton) where the model allows it, its kernels
        programmatic dependent launches with `dependent_launch` (sm90+). key_bias: the cache holds a per-key
        attention bias for installed contexts (superposition's attenuation)."""
        self.model = model
        self.device = model.embed.weight.device
        kv_heads = [block.attn.n_kv for block in model.layers]
        self.cache = SlotKVCache(kv_heads, model.cfg.head_dim, n_slots, max_len, model.embed.weight.dtype,
                                 self.device, fused_attention, scratch_slot=static_prefill_tokens > 0,
                                 key_bias=key_bias)
        self.n_slots, self.max_len = n_slots, max_len
        self.widths = width_buckets(n_slots)
        self.lengths = sorted({min(max_len, MIN_LENGTH_BUCKET << i) for i in range(max_len.bit_length())})
        self.tokens = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.write_index = torch.full((n_slots,), max_len, dtype=torch.long, device=self.device)
        self.live = torch.zeros(n_slots, dtype=torch.bool, device=self.device)
        self.rope_offset = torch.zeros(n_slots, device=self.device)  # RoPE position minus KV index, per slot
        self.offset_slots: set[int] = set()  # slots whose offset is not 0
        self.adapter_ids = torch.full((n_slots,), -1, dtype=torch.long, device=self.device)
        self.adapter_slots = [-1] * n_slots  # `adapter_ids` on the host
        self.selection = selection
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # (W, L, shifted, adapted, greedy) -> the decode step's graph
        self.graphs: dict[tuple[int, int, bool, bool, bool], torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        self.logits = torch.empty(n_slots, model.cfg.rows, dtype=model.embed.weight.dtype, device=self.device)
        self.sampled = torch.zeros(n_slots, dtype=torch.long, device=self.device)  # greedy steps' tokens
        # compiled with dynamic shapes: one compilation for every (width, length) bucket, each then a CUDA graph
        self._decode_forward = torch.compile(self._forward, dynamic=True) if compile_decode else self._forward
        self.static_prefill_tokens = static_prefill_tokens
        self.prefill_rows = geometric_buckets(1, n_slots)
        self.prefill_lengths = geometric_buckets(MIN_PREFILL_TOKENS, max_len)
        # one flat buffer for a bucket's tokens, slots and last indices: one host-to-device copy per prefill
        self.prefill_inputs = torch.zeros(static_prefill_tokens + 2 * n_slots, dtype=torch.long, device=self.device)
        self.prefill_logits = self.logits.new_empty(n_slots if static_prefill_tokens else 0, model.cfg.rows)
        self.prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.fused_step = None
        if fused_decode:  # imported here: triton only where it runs
            from raytrain.infer.fused_decode import FusedDecodeStep, fused_decode_unsupported

            if fused_decode_unsupported(model) is None:
                self.fused_step = FusedDecodeStep(model, self.cache, dependent_launch)

    # ---- prefill ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """Write the KV of prompt tokens at positions start.. into `slot`; return the last one's logits (1, V)."""
        self.cache.begin_prefill(slot, start)
        x = torch.tensor([tokens], device=self.device)
        with self._adapters(slice(slot, slot + 1), captured=False):
            return self.model(x, cache=self.cache, last_only=True)[:, -1]

    @torch.inference_mode()
    def prefill_packed(self, slots: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """Write the KV of B prompts' first chunks at positions 0.. of their slots in one forward, right-padded to the
        longest (or to its static bucket); return each chunk's last-token logits (B, V)."""
        shape = self.prefill_shape(len(chunks), max(len(chunk) for chunk in chunks))
        if shape is None or self.selection is not None and any(self.adapter_slots[s] >= 0 for s in slots):
            return self._prefill_eager(slots, chunks)
        self._load_prefill_inputs(shape, slots, chunks)
        with self._adapters(slots, captured=False):  # the base alone
            if not self.cuda_graphs:
                self._prefill_static(*shape)
            elif shape not in self.prefill_graphs:
                self.prefill_graphs[shape] = self.capture(lambda: self._prefill_static(*shape))
        if self.cuda_graphs:
            self.prefill_graphs[shape].replay()
        return self.prefill_logits[:len(chunks)].clone()  # the next prefill overwrites the buffer

    def prefill_shape(self, rows: int, longest: int) -> tuple[int, int] | None:
        """The static (rows, tokens) bucket of a packed prefill, or None: it runs eagerly."""
        if not self.static_prefill_tokens:
            return None
        shape = bucket(rows, self.prefill_rows), bucket(longest, self.prefill_lengths)
        return shape if shape[0] * shape[1] <= self.static_prefill_tokens else None

    def _load_prefill_inputs(self, shape: tuple[int, int], slots: list[int], chunks: list[list[int]]) -> None:
        """The bucket's inputs into `prefill_inputs`: tokens (R, T) right-padded with 0, each row's slot (padding
        rows: the scratch slot), each row's last index."""
        rows, length = shape
        padding = rows - len(chunks)
        tokens = [t for chunk in chunks for t in chunk + [0] * (length - len(chunk))] + [0] * (padding * length)
        values = tokens + slots + [self.cache.scratch] * padding + [len(c) - 1 for c in chunks] + [0] * padding
        host = torch.tensor(values, pin_memory=self.device.type == "cuda")
        self.prefill_inputs[:len(values)].copy_(host, non_blocking=True)

    def _prefill_static(self, rows: int, length: int) -> None:
        """A bucket's forward over `prefill_inputs`, its last-token logits into `prefill_logits` (as captured)."""
        tokens = self.prefill_inputs[:rows * length].view(rows, length)
        slots, last = self.prefill_inputs[rows * length:rows * length + 2 * rows].view(2, rows)
        self.cache.begin_packed_prefill(slots)
        hidden = self.model.hidden(tokens, cache=self.cache)  # (R, T, d)
        self.prefill_logits[:rows] = self.model.logits(hidden[self.cache.rows[:rows], last])

    def _prefill_eager(self, slots: list[int], chunks: list[list[int]]) -> torch.Tensor:
        longest = max(len(chunk) for chunk in chunks)
        x = torch.tensor([chunk + [0] * (longest - len(chunk)) for chunk in chunks], device=self.device)  # (B, T)
        rows = torch.tensor(slots, device=self.device)
        last = torch.tensor([len(chunk) - 1 for chunk in chunks], device=self.device)
        self.cache.begin_packed_prefill(rows)
        with self._adapters(slots, captured=False):
            hidden = self.model.hidden(x, cache=self.cache)  # (B, T, d)
        return self.model.logits(hidden[torch.arange(len(chunks), device=self.device), last])  # (B, V)

    def install(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor], first: int, end: int,
                bias: torch.Tensor | None = None) -> None:
        """Copy KV computed elsewhere (per layer (n_kv, C, hd)), and its keys' (C,) attention bias when given, into
        `slot` at indices first..end-1."""
        self.cache.write(slot, keys, values, first, end, bias)

    # ---- decode -----------------------------------------------------------------------------------------------

    def join(self, slot: int, token: torch.Tensor, position: int, rope_offset: float = 0.0) -> None:
        """Put a sequence into the decode batch: `token` (a 1-element device tensor) at KV index `position`, rotated
        by RoPE as position + `rope_offset`."""
        self.tokens[slot] = token.reshape(())
        self.positions[slot] = position
        self.write_index[slot] = position
        self.live[slot] = True
        self.rope_offset[slot] = rope_offset
        (self.offset_slots.add if rope_offset else self.offset_slots.discard)(slot)

    def leave(self, slot: int) -> None:
        self.live[slot] = False
        self.positions[slot] = 0
        self.write_index[slot] = self.max_len
        self.rope_offset[slot] = 0.0
        self.offset_slots.discard(slot)
        self.cache.free(slot)

    def decode_shape(self, highest_slot: int, longest: int) -> tuple[int, int]:
        """(W, L) buckets for a batch whose highest busy slot is `highest_slot` and longest row `longest` tokens."""
        return bucket(highest_slot + 1, self.widths), bucket(longest, self.lengths)

    def decode(self, width: int, length: int) -> torch.Tensor:
        """One token for rows 0..width-1 -> logits (width, V); idle rows compute garbage that nobody reads. The
        caller samples and then `advance`s."""
        self._step(width, length, greedy=False)
        return self.logits[:width]

    def decode_greedy(self, width: int, length: int) -> torch.Tensor:
        """A decode step whose rows are all greedy: the argmax and `advance` run in the step's graph too ->
        tokens (width,) (the tokens a sampler's argmax of `decode`'s logits would give)."""
        self._step(width, length, greedy=True)
        return self.sampled[:width]

    @torch.inference_mode()
    def _step(self, width: int, length: int, greedy: bool) -> None:
        shifted = any(slot < width for slot in self.offset_slots)
        key = (width, length, shifted, any(s >= 0 for s in self.adapter_slots[:width]), greedy)
        with self._adapters(slice(0, width), captured=self.cuda_graphs):
            if not self.cuda_graphs:
                return self._run(width, length, shifted, greedy)
            if key not in self.graphs:
                self._capture(key)
        self.graphs[key].replay()

    def _run(self, width: int, length: int, shifted: bool, greedy: bool) -> None:
        """The decode step as captured: logits into their buffer; with `greedy`, the argmax and advance as well."""
        self.logits[:width] = self._decode_forward(width, length, shifted)
        if greedy:
            self.sampled[:width] = self.logits[:width, :self.model.cfg.vocab_size].argmax(-1)
            self.advance(width, self.sampled[:width])

    def select_adapters(self, slots: list[int]) -> None:
        """Each KV slot's adapter slot (-1: the base alone), copied from pinned memory without waiting for the step
        in flight (the copy is queued behind it)."""
        self.adapter_slots = list(slots)
        self.adapter_ids.copy_(torch.tensor(slots, pin_memory=self.device.type == "cuda"), non_blocking=True)

    def _adapters(self, rows: slice | list[int], captured: bool) -> contextlib.AbstractContextManager:
        """The adapter of each row (KV slots `rows`) during a forward: the base alone when no row has one; in an eager
        forward whose rows share one adapter (a prefill chunk), that slot's weights as views; else the per-row ids
        (for a slice, a view of `adapter_ids`: graphs capture reads of the buffer)."""
        if self.selection is None:
            return contextlib.nullcontext()
        sliced = isinstance(rows, slice)
        slots = set(self.adapter_slots[rows] if sliced else [self.adapter_slots[r] for r in rows])
        if slots == {-1}:
            return self.selection.base()
        if len(slots) == 1 and not captured:
            return self.selection.single(slots.pop())
        return self.selection.rows(self.adapter_ids[rows if sliced else torch.tensor(rows, device=self.device)])

    def advance(self, width: int, sampled: torch.Tensor) -> None:
        """After a decode step: sampled (width,) tokens become the next inputs; live rows move one position on."""
        live = self.live[:width]
        self.tokens[:width] = torch.where(live, sampled, self.tokens[:width])
        self.positions[:width] += live
        self.write_index[:width] = torch.where(live, self.positions[:width], self.max_len)

    def _forward(self, width: int, length: int, shifted: bool = False) -> torch.Tensor:
        """`shifted`: some row decodes at real-valued positions (RoPE angles computed, not looked up)."""
        rope = self.positions[:width] + self.rope_offset[:width] if shifted else None
        if self.fused_step is not None and width == 1:
            return self.fused_step(self.tokens[:1], self.positions[:1], self.write_index[:1], rope, length)
        self.cache.begin_decode(self.positions[:width], self.write_index[:width], length, rope)
        return self.model(self.tokens[:width, None], cache=self.cache)[:, -1]

    def _capture(self, key: tuple[int, int, bool, bool, bool]) -> None:
        width, length, shifted, _, greedy = key  # the adapter context is the caller's
        # the warm-up and capture runs must not touch live rows' KV, inputs or positions
        saved = [t.clone() for t in (self.write_index, self.live, self.tokens, self.positions)]
        self.write_index.fill_(self.max_len)
        self.live.zero_()
        self.graphs[key] = self.capture(lambda: self._run(width, length, shifted, greedy))
        for buffer, value in zip((self.write_index, self.live, self.tokens, self.positions), saved):
            buffer.copy_(value)

    def capture(self, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """`run` captured as a CUDA graph in the pool all graphs share (each writes its outputs to buffers outside
        the pool). Capturing computes nothing: the caller replays the graph."""
        graph = capture_graph(run, self.graph_pool)
        self.graph_pool = graph.pool()
        return graph


def capture_graph(run: Callable[[], None], pool: tuple | None) -> torch.cuda.CUDAGraph:
    """`run` captured as a CUDA graph in memory pool `pool` (None: a new one), after a warm-up run."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: compilation, cuBLAS handles, lazy inits
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


class PlainSequence:
    """One prompt through the runner's own prefill and decode (a one-slot runner, eager), with `LazySequence`'s
    interface: the dense baseline LazyLLM is measured against."""

    def __init__(self, model: Decoder, prompt: list[int], capacity: int) -> None:
        self.runner = ModelRunner(model, 1, capacity, cuda_graphs=False)
        self.cache = self.runner.cache
        self.prompt, self.length = prompt, 0

    def prefill(self) -> torch.Tensor:
        self.length = len(self.prompt)
        return self.runner.prefill(0, self.prompt, 0)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """token (1,) -> logits (1, V) of the next position."""
        self.runner.join(0, token, self.length)
        self.length += 1
        return self.runner.decode(1, bucket(self.length, self.runner.lengths))

    def prompt_fraction_computed(self) -> float:
        return 1.0  # every prompt token at every layer
