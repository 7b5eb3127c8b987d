"""benchmarks/ray_scaling.py reads tokens/s and MFU from the trainer's progress lines; this pins the two together
(a change to the line format breaks here, not silently in a GPU run)."""

from __future__ import annotations

import importlib.util

from raytrain.train.loop import _format
from tests.conftest import REPO


def ray_scaling():
    spec = importlib.util.spec_from_file_location("ray_scaling", REPO / "benchmarks" / "ray_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steady_windows_are_averaged_after_start_up() -> None:
    lines = [_format(5, 30, {"loss": 9.0, "lr": 1e-3, "grad_norm": 1.0})]  # the first window: no throughput
    lines += [_format(step, 30, {"loss": 8.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": tps, "mfu": mfu,
                                 "data_wait": wait, "cpu_ms_per_step": 40.0})
              for step, tps, mfu, wait in [(10, 1000.0, 0.1, 0.9), (15, 60_000.0, 0.4, 0.01),
                                           (20, 70_000.0, 0.5, 0.02), (25, 80_000.0, 0.6, 0.03)]]
    log = "\n".join(f"(RayTrainWorker pid=1) {line}" for line in lines)
    result = ray_scaling().throughput(log, skip=1)
    assert result["windows"] == 3 and result["steps"] == "15..25" and result["final_loss"] == 8.0
    assert result["tokens_per_s"] == 70_000.0 and abs(result["mfu"] - 0.5) < 1e-9
    assert abs(result["data_wait"] - 0.02) < 1e-9 and result["cpu_ms_per_step"] == 40.0


def test_cpu_runs_have_throughput_without_mfu() -> None:
    log = _format(10, 10, {"loss": 3.0, "lr": 1e-3, "tokens_per_s": 1234.0})
    assert ray_scaling().throughput(log, skip=0) == {"tokens_per_s": 1234.0, "windows": 1, "steps": "10..10",
                                                     "final_loss": 3.0}
