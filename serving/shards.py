"""Ray actors holding a model replica's sharded document stores (`store_shards` in the model's config; the method is
`raytrain/infer/path_shards.py`). Each store's paths are split into `count` contiguous parts, one actor each; an
actor loads the model as the replica does, computes its part's KV over the store's preamble as it starts (with
`warm_document_stores`), and per question scores its query copies and hands over the kept paths' KV. The actors are
the replica's own: created as it starts, gone with it."""

from __future__ import annotations

from typing import Any

import ray

from raytrain.checkpoint.hf import load_pretrained
from raytrain.infer.path_forward import Segment
from raytrain.infer.path_shards import PathShard, ShardScores, shard_ranges
from serving.config import ModelSpec, model_spec
from serving.device import model_device


RESTARTS = 3  # a shard that dies (its node lost, out of memory) starts again and warms its part; calls sent
# meanwhile wait and run then, and a question it scored before dying is scored again when its paths are taken


@ray.remote
class DocumentShard:
    """One part of one document store: the model and its paths' KV (`PathShard`)."""

    def __init__(self, args: dict[str, Any], key: str, paths: list[list[int]], owned: range,
                 warm: tuple[list[int], list[int]] | None) -> None:
        spec = model_spec(args, key)
        device, dtype = model_device(spec)
        model = load_pretrained(spec.checkpoint, device=device, dtype=dtype, tokenizer=spec.tokenizer,
                                keep_compressed=spec.weights == "compressed").model
        self.shard = PathShard(model, spec.engine.superposition, paths, owned, f"{key}.engine.superposition")
        if warm is not None:
            self.shard.score("warm", *warm)
            self.shard.take("warm", [])

    def ready(self) -> int:
        return len(self.shard.paths)

    def score(self, request: str, preamble: list[int], query: list[int]) -> ShardScores:
        return self.shard.score(request, preamble, query)

    def take(self, request: str, kept: list[int], preamble: list[int], query: list[int]) -> list[Segment]:
        return self.shard.take(request, kept, (preamble, query))


def start_shards(args: dict[str, Any], key: str, spec: ModelSpec, paths: list[list[int]],
                 warm: tuple[list[int], list[int]] | None) -> list[ray.actor.ActorHandle]:
    """One store's shard actors, started (a failed start raises here, as the replica starts)."""
    options = {"num_cpus": spec.store_shards.num_cpus, "num_gpus": spec.store_shards.num_gpus,
               "max_restarts": RESTARTS, "max_task_retries": RESTARTS}
    shards = [DocumentShard.options(**options).remote(args, key, paths, owned, warm)
              for owned in shard_ranges(len(paths), spec.store_shards.count)]
    ray.get([s.ready.remote() for s in shards])
    return shards
