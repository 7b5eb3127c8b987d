"""The generation engine: continuous batching over KV slots, used by `raytrain generate`, the pipelines and Serve.

Requests join at any time. Each `step` the scheduler (`scheduler.py`) picks one token for every decoding sequence
and prompt chunks within a token budget; the model runner (`model_runner.py`) prefills the chunks (the first chunks
of a step's new prompts packed into one forward, `pack_groups`) and decodes the batch (a CUDA graph on the GPU) over
the slot KV cache (`kv_cache.py`); the sampling table (`sampling.py`) picks every row's token with tensor ops, and
the step's tokens cross to the host in one copy. Then each sequence's text advances through its incremental
detokenizer (`text.py`), finished sequences free their slots, and the new deltas go to each request's sink. With
`lazy` on, prompts of at least `lazyllm.min_prompt_tokens` tokens run through LazyLLM (`lazyllm.py`) one at a time
beside the batch (the paper's batch size 1). With `specstream` set (a model with speculative streams), greedy
requests decode by Speculative Streaming (`specstream.py`): their prompt's last token also drafts, and each step
verifies a draft tree and drafts the next in one forward pass, several tokens per step, beside the plain batch. A
RAG request (`Request.forkjoin`) with superposition on runs its fork-join prefill (`superposition.py`), one request
at a time and one batched forward per step (the batch decodes in between), then waits for a slot like a prompt whose
KV is copied in rather than computed, and decodes in the batch;
with superposition off it is the naive RAG prompt (every document in one sequence).

Three ways in: `generate`/`stream` step the engine on the caller's thread; `astream` and `add_request` hand requests
to a background thread that steps while there is work, for asyncio servers (each request joins the running batch the
step after it arrives, and a step's deltas reach each event loop in one wake-up, `LoopMailbox`; `abort` or leaving
the iteration cancels it at the next step). A request that can never fit (prompt + max_new_tokens beyond the context
window) or is malformed fails in the caller before any compute.

With `adapters` (an `AdapterSlots` on the model: many LoRA adapters on one base) each request names its adapter;
before each step the adapter of every running sequence goes through `adapters.slots_of` (loaded on first use, LRU)
into the runner's per-slot ids, so one batch mixes adapters row by row, and a request waits in the queue while its
adapter does not fit beside the running ones (never failed for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytrain.config import ConfigError, RaytrainError
from raytrain.infer.forkjoin import ForkJoinPrompt
from raytrain.infer.adapters import AdapterSlots
from raytrain.infer.lazyllm import LazyConfig, LazySequence, pays_off
from raytrain.infer.kv_cache import SlotKVCache, fused_attention_supported
from raytrain.infer.model_runner import ModelRunner
from raytrain.infer.sampling import SamplingParams, SamplingTable
from raytrain.infer.scheduler import Plan, Scheduler, Sequence
from raytrain.infer.specstream import SpecStreamConfig, SpecStreamDecoder
from raytrain.infer.superposition import Selection, Superposer, SuperpositionConfig, run_stages
from raytrain.infer.text import TextStream, fast_decode
from raytrain.models import ops
from raytrain.models.decoder import Decoder
from raytrain.models.kv_cache import use_inference_attention


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # KV slots: sequences decoding at once
    max_model_len: int | None = None  # tokens per slot (prompt + output); None = the model's context window
    kv_memory_gb: float | None = None  # KV budget: fewer slots than max_batch_size if they do not fit; None = no cap
    max_step_tokens: int = 2048  # tokens computed per step (decode rows + prompt chunks): bounds a prefill's stall
    cuda_graphs: bool = True  # decode steps as CUDA graphs (GPU only)
    fused_kernels: bool = True  # the decoder's elementwise chains as compiled fused kernels (GPU only)
    compile_decode: bool = False  # the whole decode step through torch.compile before its graphs (GPU only)
    fused_attention: bool = True  # decode attention and its cache write as one Triton kernel (GPU only)
    fused_decode: bool = True  # one-row decode steps as five Triton kernels a layer, where the model allows (GPU)
    dependent_launch: bool = True  # the fused step's kernels start while the previous one drains (PDL, sm90+)
    packed_prefill: bool = True  # a step's first prompt chunks as one right-padded forward (groups of like length)
    prefill_graphs: bool = True  # packed prefills up to 2 x max_step_tokens as CUDA graphs per shape bucket (GPU)
    overlap: bool | None = None  # host work of step t while the device runs step t+1; None = on CUDA
    lazy: bool = False  # LazyLLM for prompts of at least lazyllm.min_prompt_tokens tokens
    lazyllm: LazyConfig = field(default_factory=LazyConfig)
    specstream: SpecStreamConfig | None = None  # Speculative Streaming for greedy requests; None = off
    superposition: SuperpositionConfig = field(default_factory=SuperpositionConfig)  # for RAG requests


@dataclass
class Request:
    prompt: str | list[int] = ""  # text (BOS is prepended) or token ids (used as given); or a forkjoin
    params: SamplingParams = field(default_factory=SamplingParams)
    cancel: threading.Event | None = field(default=None, compare=False)  # set: stop at the next step
    forkjoin: ForkJoinPrompt | None = None  # a RAG prompt: preamble, documents, query, postamble (token ids)
    adapter: str | None = None  # a LoRA adapter of the engine's `adapters` (None: the base alone)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled"
    prompt_tokens: int
    ttft_s: float  # wall time from the request's arrival to its first token
    prompt_fraction_computed: float = 1.0  # share of prompt (token, layer) pairs computed (< 1 with LazyLLM)
    superposition: Selection | None = None  # a superposed request's kept documents and path scores


@dataclass
class Launched:
    """A step's queued compute: who owns which sampled token, and the tokens on their way to the host."""

    owners: list[tuple[Sequence, int]]
    tokens: tuple[torch.Tensor, torch.cuda.Event | None]
    synced: bool = False  # the host already waited for this step's compute (a tree step reads its counts)


@dataclass
class Delta:
    """A streaming event: new final text of request `index`; its last event also carries the `completion`."""

    index: int
    text: str
    completion: Completion | None = None


class Engine:
    def __init__(self, model: Decoder, tokenizer: Any, config: EngineConfig | None = None,
                 adapters: AdapterSlots | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.adapters = adapters
        if adapters is not None and self.config.lazy:
            raise ConfigError("lazy: LazyLLM runs one sequence beside the batch and takes no LoRA adapters; serve "
                              "adapters with lazy=false")
        self.device = model.embed.weight.device
        self.max_len = self._max_len()
        self.tree_margin = SpecStreamDecoder.margin(self.config.specstream, model)  # a draft tree past the window
        n_slots = self._slots()
        self.scheduler = Scheduler(n_slots, max(1, self.config.max_step_tokens),
                                   self._adapter_fits if adapters is not None else None)
        cuda = self.device.type == "cuda"
        if cuda:  # process-wide: the replica or benchmark process runs one engine configuration at a time
            ops.use_fused_kernels(self.config.fused_kernels)
            use_inference_attention()
        self.runner = ModelRunner(model, n_slots, self.max_len + self.tree_margin, self.config.cuda_graphs,
                                  compile_decode=cuda and self.config.compile_decode,
                                  selection=adapters.selection if adapters is not None else None,
                                  fused_attention=cuda and self.config.fused_attention
                                  and fused_attention_supported(model.cfg.head_dim),
                                  static_prefill_tokens=self._static_prefill_tokens(),
                                  fused_decode=cuda and self.config.fused_decode,
                                  dependent_launch=self.config.dependent_launch,
                                  key_bias=self.config.superposition.attenuation is not None)
        self.speculative = (SpecStreamDecoder(model, self.runner, self.config.specstream)
                            if self.config.specstream is not None else None)
        self.sampling = SamplingTable(n_slots + 1, model.cfg.vocab_size, self.device)  # + a row for LazyLLM
        self.lazy_waiting: deque[Sequence] = deque()
        self.lazy_running: Sequence | None = None
        self.superposer = Superposer(model, self.config.superposition, "generation.superposition")
        self.superposing: deque[Sequence] = deque()  # superposed requests waiting for their fork-join prefill
        self._inbox: deque[Sequence] = deque()  # added from other threads, admitted at the next step
        self._lock = threading.Lock()  # one step at a time
        self._thread_lock = threading.Lock()  # the loop thread and the mailboxes: never waits for a step
        self._wake = threading.Event()
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = \
            weakref.WeakKeyDictionary()
        self._loop_thread: threading.Thread | None = None
        self.steps = 0
        self.decode_rows: Counter[int] = Counter()  # decode steps by the number of sequences they carried
        self.overlap = self.config.overlap if self.config.overlap is not None else self.device.type == "cuda"
        self._inflight: Launched | None = None  # the launched step whose host work is still to do (overlap)
        self._adapter_rows: list[str | None] | None = None  # each KV slot's adapter in `runner.adapter_ids`
        pinned = self.device.type == "cuda"
        # a step's tokens: first tokens and decode rows (a slot each), a tree step's δ + 1 per slot, LazyLLM's one
        per_slot = 2 + (self.speculative.depth if self.speculative is not None else 0)
        self._pinned = [torch.empty(per_slot * n_slots + 1, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.eos_token_id = tokenizer.eos_token_id
        self._detokenize = fast_decode(tokenizer)
        if self.config.lazy:
            self.config.lazyllm.schedule(len(model.layers))  # a bad schedule fails here, before any request

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EngineConfig | None = None, device: str = "cpu",
                        dtype: torch.dtype | None = None, tokenizer: str | None = None,
                        keep_compressed: bool = False, adapter: str | Path | None = None,
                        adapters: dict[str, str | Path] | None = None, adapter_slots: int = 4,
                        adapters_key: str = "adapters") -> Engine:
        """`keep_compressed`: compressed layers stay compressed in memory; `adapter`: a LoRA adapter of this base
        (both as `load_pretrained` takes them). `adapters` (name -> directory): many adapters selected per request,
        `adapter_slots` of them in memory at once, all checked now (errors name `adapters_key.<name>`)."""
        from raytrain.checkpoint.hf import load_pretrained

        pretrained = load_pretrained(path, device=device, dtype=dtype, tokenizer=tokenizer,
                                     keep_compressed=keep_compressed, adapter=adapter)
        if pretrained.tokenizer is None:
            raise RaytrainError(f"{pretrained.path} has no tokenizer files; pass a tokenizer directory")
        slots = None
        if adapters:
            if adapter is not None:
                raise ConfigError("adapter and adapters: put one adapter on the base, or serve several, not both")
            slots = AdapterSlots.from_dirs(pretrained.model, pretrained.path, adapters, adapter_slots, adapters_key)
        return cls(pretrained.model, pretrained.tokenizer, config, slots)

    def _max_len(self) -> int:
        window, asked = self.model.cfg.max_seq_len, self.config.max_model_len
        if asked is not None and not 1 <= asked <= window:
            raise ConfigError(f"max_model_len={asked} must be within 1..{window} (the model's context window)")
        return asked or window

    def _slots(self) -> int:
        slots, budget = self.config.max_batch_size, self.config.kv_memory_gb
        if slots < 1:
            raise ConfigError(f"max_batch_size={slots} must be >= 1")
        if budget is None:
            return slots
        per_slot = (self.max_len + 1 + self.tree_margin) * SlotKVCache.bytes_per_token(
            [b.attn.n_kv for b in self.model.layers], self.model.cfg.head_dim, self.model.embed.weight.dtype)
        fit = int(budget * 2 ** 30 // per_slot) - bool(self._static_prefill_tokens())  # the scratch slot
        if fit < 1:
            raise ConfigError(f"kv_memory_gb={budget} holds no slot of max_model_len={self.max_len} tokens "
                              f"({per_slot / 2 ** 30:.3f} GiB each); raise it or lower max_model_len")
        return min(slots, fit)

    def _static_prefill_tokens(self) -> int:
        """The most padded tokens a packed prefill runs as a CUDA graph; 0 (always eager) off the GPU."""
        graphs = self.device.type == "cuda" and self.config.cuda_graphs and self.config.prefill_graphs
        return 2 * max(1, self.config.max_step_tokens) if graphs else 0

    # ---- requests ---------------------------------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        return self.max_len

    @property
    def n_slots(self) -> int:
        return self.runner.n_slots

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: text gets BOS prepended, token ids are used as given."""
        text = isinstance(prompt, str)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if text else list(prompt)
        if not ids:
            raise RaytrainError("the prompt is empty")
        if text and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        vocab = self.model.cfg.vocab_size
        if not text and any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RaytrainError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def superposed(self, request: Request) -> bool:
        """Whether a request runs through superposition prompting (a RAG request, with it on)."""
        fj = request.forkjoin
        return fj is not None and (fj.superpose if fj.superpose is not None else self.config.superposition.enabled)

    def encode(self, request: Request) -> list[int]:
        """Prompt token ids, checked against the context window before any compute (a superposed request's are
        known after its fork-join prefill: its worst case is checked, and [] returned)."""
        if request.adapter is not None and (self.adapters is None or not self.adapters.serves(request.adapter)):
            raise RaytrainError(f"adapter {request.adapter!r} is not one this engine serves")
        if request.adapter is not None and request.forkjoin is not None:
            raise RaytrainError("a RAG (forkjoin) request runs on the base model; it takes no adapter")
        if request.forkjoin is not None and request.prompt:
            raise RaytrainError("a request takes a prompt or a forkjoin prompt, not both")
        if self.superposed(request):
            self.superposer.check(request.forkjoin, request.params.max_new_tokens, self.max_len)
            return []
        if request.forkjoin is not None:
            request.forkjoin.check(self.model.cfg.vocab_size)
        ids = self.tokenize(request.forkjoin.flat() if request.forkjoin is not None else request.prompt)
        if len(ids) + request.params.max_new_tokens > self.max_len:
            raise RaytrainError(f"prompt ({len(ids)} tokens) + max_new_tokens ({request.params.max_new_tokens}) "
                                f"exceeds the model's context window of {self.max_len} tokens")
        return ids

    def add_request(self, request: Request, sink: Callable[[list], None], index: int = 0,
                    prompt: list[int] | None = None) -> Sequence:
        """Queue a request (any thread); after each step `sink` receives the list of its new Delta objects (or the
        exception that ended it). It joins the batch at the next step: run `step` yourself, or let the background
        loop run it (`start_loop`)."""
        ids = prompt if prompt is not None else self.encode(request)
        seed = request.params.seed if request.params.seed is not None else random.getrandbits(64)
        seq = Sequence(ids, request.params, TextStream(self.tokenizer, request.params.stop, self._detokenize), sink,
                       index=index, cancel=request.cancel, seed=seed, adapter=request.adapter,
                       arrival=time.perf_counter(), forkjoin=request.forkjoin if self.superposed(request) else None)
        self._inbox.append(seq)
        self._wake.set()
        return seq

    # ---- synchronous use --------------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Completion]:
        done = {d.index: d.completion for d in self.stream(requests) if d.completion is not None}
        return [done[i] for i in range(len(requests))]

    def stream(self, requests: list[Request]) -> Iterator[Delta]:
        """Deltas of all requests as they are produced; each request's last delta carries its `Completion`."""
        prompts = [self.encode(r) for r in requests]  # validate every request before computing any
        out: deque[Any] = deque()
        for i, (request, ids) in enumerate(zip(requests, prompts)):
            self.add_request(request, out.extend, i, ids)
        remaining = len(requests)
        while remaining:
            if not out:
                self.step()
            while out:
                item = out.popleft()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.completion is not None
                yield item

    # ---- the step ---------------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.has_work() or self.lazy_waiting or self.lazy_running
                    or self._inflight or self.superposing)

    def step(self) -> None:
        """Admit queued requests, launch one step's compute, hand every new delta to its sink."""
        with self._lock:
            self.steps += 1
            try:
                outputs = self._step()
            except Exception as e:  # a failed step ends every request in flight, never the engine
                outputs = [(seq, e) for seq in self._drop_all()]
        by_sink: dict[Callable, list] = defaultdict(list)  # one call per sink and step (one wake-up per consumer)
        for seq, item in outputs:
            by_sink[seq.sink].append(item)
        for sink, items in by_sink.items():
            sink(items)
        with self._thread_lock:  # event loops register from their own threads
            mailboxes = list(self._mailboxes.values())
        for mailbox in mailboxes:
            mailbox.flush()

    def _step(self) -> list[tuple[Sequence, Any]]:
        """With `overlap`, the host work of the previous step (detokenization, stop strings, deltas) runs while the
        device computes this one: a sequence that hit EOS or a stop string computes one extra token, discarded."""
        self._admit()
        outputs = [(seq, self._finish(seq, "cancelled")) for seq in self._cancelled()]
        self._superpose()
        launched = self._launch(self.scheduler.schedule())
        if not self.overlap:
            return outputs + self._process(launched)
        previous, self._inflight = self._inflight, launched
        if launched is not None and launched.synced:  # its tokens are known: deferring them would only cost a step
            self._inflight = None
            return outputs + self._process(previous) + self._process(launched)
        return outputs + self._process(previous)

    def _admit(self) -> None:
        while self._inbox:
            seq = self._inbox.popleft()
            if seq.forkjoin is not None:
                self.superposing.append(seq)
                continue
            lazy = self._runs_lazy(len(seq.prompt))
            if not lazy and self._speculates(seq):
                seq.speculates = True
            (self.lazy_waiting if lazy else self.scheduler.waiting).append(seq)

    def _base_only(self) -> contextlib.AbstractContextManager:
        """Forwards outside the runner's per-row adapter ids (superposed prefill, draft trees) run on the base."""
        return self.adapters.selection.base() if self.adapters is not None else contextlib.nullcontext()

    def _speculates(self, seq: Sequence) -> bool:
        """Speculative Streaming for greedy requests on the base model (its trees run without adapter slots)."""
        return self.speculative is not None and seq.adapter is None and self.speculative.accepts(seq.params)

    def _adapter_fits(self, seq: Sequence) -> bool:
        return self.adapters.fits(seq.adapter, (s.adapter for s in self.scheduler.running))

    def _select_adapters(self) -> None:
        """The adapter slot of every KV slot's sequence into the runner's ids (loading adapters on first use), when
        the rows' adapters changed."""
        names: list[str | None] = [None] * self.n_slots
        for seq in self.scheduler.running:
            names[seq.slot] = seq.adapter
        if names != self._adapter_rows:
            self.runner.select_adapters(self.adapters.slots_of(names))
            self._adapter_rows = names

    def _runs_lazy(self, prompt_tokens: int) -> bool:
        """LazyLLM for long prompts, unless its schedule measured no faster for this length class: those prompts
        join the batch (CUDA-graph decode) rather than a one-sequence plain path."""
        lazy = self.config.lazyllm
        if not self.config.lazy or prompt_tokens < lazy.min_prompt_tokens:
            return False
        return not lazy.never_slower or pays_off(self.model, lazy, prompt_tokens)

    def _superpose(self) -> None:
        """One stage of the oldest superposed request's fork-join prefill: one batched forward, so that the running
        requests decode between its stages (`superposition.interleave`; off: the whole prefill in one step). When it
        is done, the request waits for a slot like a prompt, the context's KV ready to copy in."""
        if not self.superposing:
            return
        seq = self.superposing[0]  # still queued while it runs: a failure ends it with the others in flight
        if seq.stages is None:
            seq.stages = self.superposer.stages(seq.forkjoin)
        try:
            with self._base_only():
                next(seq.stages)
                if not self.config.superposition.interleave:
                    seq.context = run_stages(seq.stages)
        except StopIteration as done:
            seq.context = done.value
        if seq.context is not None:
            seq.prompt = seq.context.tokens
            self.scheduler.waiting.append(self.superposing.popleft())

    def _cancelled(self) -> list[Sequence]:
        every = [*self.scheduler.waiting, *self.scheduler.running, *self.lazy_waiting, self.lazy_running,
                 *self.superposing]
        return [s for s in every if s is not None and (s.aborted or (s.cancel is not None and s.cancel.is_set()))]

    def _launch(self, plan: Plan) -> Launched | None:
        """Queue the plan's compute: prompt chunks (a first token for each finished prompt), the decode batch and
        the LazyLLM sequence; start copying every sampled token to the host. Sequences whose last token is sampled
        give their slot back now."""
        if self.adapters is not None and self.scheduler.running:
            self._select_adapters()
        firsts = self._prefill(plan.prefills)
        sampled = [token for _, token in firsts]  # every token sampled this step, on the device
        owners = [(seq, i) for i, (seq, _) in enumerate(firsts)]  # (sequence, index of its token in their concat)
        plain = [seq for seq in plan.decodes if not seq.speculates]
        if plain:
            owners += [(seq, len(firsts) + seq.slot) for seq in plain]
            sampled.append(self._decode(plain))
        if len(plain) < len(plan.decodes):  # several tokens each, in order
            with self._base_only():
                trees = self.speculative.step([seq for seq in plan.decodes if seq.speculates])
            for seq, tokens in trees:
                owners += [(seq, sum(t.numel() for t in sampled) + i) for i in range(tokens.numel())]
                sampled.append(tokens)
        for seq, token in firsts:  # after the decode: finished prompts join the next step's batch
            self.runner.join(seq.slot, token, seq.position, seq.context.rope_offset if seq.context else 0.0)
        lazy = self._lazy_step()
        if lazy is not None:
            owners.append((lazy[0], sum(t.numel() for t in sampled)))
            sampled.append(lazy[1])
        for seq, _ in owners:
            if seq.sampled == seq.params.max_new_tokens:
                self._release(seq)
        # cat copies even one tensor: a greedy step's tokens live in the runner's buffer, which the next step rewrites
        return Launched(owners, self._copy_to_host(torch.cat(sampled)), synced=len(plain) < len(plan.decodes)) \
            if sampled else None

    def _copy_to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if tokens.device.type != "cuda":
            return tokens, None
        self._pinned.reverse()  # two buffers: one being filled, one being read
        host = self._pinned[0][:tokens.numel()]
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _process(self, launched: Launched | None) -> list[tuple[Sequence, Any]]:
        if launched is None:
            return []
        host, ready = launched.tokens
        if ready is not None:
            ready.synchronize()
        tokens, now, outputs = host.tolist(), time.perf_counter(), []  # the step's one device-to-host read
        for seq, i in launched.owners:
            if seq.finish_reason is None:
                outputs += self._advance(seq, tokens[i], now)
        return outputs

    def _prefill(self, chunks: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, torch.Tensor]]:
        """Compute the plan's prompt chunks; (sequence, its first token on the device) for each prompt now complete.
        First chunks of plain prompts run packed, in groups of similar length."""
        for seq, first, end in chunks:
            if first == 0:
                self.sampling.assign(seq.slot, seq.params, seq.seed, seq.prompt)
            if seq.speculates and end == seq.prefill_tokens:  # its last prompt token roots its first tree
                self.speculative.start(seq.slot, seq.prompt[-1])
        chunks = [chunk for chunk in chunks if chunk[2] > chunk[1]]  # a one-token prompt that speculates has none
        packed = [chunk for chunk in chunks if self._packs(*chunk)]
        logits = []
        for group in pack_groups(packed):
            rows = self.runner.prefill_packed([seq.slot for seq, _, _ in group],
                                              [seq.prompt[first:end] for seq, first, end in group])
            logits += [(seq, end, rows[i:i + 1]) for i, (seq, _, end) in enumerate(group)]
        logits += [(seq, end, self._chunk_logits(seq, first, end)) for seq, first, end in chunks
                   if (seq, first, end) not in packed]
        firsts = []
        for seq, end, row in logits:
            seq.computed = end
            if seq.prefilled and not seq.speculates:
                seq.sampled = 1
                firsts.append((seq, self.sampling.sample(row, slot=seq.slot)))
        return firsts

    def _packs(self, seq: Sequence, first: int, end: int) -> bool:
        """Whether a chunk joins the step's packed prefill: a plain prompt's first."""
        return self.config.packed_prefill and first == 0 and seq.context is None

    def _chunk_logits(self, seq: Sequence, first: int, end: int) -> torch.Tensor:
        """One chunk alone: a later chunk of a long prompt, or a superposed prompt's KV copied in -> its last-token
        logits (1, V)."""
        if seq.context is not None:
            self.runner.install(seq.slot, seq.context.keys, seq.context.values, first, end, seq.context.key_bias)
            return seq.context.logits
        return self.runner.prefill(seq.slot, seq.prompt[first:end], first)

    def _decode(self, decodes: list[Sequence]) -> torch.Tensor:
        """One token for every decoding sequence: (W,) device tokens for rows 0..W-1 (row = slot)."""
        self.decode_rows[len(decodes)] += 1
        width, length = self.runner.decode_shape(max(s.slot for s in decodes), max(s.position for s in decodes) + 1)
        if self.sampling.greedy(width):
            tokens = self.runner.decode_greedy(width, length)
        else:
            tokens = self.sampling.sample(self.runner.decode(width, length), live=self.runner.live[:width])
            self.runner.advance(width, tokens)
        for seq in decodes:
            seq.sampled += 1
        return tokens

    def _lazy_step(self) -> tuple[Sequence, torch.Tensor] | None:
        """One LazyLLM sequence at a time: prefill it, or decode its next token."""
        seq = self.lazy_running
        if seq is None and self.lazy_waiting:
            seq = self.lazy_running = self.lazy_waiting.popleft()
            capacity = len(seq.prompt) + seq.params.max_new_tokens
            seq.lazy = LazySequence(self.model, seq.prompt, self.config.lazyllm, capacity)
            self.sampling.assign(self.n_slots, seq.params, seq.seed, seq.prompt)
            logits = seq.lazy.prefill()
            seq.computed = len(seq.prompt)
        elif seq is not None:
            logits = seq.lazy.decode(seq.last_token)
        else:
            return None
        seq.sampled += 1
        seq.last_token = self.sampling.sample(logits, slot=self.n_slots)
        return seq, seq.last_token

    # ---- per-sequence bookkeeping -------------------------------------------------------------------------------

    def _advance(self, seq: Sequence, token: int, now: float) -> list[tuple[Sequence, Delta]]:
        """Take a sequence's new token: text, stop conditions, and the delta (with the completion at the end)."""
        if seq.ttft_s is None:
            seq.ttft_s = now - seq.arrival
        if token == self.eos_token_id and not seq.params.ignore_eos:
            return [(seq, self._finish(seq, "stop", seq.stream.flush()))]
        seq.output.append(token)
        text = seq.stream.push(token)
        if seq.stream.stopped:
            return [(seq, self._finish(seq, "stop", text))]
        if len(seq.output) >= seq.params.max_new_tokens:
            return [(seq, self._finish(seq, "length", text + seq.stream.flush()))]
        return [(seq, Delta(seq.index, text))] if text else []

    def _finish(self, seq: Sequence, reason: str, text: str = "") -> Delta:
        seq.finish_reason = reason
        started = seq.computed + seq.sampled > 0  # a one-token prompt that speculates computes no prefill
        fraction = seq.lazy.prompt_fraction_computed() if seq.lazy is not None else float(started)
        self._release(seq)
        prompt_tokens = len(seq.forkjoin.flat()) if seq.forkjoin is not None else len(seq.prompt)
        completion = Completion(seq.stream.text, seq.output, reason, prompt_tokens, seq.ttft_s or 0.0, fraction,
                                seq.context.selection if seq.context is not None else None)
        return Delta(seq.index, text, completion)

    def _release(self, seq: Sequence) -> None:
        """Give back whatever the sequence holds: its slot, or the LazyLLM turn, or its place in a queue."""
        if seq is self.lazy_running:
            self.lazy_running = None
        elif seq in self.superposing:
            self.superposing.remove(seq)
        elif seq in self.lazy_waiting:
            self.lazy_waiting.remove(seq)
        elif seq.slot is not None:
            self.runner.leave(seq.slot)
            self.sampling.release(seq.slot)
            self.scheduler.finish(seq)
        elif seq in self.scheduler.waiting:
            self.scheduler.finish(seq)

    def _drop_all(self) -> list[Sequence]:
        dropped = [*self.scheduler.clear(), *self.lazy_waiting, *([self.lazy_running] if self.lazy_running else []),
                   *self.superposing]
        dropped += [seq for seq, _ in (self._inflight.owners if self._inflight else []) if seq not in dropped]
        self.lazy_waiting.clear()
        self.superposing.clear()
        self.lazy_running = self._inflight = None
        for slot in range(self.n_slots):  # out of the decode batch, at no position or offset, bias cleared
            self.runner.leave(slot)
        for slot in range(self.n_slots + 1):
            self.sampling.release(slot)
        return [seq for seq in dropped if seq.finish_reason is None]

    # ---- asyncio ----------------------------------------------------------------------------------------------

    def start_loop(self) -> None:
        """Start the background thread that steps while there is work (idempotent)."""
        with self._thread_lock:
            if self._loop_thread is None or not self._loop_thread.is_alive():
                self._loop_thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._loop_thread.start()

    def _loop(self) -> None:
        while True:
            if not self.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            self.step()

    async def submit(self, request: Request, index: int = 0) -> AsyncIterator[Delta]:
        """One request's deltas, generated in the shared batch by the background loop; leaving the iteration early
        cancels it at the next step."""
        async for deltas in self.astream([request], indices=[index]):
            for delta in deltas:
                yield delta

    async def astream(self, requests: list[Request], indices: list[int] | None = None) -> AsyncIterator[list[Delta]]:
        """`stream` for asyncio callers: every request joins the background loop's batch; each item holds the deltas
        produced since the previous one. Leaving the iteration early cancels the requests that are still running."""
        prompts = [self.encode(r) for r in requests]
        loop, ready = asyncio.get_running_loop(), asyncio.Queue()
        with self._thread_lock:
            mailbox = self._mailboxes.setdefault(loop, LoopMailbox(loop))

        def sink(items: list) -> None:
            mailbox.post(ready, items)

        self.start_loop()
        seqs = [self.add_request(request, sink, indices[i] if indices else i, ids)
                for i, (request, ids) in enumerate(zip(requests, prompts))]
        remaining = len(requests)
        try:
            while remaining:
                items = await ready.get()
                while not ready.empty():
                    items += ready.get_nowait()
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                remaining -= sum(d.completion is not None for d in items)
                yield items
        finally:
            for seq in seqs:
                seq.aborted = True


def pack_groups(chunks: list[tuple[Sequence, int, int]], slack: float = 1.5) -> list[list[tuple[Sequence, int, int]]]:
    """Chunks grouped longest first, a group growing while its padded size (rows x longest) stays within `slack`
    times its real tokens: like lengths share a forward, a short prompt never pays for a long one's padding."""
    groups: list[list[tuple[Sequence, int, int]]] = []
    for chunk in sorted(chunks, key=_chunk_size, reverse=True):
        group = groups[-1] if groups else []
        if group and (len(group) + 1) * _chunk_size(group[0]) <= slack * sum(map(_chunk_size, [*group, chunk])):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups


def _chunk_size(chunk: tuple[Sequence, int, int]) -> int:
    return chunk[2] - chunk[1]


class LoopMailbox:
    """Deltas from the engine thread to one asyncio loop's request queues: a step posts every request's deltas, then
    flushes, so however many of the loop's requests got deltas the loop is woken once per step (a
    `call_soon_threadsafe` per request writes to the loop's self-pipe and wakes it, per request and per step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._posted: list[tuple[asyncio.Queue, list]] = []
        self._guard = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, items: list) -> None:
        """`items` go into `queue` on the loop's thread, at the next `flush`."""
        with self._guard:
            self._posted.append((queue, items))

    def flush(self) -> None:
        """Wake the loop to deliver what was posted (once: a wake-up still pending delivers it too)."""
        with self._guard:
            if self._scheduled or not self._posted:
                return
            self._scheduled = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._guard:
            posted, self._posted, self._scheduled = self._posted, [], False
        for queue, items in posted:
            queue.put_nowait(items)
