"""Which models can answer right now, as the ingress sees them: every replica of every model is pinged.

A probe broadcasts the replicas' cheap `info` call (Serve's `DeploymentHandle.broadcast`, which bypasses the request
queue, so a busy replica still answers) and waits `timeout_s`. A model is
- `ready`: at least one replica answered;
- `down`: it has no replica (none running, or every one listed has died): requests to it are answered 503 at once
  (once a fresh probe confirms it: the last one may predate a replica that started since), and requests waiting
  for it are given up with 503, instead of waiting for a replacement;
- `unresponsive`: replicas exist but none answered in time (or the broadcast timed out: it collects every replica's
  answer together, so one hung replica makes the whole model unresponsive until Serve's own health check replaces it);
- `idle`: a model that may scale to zero has no replica; a request starts one, so it counts as healthy.
The ingress probes every `interval_s` in the background, and `/health` probes afresh; probes never overlap (a caller
during a probe shares its answer). Deployment status from the controller is not used: it said UPSCALING while
requests succeeded, and HEALTHY for seconds after a replica died.
"""

from __future__ import annotations

import asyncio
import logging

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

log = logging.getLogger("ray.serve")
READY, DOWN, UNRESPONSIVE, IDLE = "ready", "down", "unresponsive", "idle"
HEALTHY = (READY, IDLE)


class ReplicaProbe:
    def __init__(self, handles: dict[str, DeploymentHandle], timeout_s: float, scale_to_zero: list[str]) -> None:
        self.handles, self.timeout_s, self.scale_to_zero = handles, timeout_s, set(scale_to_zero)
        self.down = {name: asyncio.Event() for name in handles}  # set while the last probe found the model DOWN
        self._probing: asyncio.Task | None = None

    async def check(self) -> dict[str, str]:
        """Every model's state now."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe_all())
        return await asyncio.shield(self._probing)  # one caller going away does not cancel the others' probe

    async def watch(self, interval_s: float) -> None:
        """Probe forever, every `interval_s`."""
        while True:
            await self.check()
            await asyncio.sleep(interval_s)

    async def _probe_all(self) -> dict[str, str]:
        states = dict(zip(self.handles, await asyncio.gather(*(self._probe(name) for name in self.handles))))
        for name, state in states.items():
            if state == DOWN:
                self.down[name].set()
            else:
                self.down[name].clear()
        return states

    async def _probe(self, name: str) -> str:
        gone = IDLE if name in self.scale_to_zero else DOWN
        try:
            answers = await self.handles[name].broadcast("info").results_async(timeout_s=self.timeout_s,
                                                                                return_exceptions=True)
        except DeploymentUnavailableError:  # no replica to send it to
            return gone
        except TimeoutError:
            return UNRESPONSIVE
        except Exception:  # whatever else keeps the broadcast from answering, the model cannot be seen to answer
            log.exception("probing the replicas of model %r failed", name)
            return UNRESPONSIVE
        if any(not isinstance(a, BaseException) for a in answers):
            return READY
        return gone if all(isinstance(a, ActorDiedError) for a in answers) else UNRESPONSIVE
