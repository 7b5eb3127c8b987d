"""Wall-clock timing shared by the benchmarks. CUDA runs asynchronously, so a call is timed between two device
synchronisations (else the time is the launch, not the work); figures are medians over repeats after warm-ups,
which pay for compilation, allocation and lazy initialisation."""

from __future__ import annotations

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
