"""A sharded document store against the replica alone (docs/superposition.md: "Sharded document stores"), on
SmolLM2 and the single-hop question sets of `benchmarks/superposition.py`: each set's documents are one store of the
model; the same questions go to a model replica whose engine holds every store's KV and to one whose stores are
split over `--shards` Ray actors, both warmed as they start (superposition top-1, the question sets' instruction as
the model's `rag_instruction`).

    python benchmarks/store_shards.py --checkpoint /tmp/smollm2 --sets 3 --questions-per-set 2 --shards 2

Per question: the answers and kept documents of the two (they must agree), the time to answer of each (median of
`--repeats` after one untimed run; the replicas are `serving/model.py`'s `ModelServer` called in process, the shards
real Ray actors of a local cluster) and the KV bytes that left the shards against the store's document KV. The shard
actors ask for no CPU, so on a small machine they share its cores with the replica: the times show the cost of the
round trips and the transfer, not a speed-up, which needs a GPU or host per shard. Prints one JSON line; `baseline`
is the replica alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.superposition import INSTRUCTION, answer_line, question_sets  # noqa: E402
from serving.config import model_args, model_spec  # noqa: E402
from serving.model import ModelServer  # noqa: E402


FLAT_LIMIT = 65536  # limits.max_prompt_tokens: the stores' flat prompts (naive RAG) pass the 8k window of SmolLM2;
# a superposed question needs only the preamble, one path and the query


def server(checkpoint: str, stores: dict[str, str], shards: int, max_tokens: int) -> ModelServer:
    settings = {"checkpoint": checkpoint, "engine": {"superposition": {"enabled": True, "top_k": 1}},
                "document_stores": stores, "rag_instruction": INSTRUCTION,
                "store_shards": {"count": shards, "num_cpus": 0},
                "limits": {"max_prompt_tokens": FLAT_LIMIT, "max_output_tokens": max_tokens}}
    return ModelServer.func_or_class("m", model_args(model_spec(settings, "bench")))


def timed(model: ModelServer, job: dict[str, Any], repeats: int) -> tuple[dict[str, Any], float]:
    asyncio.run(model.generate(job))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        answer = asyncio.run(model.generate(job))
        seconds.append(time.perf_counter() - start)
    return answer, statistics.median(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="/tmp/smollm2")
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--questions-per-set", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--doc-words", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=32, help="answer tokens (SmolLM2 often writes a line first)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sets = question_sets(args.sets, args.questions_per_set, False, args.seed, args.doc_words)
    with tempfile.TemporaryDirectory() as tmp:
        stores = {}
        for s, (docs, _) in enumerate(sets):
            stores[f"set{s}"] = str(Path(tmp) / f"set{s}.txt")
            Path(stores[f"set{s}"]).write_text("\n\n".join(docs))
        start = time.perf_counter()
        alone = server(args.checkpoint, stores, 1, args.max_tokens)
        started = {"alone_s": time.perf_counter() - start}
        start = time.perf_counter()
        sharded = server(args.checkpoint, stores, args.shards, args.max_tokens)
        started["sharded_s"] = time.perf_counter() - start
        engine = alone.engine
        token_bytes = engine.superposer.layout.width * engine.model.embed.weight.element_size()
        rows = []
        for s, (docs, asked) in enumerate(sets):
            rag = {"documents": None, "store": f"set{s}", "mode": None, "top_k": None}
            for item in asked:
                job = {"messages": [{"role": "user", "content": item["question"]}], "rag": rag,
                       "params": {"max_tokens": args.max_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                  "repetition_penalty": 1.0, "stop": [], "seed": None, "ignore_eos": False}}
                (base, base_s), (split, split_s) = (timed(m, job, args.repeats) for m in (alone, sharded))
                prompt = alone.prepare(job).forkjoin
                kept_tokens = sum(len(prompt.documents[i]) + len(prompt.query) for i in split["kept_documents"])
                row = {"set": s, "documents": len(docs), "agree": split == base,
                       "correct": item["answer"] in answer_line(base["text"]), "answer": base["text"],
                       "gold_kept": item["gold"][0] in base["kept_documents"], "alone_s": base_s, "sharded_s": split_s,
                       "moved_bytes": kept_tokens * token_bytes,
                       "store_bytes": sum(map(len, prompt.documents)) * token_bytes}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    alone_s, sharded_s = (statistics.median(r[k] for r in rows) for k in ("alone_s", "sharded_s"))
    print(json.dumps({
        "benchmark": "store_shards", "date": time.strftime("%Y-%m-%d"), "device": "cpu",
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {**vars(args), "threads": torch.get_num_threads(), "top_k": 1},
        "questions": len(rows), "agree": sum(r["agree"] for r in rows), "correct": sum(r["correct"] for r in rows),
        "gold_kept": sum(r["gold_kept"] for r in rows),
        "documents_mean": statistics.mean(r["documents"] for r in rows),
        "sharded": {"time_to_answer_s": sharded_s, "start_s": started["sharded_s"],
                    "moved_kv_mb_mean": statistics.mean(r["moved_bytes"] for r in rows) / 2 ** 20},
        "baseline": {"alone": {"time_to_answer_s": alone_s, "start_s": started["alone_s"],
                               "store_kv_mb_mean": statistics.mean(r["store_bytes"] for r in rows) / 2 ** 20}},
        "ratio_sharded_over_alone": sharded_s / alone_s}))


if __name__ == "__main__":
    main()
