"""The generation engine: one interface for raytrain decoders and Hugging Face Llama checkpoints (converted on load
into the same decoder family), used by `raytrain generate`, the pipelines and Ray Serve.

Requests are batched (up to `max_batch_size`): prompts are left-padded, so every row's last prompt token sits in the
same column and decoding appends one column per step; padded keys are masked and positions count from each row's
first real token. Each request has its own sampling parameters, stop strings and token budget. `stream` yields text
deltas as they become final; `generate` collects them; `astream` is `stream` for asyncio servers (the engine runs in
its own thread). A request whose `cancel` event is set stops at the next step (finish_reason "cancelled"), and a
batch ends as soon as all its requests are done. With `lazy.enabled`, long prompts run through LazyLLM
(`lazyllm.py`) one request at a time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytrain.config import RaytrainError
from raytrain.infer.lazyllm import LazyConfig, LazySequence
from raytrain.infer.sampling import SamplingParams, next_token
from raytrain.infer.text import TextStream
from raytrain.models.decoder import Decoder
from raytrain.models.kv_cache import KVCache


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    lazy: bool = False  # LazyLLM for prompts of at least lazyllm.min_prompt_tokens tokens
    lazyllm: LazyConfig = field(default_factory=LazyConfig)


@dataclass
class Request:
    prompt: str | list[int]  # text (BOS is prepended) or token ids (used as given)
    params: SamplingParams = field(default_factory=SamplingParams)
    cancel: threading.Event | None = field(default=None, compare=False)  # set: stop at the next step


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled"
    prompt_tokens: int
    ttft_s: float  # wall time from the start of the request's batch to its first token
    prompt_fraction_computed: float = 1.0  # share of prompt (token, layer) pairs computed (< 1 with LazyLLM)


@dataclass
class Delta:
    """A streaming event: new final text of request `index`; its last event also carries the `completion`."""

    index: int
    text: str
    completion: Completion | None = None


class Engine:
    def __init__(self, model: Decoder, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.device = model.embed.weight.device
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")  # astream's compute thread
        if self.config.lazy:
            self.config.lazyllm.schedule(len(model.layers))  # a bad schedule fails here, before any request

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EngineConfig | None = None, device: str = "cpu",
                        dtype: torch.dtype | None = None, tokenizer: str | None = None,
                        keep_compressed: bool = False, adapter: str | Path | None = None) -> Engine:
        """`keep_compressed`: compressed layers stay compressed in memory; `adapter`: a LoRA adapter of this base
        (both as `load_pretrained` takes them)."""
        from raytrain.checkpoint.hf import load_pretrained

        pretrained = load_pretrained(path, device=device, dtype=dtype, tokenizer=tokenizer,
                                     keep_compressed=keep_compressed, adapter=adapter)
        if pretrained.tokenizer is None:
            raise RaytrainError(f"{pretrained.path} has no tokenizer files; pass a tokenizer directory")
        return cls(pretrained.model, pretrained.tokenizer, config)

    # ---- public API -----------------------------------------------------------------------------------------

    @property
    def context_window(self) -> int:
        return self.model.cfg.max_seq_len

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: text gets BOS prepended, token ids are used as given."""
        text = isinstance(prompt, str)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if text else list(prompt)
        if not ids:
            raise RaytrainError("the prompt is empty")
        if text and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return ids

    def encode(self, request: Request) -> list[int]:
        """Prompt token ids, checked against the context window before any compute."""
        ids = self.tokenize(request.prompt)
        window = self.context_window
        if len(ids) + request.params.max_new_tokens > window:
            raise RaytrainError(f"prompt ({len(ids)} tokens) + max_new_tokens ({request.params.max_new_tokens}) "
                                f"exceeds the model's context window of {window} tokens")
        return ids

    def generate(self, requests: list[Request]) -> list[Completion]:
        done = {d.index: d.completion for d in self.stream(requests) if d.completion is not None}
        return [done[i] for i in range(len(requests))]

    def stream(self, requests: list[Request]) -> Iterator[Delta]:
        """Deltas of all requests, interleaved by step; each request's last delta carries its `Completion`."""
        prompts = [self.encode(r) for r in requests]  # validate every request before computing any
        for group in self._groups(prompts):
            yield from self._run(group, [requests[i] for i in group], [prompts[i] for i in group])

    async def astream(self, requests: list[Request]) -> AsyncIterator[list[Delta]]:
        """`stream` for asyncio callers: the engine steps in its own thread (one call at a time), so the event loop
        stays free; each item holds the deltas produced since the previous one. Leaving the iteration early stops
        the engine at its next delta."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def post(item: object) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(ready.put_nowait, item)

        def produce() -> None:
            try:
                for delta in self.stream(requests):
                    if stop.is_set():
                        return
                    post(delta)
            except Exception as e:  # re-raised in the caller's task
                post(e)
            finally:
                post(_END)

        loop.run_in_executor(self._worker, produce)
        try:
            while True:
                items = [await ready.get()]
                while not ready.empty():
                    items.append(ready.get_nowait())
                deltas = [d for d in items if isinstance(d, Delta)]
                if deltas:
                    yield deltas
                for item in items:
                    if isinstance(item, Exception):
                        raise item
                if items[-1] is _END:
                    return
        finally:
            stop.set()

    # ---- batching -------------------------------------------------------------------------------------------

    def _groups(self, prompts: list[list[int]]) -> list[list[int]]:
        """Batches of request indices; with LazyLLM, each long prompt runs alone (the paper's batch size 1)."""
        long = {i for i, p in enumerate(prompts) if self._lazy(p)}
        rest = [i for i in range(len(prompts)) if i not in long]
        size = self.config.max_batch_size
        return [[i] for i in sorted(long)] + [rest[i:i + size] for i in range(0, len(rest), size)]

    def _lazy(self, prompt: list[int]) -> bool:
        return self.config.lazy and len(prompt) >= self.config.lazyllm.min_prompt_tokens

    def _run(self, indices: list[int], requests: list[Request], prompts: list[list[int]]) -> Iterator[Delta]:
        start = time.perf_counter()
        rows = [_Row(self.tokenizer, r.params, p, self.device) for r, p in zip(requests, prompts)]
        yield from self._cancel(indices, requests, rows, time.perf_counter() - start, None)
        if all(row.done for row in rows):
            return
        max_new = max(r.params.max_new_tokens for r in requests)
        if self._lazy(prompts[0]):
            runner = LazySequence(self.model, prompts[0], self.config.lazyllm, len(prompts[0]) + max_new)
        else:
            runner = DenseBatch(self.model, prompts, max_new)
        logits, ttft = runner.prefill(), None  # (B, V)
        while True:
            tokens = [row.last if row.done else row.sample(logits[b, :self.model.cfg.vocab_size])
                      for b, row in enumerate(rows)]
            ttft = ttft if ttft is not None else time.perf_counter() - start
            for b, row in enumerate(rows):
                if row.done:
                    continue
                text = row.advance(tokens[b], self.tokenizer.eos_token_id)
                completion = row.completion(ttft, runner) if row.done else None
                if text or completion:
                    yield Delta(indices[b], text, completion)
            yield from self._cancel(indices, requests, rows, ttft, runner)
            if all(row.done for row in rows):
                return
            logits = runner.decode(torch.tensor(tokens, device=self.device))

    @staticmethod
    def _cancel(indices: list[int], requests: list[Request], rows: list[_Row], ttft: float,
                runner: DenseBatch | LazySequence | None) -> Iterator[Delta]:
        """End the rows whose request was cancelled; their last delta carries what they generated so far."""
        for b, (request, row) in enumerate(zip(requests, rows)):
            if not row.done and request.cancel is not None and request.cancel.is_set():
                row.done, row.finish_reason = True, "cancelled"
                yield Delta(indices[b], "", row.completion(ttft, runner))


_END = object()  # astream: the engine thread finished


class DenseBatch:
    """Left-padded batch over a dense `KVCache`."""

    def __init__(self, model: Decoder, prompts: list[list[int]], max_new_tokens: int) -> None:
        self.model = model
        device = model.embed.weight.device
        width = max(len(p) for p in prompts)
        pad = torch.tensor([width - len(p) for p in prompts], device=device)
        self.tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        self.cache = KVCache(len(model.layers), width + max_new_tokens, pad=pad if bool(pad.any()) else None)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        return self.model(self.tokens, cache=self.cache, last_only=True)[:, -1]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, None], cache=self.cache)[:, -1]

    def prompt_fraction_computed(self) -> float:
        return 1.0  # every prompt token at every layer


class _Row:
    """One request's sampling, stopping and detokenization state."""

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt: list[int], device: torch.device) -> None:
        self.params = params
        self.prompt_tokens = len(prompt)
        self.stream = TextStream(tokenizer, params.stop)
        self.seen = torch.tensor(prompt, device=device)
        self.generator = (torch.Generator(device=device).manual_seed(params.seed)
                          if params.seed is not None else None)
        self.ids: list[int] = []
        self.last = 0
        self.done = False
        self.finish_reason = "length"

    def sample(self, logits: torch.Tensor) -> int:
        seen = torch.cat([self.seen, torch.tensor(self.ids, dtype=torch.long, device=self.seen.device)])
        return next_token(logits, self.params, self.generator, seen)

    def completion(self, ttft: float, runner: DenseBatch | LazySequence | None) -> Completion:
        fraction = runner.prompt_fraction_computed() if runner is not None else 0.0  # None: cancelled unstarted
        return Completion(self.stream.text, self.ids, self.finish_reason, self.prompt_tokens, ttft, fraction)

    def advance(self, token: int, eos: int | None) -> str:
        """Take the sampled token; return the text it makes final. Sets `done` and `finish_reason` at the end."""
        self.last = token
        if token == eos and not self.params.ignore_eos:
            self.done, self.finish_reason = True, "stop"
            return self.stream.flush()
        self.ids.append(token)
        text = self.stream.push(token)
        if self.stream.stopped:
            self.done, self.finish_reason = True, "stop"
        elif len(self.ids) >= self.params.max_new_tokens:
            self.done = True
            text += self.stream.flush()
        return text
