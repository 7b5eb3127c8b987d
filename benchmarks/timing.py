"""Wall-clock timing shared by the benchmarks. CUDA runs asynchronously, so a call is timed between two device
synchronisations (else the time is the launch, not the work); figures are medians over repeats after warm-ups,
which pay for compilation, allocation and lazy initialisation."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synced_seconds(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Seconds of one call of `fn`, from an idle device to an idle device."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], Any], device: str | torch.device, repeats: int, warmup: int = 2) -> float:
    """Median of `repeats` synced calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(synced_seconds(fn, device) for _ in range(repeats))


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 100) -> float:
    """Device milliseconds of one replay of a CUDA graph, replayed back to back after one untimed replay."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def capture(calls: list[Callable[[], Any]]) -> torch.cuda.CUDAGraph:
    """`calls`, each run once first (compilation, allocation), then captured in order as one CUDA graph."""
    for call in dict.fromkeys(calls):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def cold_copies(nbytes: int, most: int) -> int:
    """Copies of an operand of `nbytes` to cycle through so that one pass reads more than 3x the L2 cache (each
    read from HBM), at least 2 and at most `most`."""
    return max(2, min(most, math.ceil(3 * torch.cuda.get_device_properties(0).L2_cache_size / nbytes)))
