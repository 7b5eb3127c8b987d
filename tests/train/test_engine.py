"""The DeepSpeed config the trainer builds: nothing in it synchronises host and device every step without need."""

from __future__ import annotations

import pytest

from raytrain.train.config import TrainerConfig
from raytrain.train.engine import deepspeed_config


@pytest.mark.parametrize("workers, stage, runs, overlap", [(1, 3, 2, False), (2, 3, 3, True), (1, 2, 2, False),
                                                           (4, 2, 2, True), (1, 1, 1, None)])
def test_zero3_on_one_worker_runs_as_zero2_and_only_real_communication_overlaps(workers: int, stage: int, runs: int,
                                                                                 overlap: bool | None) -> None:
    zero = deepspeed_config(TrainerConfig(num_workers=workers, zero_stage=stage), "bf16")["zero_optimization"]
    assert zero["stage"] == runs and zero.get("overlap_comm") is overlap
