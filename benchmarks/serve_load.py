"""Ray Serve load test: the OpenAI endpoint under a bounded load on loopback, beside direct engine calls in one run.

A model built from a `conf/model` preset (random weights, a BPE tokenizer trained on the embedded corpus; or
`--checkpoint DIR`) is served exactly as `raytrain serve` serves it (`serving.run.start` of the emitted config, one
model replica). For each concurrency level, `--requests` streamed completions of `--prompt-tokens` prompt tokens and
exactly `--max-tokens` output tokens (greedy, `ignore_eos`) are sent by that many closed-loop clients; the run stops
by itself. Every request ends as an answer, a 503 (the bounded queue is full) or an error, and all three are
counted, so nothing is lost silently. The baseline is the same engine in this process, driven by the same number of
closed-loop clients submitting straight to `Engine.submit` (continuous batching, no Serve), level by level between
the Serve runs (so a change in machine load hits both alike); each level of both starts with an untimed round at
its concurrency (first-use CUDA graph capture is not steady state): the ratio is Serve's tokens/s over the engine's
at the highest level without 503s. Prints one JSON line: requests/s, tokens/s, p50/p99 latency and time to first
token per level, and the replica's mean number of sequences per decode step.

    python benchmarks/serve_load.py --device cpu --requests 64
    python benchmarks/serve_load.py --device cuda --model openelm_1_1b --max-batch-size 64 --max-queued 256 \\
        --requests 256 --concurrency 1,16,64,256 --prompt-tokens 256 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raytrain.checkpoint.hf import model_state, save_pretrained  # noqa: E402
from raytrain.data.corpus import documents  # noqa: E402
from raytrain.data.tokenizer import to_files, train_bpe  # noqa: E402
from raytrain.infer.engine import Engine, EngineConfig, Request  # noqa: E402
from raytrain.infer.sampling import SamplingParams  # noqa: E402
from raytrain.models.registry import build_model, model_config  # noqa: E402
from serving.config import (ActorOptions, Autoscaling, Deployment, HttpOptions, Limits, ModelSpec,  # noqa: E402
                            ServeSpec, deployment_name, serve_config)

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
MODEL = "bench"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="openelm_tiny", help="a conf/model preset (random weights)")
    p.add_argument("--checkpoint", help="serve this checkpoint instead of building --model")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queued", type=int, default=16, help="replica queue per caller; beyond it: 503")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the engine (and replica CPUs)")
    args = p.parse_args()
    stdout, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON line alone; Ray's messages go to stderr
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(args, Path(tmp) / "model")
        dtype = torch.bfloat16 if args.device == "cuda" else None
        engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_batch_size=args.max_batch_size),
                                        device=args.device, dtype=dtype)
        prompts = make_prompts(engine, args.prompt_tokens, args.requests)
        info = {"params": sum(p.numel() for p in engine.model.parameters()), "vocab": engine.model.cfg.vocab_size,
                "prompt_tokens": float(np.mean([len(engine.tokenize(p)) for p in prompts]))}
        baseline, served = {}, {}
        with serving(args, checkpoint, warm_up(prompts, args.max_batch_size)) as level:
            for c in args.concurrency:  # interleaved, so a change in machine load hits both sides alike
                baseline[c] = direct(engine, prompts, args.max_tokens, c)
                served[c] = level(prompts, c)
    ratios = {c: served[c]["tokens_per_s"] / baseline[c]["tokens_per_s"] for c in args.concurrency}
    unloaded = [c for c in args.concurrency if served[c]["rejected_503"] == 0]
    reference = max(unloaded) if unloaded else min(args.concurrency)
    for c in args.concurrency:
        served[c]["ratio_to_engine"] = ratios[c]
    print(json.dumps({
        "benchmark": "serve_load",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "config": {"model": str(args.checkpoint or args.model), **info, "requests_per_level": args.requests,
                   "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "max_batch_size": args.max_batch_size, "max_ongoing_requests": ongoing(args),
                   "max_queued_requests": args.max_queued, "threads": args.threads, "torch": torch.__version__,
                   "stream": True, "sampling": "greedy, ignore_eos"},
        "results": {"serve": served, "reference_concurrency": reference},
        "baseline": {"engine_direct": baseline},
        "ratio": ratios[reference],
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}), file=stdout)


# ---- the model ----------------------------------------------------------------------------------------------------

def build_checkpoint(args: argparse.Namespace, out: Path) -> Path:
    """The preset's architecture with random weights, its vocabulary set to a BPE trained on the embedded corpus."""
    preset = model_config(OmegaConf.load(CONF / f"{args.model}.yaml"))
    tokenizer = train_bpe(documents(), vocab_size=preset.vocab_size)
    cfg = dataclasses.replace(preset, vocab_size=len(tokenizer),
                              max_seq_len=max(preset.max_seq_len, args.prompt_tokens + args.max_tokens + 8))
    torch.manual_seed(0)
    model = build_model(cfg, args.device)
    state = {k: v.to(torch.bfloat16) if args.device == "cuda" else v for k, v in model_state(model).items()}
    return save_pretrained(out, cfg, state, to_files(tokenizer))


def make_prompts(engine: Engine, tokens: int, n: int) -> list[str]:
    """`n` distinct passages of the embedded corpus, each about `tokens` tokens long (BOS included)."""
    ids = engine.tokenizer.encode("\n".join(documents()), add_special_tokens=False)
    step = max(1, (len(ids) - tokens) // n)
    return [engine.tokenizer.decode(ids[i * step:i * step + tokens - 1]) for i in range(n)]


# ---- direct engine calls (the baseline) ---------------------------------------------------------------------------

def direct(engine: Engine, prompts: list[str], max_tokens: int, concurrency: int) -> dict[str, Any]:
    """The same closed-loop clients without Serve: `concurrency` of them submit straight to the engine, after an
    untimed round of `concurrency` requests at that concurrency (as `serving`'s levels do)."""
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate([Request(p, params) for p in warm_up(prompts, engine.n_slots)])

    def run(batch: list[str]) -> dict[str, Any]:
        pending, done = list(reversed(batch)), []

        async def client() -> None:
            while pending:
                request, t0, first, tokens = Request(pending.pop(), params), time.perf_counter(), None, 0
                async for delta in engine.submit(request):
                    first = first if first is not None else time.perf_counter() - t0
                    tokens = len(delta.completion.token_ids) if delta.completion else tokens
                done.append({"status": 200, "latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens})

        async def clients() -> float:
            start = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return time.perf_counter() - start

        return summarize(done, asyncio.run(clients()), len(batch))

    run(prompts[:concurrency])
    return run(prompts)


def warm_up(prompts: list[str], slots: int) -> list[str]:
    """A burst that fills every KV slot with real prompts: the decode graphs of the full width and the fused kernels
    are captured and compiled before anything is timed, in both the replica and this process. Each level then runs
    one untimed round at its own concurrency first, for the widths and prefill buckets only it meets (at 1 stream
    the width-1 graphs: first use there cost the first request 1.0-1.5 s on the H200, in the timed window)."""
    return [prompts[i % len(prompts)] for i in range(slots)]


# ---- the Serve endpoint -------------------------------------------------------------------------------------------

@contextmanager
def serving(args: argparse.Namespace, checkpoint: Path,
            burst: list[str]) -> Iterator[Callable[[list[str], int], dict[str, Any]]]:
    """One model replica served as `raytrain serve` serves it, warmed up by `burst`; yields a function running one
    load level."""
    import ray
    from ray import serve

    from serving.run import start

    gpu = args.device == "cuda"
    replica = Deployment(max_ongoing_requests=ongoing(args), max_queued_requests=args.max_queued,
                         autoscaling_config=Autoscaling(min_replicas=1, max_replicas=1),
                         ray_actor_options=ActorOptions(num_cpus=args.threads, num_gpus=1 if gpu else 0))
    ingress = Deployment(max_ongoing_requests=4096, max_queued_requests=4096,
                         autoscaling_config=Autoscaling(min_replicas=1, max_replicas=1, target_ongoing_requests=2048),
                         ray_actor_options=ActorOptions(num_cpus=0.5))
    model = ModelSpec(checkpoint=str(checkpoint), device=args.device, dtype="bfloat16" if gpu else "float32",
                      engine=EngineConfig(max_batch_size=args.max_batch_size),
                      limits=Limits(max_prompt_tokens=4 * args.prompt_tokens, max_output_tokens=args.max_tokens,
                                    request_timeout_s=600, max_choices=1),
                      deployment=replica)
    spec = ServeSpec(http_options=HttpOptions(port=free_port()), ingress=ingress, models={MODEL: model})
    ray.init(num_cpus=max(os.cpu_count() or 1, args.threads + 1), include_dashboard=False, log_to_driver=False)
    try:
        url = start(serve_config(spec), timeout_s=1800)
        handle = serve.get_deployment_handle(deployment_name(MODEL), spec.app_name)
        body = {"model": MODEL, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

        def level(prompts: list[str], concurrency: int) -> dict[str, Any]:
            asyncio.run(load(url, body, prompts[:concurrency], concurrency))  # untimed: this level's shapes
            before = handle.stats.remote().result()["decode_rows"]
            out = asyncio.run(load(url, body, prompts, concurrency))
            return {**out, "mean_decode_rows": mean_rows(before, handle.stats.remote().result()["decode_rows"])}

        asyncio.run(load(url, body, burst, len(burst)))
        yield level
    finally:
        serve.shutdown()
        ray.shutdown()


async def load(url: str, body: dict[str, Any], prompts: list[str], concurrency: int) -> dict[str, Any]:
    """Each prompt once, by `concurrency` closed-loop clients; returns the level's summary."""
    pending = list(reversed(prompts))
    done: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900), limits=limits) as client:
        async def client_loop() -> None:
            while pending:
                done.append(await one(client, {**body, "prompt": pending.pop()}))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return summarize(done, time.perf_counter() - start, len(prompts))


async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion: its status, latency, time to first token and completion tokens."""
    t0, first, tokens, finished = time.perf_counter(), None, 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "error": r.text[:200]}
            async for line in r.aiter_lines():
                finished = finished or line == "data: [DONE]"
                if not line.startswith("data: ") or finished:
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return {"status": "stream_error", "error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif first is None:
                    first = time.perf_counter() - t0
    except httpx.HTTPError as e:
        return {"status": "transport_error", "error": repr(e)}
    if not finished:
        return {"status": "stream_cut", "error": "the stream ended without data: [DONE]"}
    return {"status": 200, "latency": time.perf_counter() - t0, "ttft": first, "tokens": tokens}


# ---- figures ------------------------------------------------------------------------------------------------------

def summarize(done: list[dict[str, Any]], wall: float, sent: int) -> dict[str, Any]:
    ok = [d for d in done if d["status"] == 200]
    rejected = [d for d in done if d["status"] == 503]
    errors = [d for d in done if d["status"] not in (200, 503)]
    latency = [d["latency"] for d in ok]
    ttft = [d["ttft"] for d in ok if d["ttft"] is not None]
    return {"sent": sent, "ok": len(ok), "rejected_503": len(rejected), "errors": len(errors),
            "lost": sent - len(done), "retry_after_on_503": all(d["retry_after"] for d in rejected),
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(d["tokens"] for d in ok) / wall,
            "latency_p50_ms": pct(latency, 50), "latency_p99_ms": pct(latency, 99),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "wall_s": wall,
            "first_error": errors[0]["error"] if errors else None}


def pct(values: list[float], q: float) -> float | None:
    return 1e3 * float(np.percentile(values, q)) if values else None


def mean_rows(before: dict[int, int], after: dict[int, int]) -> float | None:
    """Mean sequences per decode step between two snapshots of the replica's `decode_rows`."""
    counts = {rows: n - before.get(rows, 0) for rows, n in after.items()}
    steps = sum(counts.values())
    return sum(rows * n for rows, n in counts.items()) / steps if steps else None


def ongoing(args: argparse.Namespace) -> int:
    """Requests a replica takes at once: its KV slots, and as many again waiting in the engine for one."""
    return 2 * args.max_batch_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
