"""Dynamic request batching for asyncio servers, on the engine's own batching.

Requests that arrive while the engine is busy wait; the moment it is free, the next batch takes all of them (up to
`max_batch_size`). Only an idle engine waits, at most `max_wait_s`, for a first request to get company. (Ray Serve's
`@serve.batch` instead closes a batch `batch_wait_timeout_s` after its first request even while the previous batch
still runs, so under load the engine gets many small batches one after another.) Each request's deltas come back
through its own queue; a caller that stops listening cancels its request in the engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from raytrain.infer.engine import Delta, Engine, Request


@dataclass
class _Waiting:
    request: Request
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)  # Delta, or the Exception that ended its batch


class Batcher:
    def __init__(self, engine: Engine, max_wait_s: float = 0.01) -> None:
        self.engine, self.max_wait_s = engine, max_wait_s
        self.batch_sizes: Counter[int] = Counter()  # engine batches run, by size
        self._waiting: deque[_Waiting] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def stream(self, request: Request) -> AsyncIterator[Delta]:
        """The request's deltas, generated in a shared batch; leaving early cancels it at the engine's next step."""
        request.cancel = request.cancel or threading.Event()
        waiting = _Waiting(request)
        self._ensure_running()
        self._waiting.append(waiting)
        self._arrived.set()
        try:
            while True:
                item = await waiting.deltas.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.completion is not None:
                    return
        finally:
            request.cancel.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():  # first use, in the server's event loop
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        idle = True  # nobody was waiting when the engine became free
        while True:
            batch = await self._next_batch(idle)
            self.batch_sizes[len(batch)] += 1
            try:
                async for deltas in self.engine.astream([w.request for w in batch]):
                    for delta in deltas:
                        batch[delta.index].deltas.put_nowait(delta)
            except Exception as e:  # e.g. an invalid request: every request of the batch learns why
                for w in batch:
                    w.deltas.put_nowait(e)
            idle = not self._waiting

    async def _next_batch(self, idle: bool) -> list[_Waiting]:
        """Everyone waiting (up to max_batch_size); an idle engine first gives latecomers up to max_wait_s."""
        size, loop = self.engine.config.max_batch_size, asyncio.get_running_loop()
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait_s
        while idle and len(self._waiting) < size and loop.time() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        return [self._waiting.popleft() for _ in range(min(size, len(self._waiting)))]
