"""Dynamic batching: requests waiting for a busy engine share its next batch, an idle engine waits briefly for
company, batching is invisible in the results, a listener that leaves cancels its request, errors reach everyone."""

from __future__ import annotations

import asyncio

from raytrain.config import RaytrainError
from raytrain.infer.batcher import Batcher
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.sampling import SamplingParams


async def text_of(batcher: Batcher, request: Request) -> str:
    return "".join([d.text async for d in batcher.stream(request)])


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


def test_waiting_requests_share_batches_and_get_their_own_results(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer, EngineConfig(max_batch_size=4))
    requests = [Request(p, greedy(4 + i)) for i, p in enumerate(["The if", "A class", "x", "import", "def", "y"])]
    batcher = Batcher(engine)

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(text_of(batcher, r) for r in requests))

    texts = asyncio.run(all_of_them())  # all six wait before the batcher first runs
    assert texts == [c.text for c in engine.generate([Request(r.prompt, r.params) for r in requests])]
    assert batcher.batch_sizes == {4: 1, 2: 1}


def test_an_idle_engine_waits_for_company(lm, tokenizer) -> None:
    batcher = Batcher(Engine(lm, tokenizer), max_wait_s=5.0)

    async def staggered() -> None:
        first = asyncio.create_task(text_of(batcher, Request("The if", greedy(4))))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, text_of(batcher, Request("A class", greedy(4))))

    asyncio.run(staggered())
    assert batcher.batch_sizes == {2: 1}


def test_leaving_early_cancels_the_request_and_errors_reach_the_whole_batch(lm, tokenizer) -> None:
    engine = Engine(lm, tokenizer)
    batcher = Batcher(engine)
    left = Request("The if statement", SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True))

    async def leave_after_one() -> None:
        async for _ in batcher.stream(left):
            break

    async def together() -> list:
        return await asyncio.gather(leave_after_one(), text_of(batcher, Request("A class", greedy(6))))

    assert asyncio.run(together())[1] == engine.generate([Request("A class", greedy(6))])[0].text
    assert left.cancel.is_set()

    async def with_a_bad_one() -> list:
        return await asyncio.gather(text_of(batcher, Request("A class", greedy(6))),
                                    text_of(batcher, Request("", greedy(6))), return_exceptions=True)

    assert all(isinstance(e, RaytrainError) and "empty" in str(e) for e in asyncio.run(with_a_bad_one()))
