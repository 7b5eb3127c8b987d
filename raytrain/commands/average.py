"""`raytrain average checkpoint=RUN_DIR out=DIR k=5`: average a run's last k checkpoints into one."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from raytrain.checkpoint.average import average

CONFIG_NAME = "average"
HELP = "average the last k checkpoints of a run (OpenELM's released models are such means)"


def run(cfg: DictConfig) -> None:
    out = average(cfg.checkpoint, cfg.k, cfg.out, cfg.every)
    print(json.dumps({"out": str(out), "averaged_steps": json.loads((out / "raytrain.json").read_text())
                      ["averaged_steps"]}))
