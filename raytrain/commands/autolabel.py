"""`raytrain autolabel data.path=SEQUENCES out=LABELS`: 3D open-vocabulary auto labels of LiDAR sequences on Ray Data.

With `data.path` unset, synthetic driving scenes are generated first (`data.synthetic`). Prints one JSON summary:
sequences done, failed and skipped as finished, problem counts, frames, seconds. `raytrain autolabel eval` scores
labels (`autolabel_eval.py`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.data.lidar_scenes import SceneConfig, write_scenes
from raytrain.pipelines.autolabel.config import AutolabelConfig
from raytrain.pipelines.autolabel.vlm import build_vlm

CONFIG_NAME = "autolabel"
HELP = "3D open-vocabulary auto labels of LiDAR sequences on Ray Data (autolabel eval: AP against ground truth)"
log = logging.getLogger("raytrain")


def synthetic_sequences(node: DictConfig) -> str:
    """Generate (once) the synthetic scenes `data.synthetic` describes; returns their directory."""
    out = Path(node.dir)
    write_scenes(out, node.sequences, SceneConfig(frames=node.frames), node.seed)
    return str(out)


def typed_config(cfg: DictConfig) -> AutolabelConfig:
    """The validated pipeline config: the `autolabel` block plus the `vlm` group."""
    return to_dataclass(AutolabelConfig, {**plain(cfg.autolabel), "vlm": plain(cfg.vlm)}, "autolabel")


def run(cfg: DictConfig) -> dict:
    import ray

    from raytrain.pipelines.autolabel import runner

    acfg = typed_config(cfg)
    try:
        build_vlm(acfg.vlm)  # an unknown backend fails here, before Ray starts
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.workers < 1:
        raise ConfigError(f"workers={cfg.workers}: must be >= 1")
    path = cfg.data.path
    if path is None:
        log.info("data.path unset: synthetic scenes in %s", cfg.data.synthetic.dir)
        path = synthetic_sequences(cfg.data.synthetic)
    elif not os.path.exists(path):
        raise ConfigError(f"data.path={path}: no such directory")
    if not ray.is_initialized():
        local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        ray.init(address=cfg.ray.address, include_dashboard=False,
                 num_cpus=(cfg.ray.num_cpus or max(os.cpu_count() or 1, cfg.workers)) if local else None)
    summary = runner.run(acfg, path, cfg.out, cfg.workers, cfg.cpus_per_task)
    print(json.dumps(summary))
    return summary
