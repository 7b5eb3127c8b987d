"""Experiment tracking with Weights & Biases, from rank 0 only.

The W&B run id is the raytrain run name, so a resumed run appends to the same W&B run; every metric is plotted
against `trainer/step`, so steps replayed after a resume still plot. Modes: offline (default; `wandb sync DIR`
uploads later), online (needs WANDB_API_KEY), disabled (tests).
"""

from __future__ import annotations

import os
from typing import Any

from raytrain.train.config import TrackingConfig


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_name: str, config: dict[str, Any], rank: int) -> None:
        self.run = None
        if rank != 0 or cfg.mode == "disabled":
            return
        import wandb

        os.makedirs(cfg.dir, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, id=run_name, name=run_name, resume="allow",
                              config=config, dir=cfg.dir, mode=cfg.mode, tags=list(cfg.tags))
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log({"trainer/step": step, **metrics})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
