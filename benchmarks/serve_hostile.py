"""Serving under hostile input: normal clients' latency alone and beside attackers, and a replica's replacement.

One model replica is served as `raytrain serve` serves it (`serve_load.py`'s model and settings, the API's default
protections). Normal traffic is `--requests` streamed completions by `--concurrency` closed-loop clients. The
baseline runs it alone; then the same traffic runs while `--attackers` clients (in a process of their own, so their
own work does not slow the normal clients down) send hostile requests back to back: 50 MB bodies, 5 MB chunked
bodies, a 1 MB prompt under the body limit, token ids outside the vocabulary, JSON nested 100k deep, a 5000-digit
integer, a lone surrogate, NaN, oversized stop strings; and `--tricklers` connections each send a body that stops
after 5 bytes, one after another, so each holds the ingress until the body timeout. Every hostile answer
is counted by status (none may be a 5xx), and the ratio is the normal clients' p50 latency under attack over the
baseline's (a baseline runs before and after the attack, so a drift in machine load shows). Last, the replica is
killed: the figures are how long /health takes to say so, how long requests to the model take to be refused
meanwhile (503 at once rather than a wait for the replacement), and how long the replacement takes.
Prints one JSON line.

    python benchmarks/serve_hostile.py --requests 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve_load import build_checkpoint, free_port, load, make_prompts, pct  # noqa: E402
from raytrain.infer.engine import Engine, EngineConfig  # noqa: E402
from serving.config import (ActorOptions, Autoscaling, Deployment, HttpOptions, Limits, ModelSpec,  # noqa: E402
                            ServeSpec, serve_config)

MODEL = "bench"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="openelm_tiny", help="a conf/model preset (random weights)")
    p.add_argument("--requests", type=int, default=48, help="normal requests per phase")
    p.add_argument("--concurrency", type=int, default=4, help="normal closed-loop clients")
    p.add_argument("--attackers", type=int, default=4, help="hostile closed-loop clients")
    p.add_argument("--tricklers", type=int, default=4, help="connections trickling a body, one after another")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8)
    args = p.parse_args()
    args.device, args.threads = "cpu", 1
    stdout, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON line alone
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(args, Path(tmp) / "model")
        engine = Engine.from_checkpoint(checkpoint, EngineConfig(max_batch_size=args.max_batch_size))
        prompts = make_prompts(engine, args.prompt_tokens, args.requests)
        url = serve(args, checkpoint)
        body = {"model": MODEL, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        asyncio.run(load(url, body, prompts[:1], 1))  # warm-up
        alone = asyncio.run(load(url, body, prompts, args.concurrency))
        attacked, hostile = asyncio.run(under_attack(url, body, prompts, args, engine.model.cfg.vocab_size))
        alone_again = asyncio.run(load(url, body, prompts, args.concurrency))
        replacement = replace_replica(url)
    baseline_p50 = (alone["latency_p50_ms"] + alone_again["latency_p50_ms"]) / 2
    print(json.dumps({
        "benchmark": "serve_hostile", "device": "cpu",
        "config": {"model": args.model, "requests": args.requests, "concurrency": args.concurrency,
                   "attackers": args.attackers, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
                   "max_batch_size": args.max_batch_size, "torch": torch.__version__, "cpus": os.cpu_count()},
        "results": {"normal_under_attack": attacked, "hostile": hostile, "replica_replacement": replacement},
        "baseline": {"normal_alone": alone, "normal_alone_after": alone_again},
        "ratio": attacked["latency_p50_ms"] / baseline_p50,
        "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%d %H:%M")}), file=stdout)


def serve(args: argparse.Namespace, checkpoint: Path) -> str:
    """One CPU model replica behind the ingress, the API's protections at their defaults; returns the base URL."""
    import ray

    from serving.run import start

    replica = Deployment(max_ongoing_requests=2 * args.max_batch_size, max_queued_requests=64,
                         autoscaling_config=Autoscaling(min_replicas=1, max_replicas=1))
    ingress = Deployment(max_ongoing_requests=1024, max_queued_requests=1024,
                         autoscaling_config=Autoscaling(min_replicas=1, max_replicas=1, target_ongoing_requests=512),
                         ray_actor_options=ActorOptions(num_cpus=0.5))
    model = ModelSpec(checkpoint=str(checkpoint), device="cpu", engine=EngineConfig(max_batch_size=args.max_batch_size),
                      limits=Limits(max_prompt_tokens=4 * args.prompt_tokens, max_output_tokens=args.max_tokens,
                                    request_timeout_s=600),
                      deployment=replica)
    spec = ServeSpec(http_options=HttpOptions(port=free_port()), ingress=ingress, models={MODEL: model})
    ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False, log_to_driver=False)
    return start(serve_config(spec), timeout_s=1800)


# ---- attackers ----------------------------------------------------------------------------------------------------

def hostile_bodies(vocab: int) -> list[tuple[str, bytes]]:
    c = '{"model": "%s", ' % MODEL
    return [("50MB body", (c + '"prompt": "').encode() + b"x" * 50_000_000 + b'"}'),
            ("1MB prompt", (c + '"prompt": "' + "statement " * 100_000 + '"}').encode()),
            ("ids outside vocab", (c + '"prompt": [5, %d], "max_tokens": 4}' % vocab).encode()),
            ("deep JSON", (c + '"prompt": ').encode() + b"[" * 100_000 + b"]" * 100_000 + b"}"),
            ("5000-digit int", (c + '"prompt": "x", "max_tokens": ').encode() + b"9" * 5000 + b"}"),
            ("lone surrogate", (c + '"prompt": "a\\ud800"}').encode()),
            ("NaN", (c + '"prompt": "x", "temperature": NaN}').encode()),
            ("4 x 100k stops", (c + '"prompt": "x", "stop": ' + json.dumps(["s" * 100_000] * 4) + "}").encode())]


async def chunked_5mb() -> Any:
    yield ('{"model": "%s", "prompt": "' % MODEL).encode()
    for _ in range(50):
        yield b"x" * 100_000
    yield b'"}'


async def trickled(url: str) -> int:
    """A body that stops coming after 5 bytes; the status the server answers."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 64\r\n\r\n{\"mod")
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def under_attack(url: str, body: dict[str, Any], prompts: list[str], args: argparse.Namespace,
                       vocab: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The normal load while attackers send hostile requests until it is done."""
    spawn = multiprocessing.get_context("spawn")
    stop, answers = spawn.Event(), spawn.Queue()
    attack = spawn.Process(target=attack_process, args=(url, vocab, args.attackers, args.tricklers, stop, answers))
    attack.start()
    await asyncio.sleep(3.0)  # the attack is under way before the first normal request
    normal = await load(url, body, prompts, args.concurrency)
    stop.set()
    hostile = answers.get()
    attack.join()
    return normal, hostile


def attack_process(url: str, vocab: int, attackers: int, tricklers: int, stop: Any, answers: Any) -> None:
    answers.put(asyncio.run(attack(url, vocab, attackers, tricklers, stop)))


async def attack(url: str, vocab: int, attackers: int, tricklers: int, stop: Any) -> dict[str, Any]:
    """`attackers` closed-loop clients cycling through the hostile requests and `tricklers` trickling bodies until
    `stop` is set; every answer's status by kind of request (a transport error, e.g. the server closing the connection
    on a body it refused while the client still writes it, is counted under its name)."""
    bodies = dict(hostile_bodies(vocab))
    kinds = [*bodies, "5MB chunked"]
    statuses: dict[str, Counter] = {}
    latencies: list[float] = []

    async def attacker(n: int, kinds: list[str]) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120)) as client:
            while not stop.is_set():
                kind, t0 = kinds[n % len(kinds)], time.perf_counter()
                try:
                    if kind == "trickled body":
                        status = await trickled(url)
                    elif kind == "5MB chunked":
                        status = (await client.post("/v1/completions", content=chunked_5mb())).status_code
                    else:
                        status = (await client.post("/v1/completions", content=bodies[kind])).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                latencies.append(time.perf_counter() - t0)
                statuses.setdefault(kind, Counter())[str(status)] += 1
                n += 1

    await asyncio.gather(*(attacker(i, kinds) for i in range(attackers)),
                         *(attacker(0, ["trickled body"]) for _ in range(tricklers)))
    server_errors = sum(n for c in statuses.values() for s, n in c.items() if s.startswith("5"))
    return {"answers": {k: dict(c) for k, c in sorted(statuses.items())}, "sent": len(latencies),
            "server_errors_5xx": server_errors, "latency_p50_ms": pct(latencies, 50)}


# ---- a replica replaced -------------------------------------------------------------------------------------------

def replace_replica(url: str) -> dict[str, Any]:
    """Kill the model replica; time /health saying so, the refusals meanwhile, and the replacement."""
    import ray

    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::raytrain#model-bench#")]
    request = {"model": MODEL, "prompt": "x", "max_tokens": 4}
    with httpx.Client(base_url=url, timeout=120) as client:
        killed = time.perf_counter()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        while client.get("/health").status_code == 200:
            time.sleep(0.05)
        health_down_s = time.perf_counter() - killed
        refusals: list[float] = []
        statuses: Counter = Counter()
        while True:
            t0 = time.perf_counter()
            status = client.post("/v1/completions", json=request).status_code
            statuses[str(status)] += 1
            if status == 200:
                break
            refusals.append(time.perf_counter() - t0)
            time.sleep(0.2)
        return {"health_503_after_s": health_down_s, "first_200_after_s": time.perf_counter() - killed,
                "answers_meanwhile": dict(statuses), "refusal_p50_ms": pct(refusals, 50),
                "refusal_max_ms": 1e3 * float(np.max(refusals)) if refusals else None}


if __name__ == "__main__":
    main()
