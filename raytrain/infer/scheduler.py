"""Iteration-level scheduling (continuous batching) over the engine's KV slots.

Every engine step the scheduler decides what the model computes: one token for every decoding sequence, then
prompt chunks, within a budget of tokens per step. Prompts are admitted first come, first served while a KV slot is
free (the queue never reorders, so a long prompt cannot starve); a prompt longer than what is left of the budget is
prefilled in chunks over several steps, so a long prefill delays running decodes by at most one budget's worth of
compute. A sequence joins the decode batch the step after its prompt is done and leaves it the moment it finishes
or is cancelled, freeing its slot for the next prompt. Slots are handed out lowest first, which keeps the decode
batch (rows 0..highest busy slot) as narrow as the load allows. With LoRA adapters, `admits` holds back the head of
the queue while its adapter does not fit beside the running sequences' (no more distinct adapters than the replica
has slots); it waits, in order, until enough of them finish.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raytrain.infer.sampling import SamplingParams
from raytrain.infer.text import TextStream

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request inside the engine: its prompt, what it generated, where its KV lives."""

    prompt: list[int]
    params: SamplingParams
    stream: TextStream
    sink: Callable[[list], None]  # receives lists of the request's Delta objects (or the exception that ended it)
    index: int = 0  # the caller's label for the request, echoed in its deltas
    cancel: Any = None  # the request's threading.Event-like flag: set = stop at the next step
    aborted: bool = False  # set by the engine's caller (any thread): stop at the next step
    seed: int = 0
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base alone)
    id: int = field(default_factory=lambda: next(_ids))
    slot: int | None = None
    computed: int = 0  # prompt tokens whose KV is in the slot
    sampled: int = 0  # tokens sampled so far (some may still be on their way to the host)
    last_token: Any = None  # the newest sampled token as a device tensor (LazyLLM's next input)
    output: list[int] = field(default_factory=list)  # tokens taken by the host
    finish_reason: str | None = None
    arrival: float = 0.0
    ttft_s: float | None = None
    lazy: Any = None  # a LazySequence while it runs through LazyLLM
    forkjoin: Any = None  # a superposed request's ForkJoinPrompt
    context: Any = None  # its superposed Context (KV to copy into the slot) once the fork-join prefill ran
    stages: Any = None  # that prefill while it runs, a stage per engine step (Superposer.stages)
    speculates: bool = False  # it decodes by Speculative Streaming

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens prefilled before decoding: all of them, or for Speculative Streaming all but the last,
        which roots the first draft tree."""
        return len(self.prompt) - self.speculates

    @property
    def prefilled(self) -> bool:
        return self.computed == self.prefill_tokens

    @property
    def position(self) -> int:
        """Position of the sequence's newest sampled token (the next decode input)."""
        return len(self.prompt) + self.sampled - 1


@dataclass
class Plan:
    prefills: list[tuple[Sequence, int, int]]  # (sequence, first, end) prompt chunks, in admission order
    decodes: list[Sequence]  # sequences that compute one token each


class Scheduler:
    def __init__(self, n_slots: int, token_budget: int, admits: Callable[[Sequence], bool] | None = None) -> None:
        self.token_budget = token_budget
        self.admits = admits or (lambda seq: True)  # beyond a free slot: may this sequence start now
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted (own a slot), in admission order
        self.free_slots = list(range(n_slots))  # a heap: lowest first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        decodes = [s for s in self.running if s.prefilled]
        budget = self.token_budget - len(decodes)
        prefills = []
        for seq in self.running:
            if not seq.prefilled and budget > 0:
                prefills.append(self._chunk(seq, budget))
                budget -= prefills[-1][2] - prefills[-1][1]
        while self.waiting and self.free_slots and budget > 0 and self.admits(self.waiting[0]):
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            self.running.append(seq)
            prefills.append(self._chunk(seq, budget))
            budget -= prefills[-1][2] - prefills[-1][1]
        return Plan(prefills, decodes)

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> tuple[Sequence, int, int]:
        return seq, seq.computed, min(seq.prefill_tokens, seq.computed + budget)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence, waiting or running, and free its slot."""
        if seq.slot is not None:
            self.running.remove(seq)
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def clear(self) -> list[Sequence]:
        """Drop every sequence (after a failed step); return them."""
        dropped = [*self.running, *self.waiting]
        for seq in dropped:
            self.finish(seq)
        return dropped
