"""`raytrain synth data.path=PAIRS out=DIR synth.paths=[SP1,SP2,SP3] synth.policy=keep`: CtrlSynth on Ray Data.

Reads image-text pairs (webdataset shards or parquet), writes new pairs with provenance as webdataset shards
(`raytrain/pipelines/ctrlsynth/runner.py`), and prints one JSON summary: shards done, failed and skipped as
finished, pairs and pass rate per path, dropped records and rejected candidates by reason, records/s.
"""

from __future__ import annotations

import json
import os

from omegaconf import DictConfig

from raytrain.config import ConfigError, to_dataclass
from raytrain.data.imagetext import ImageTextDataConfig
from raytrain.pipelines.ctrlsynth.config import SynthConfig

CONFIG_NAME = "synth"
HELP = "CtrlSynth: controllable image-text synthesis on Ray Data (new captions, new images, filtered, with provenance)"


def typed_config(cfg: DictConfig) -> tuple[SynthConfig, ImageTextDataConfig]:
    synth = to_dataclass(SynthConfig, cfg.synth, "synth")
    try:
        synth.llm.check()
    except ValueError as e:
        raise ConfigError(f"synth.llm: {e}") from None
    data = to_dataclass(ImageTextDataConfig, {k: cfg.data[k] for k in ("path", "format", "image_column",
                                                                       "caption_column")}, "data")
    return synth, data


def run(cfg: DictConfig) -> dict:
    import ray

    from raytrain.pipelines.ctrlsynth import runner

    synth, data = typed_config(cfg)
    if data.path is None:
        raise ConfigError("data.path: required (webdataset .tar shards or parquet files of image-text pairs)")
    if "://" not in data.path and not os.path.exists(data.path) and not any(c in data.path for c in "*?["):
        raise ConfigError(f"data.path={data.path}: no such file or directory")
    if synth.llm.backend == "engine" and not os.path.isdir(synth.llm.checkpoint):
        raise ConfigError(f"synth.llm.checkpoint={synth.llm.checkpoint}: not a directory")
    if not ray.is_initialized():
        local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        ray.init(address=cfg.ray.address, include_dashboard=False,
                 num_cpus=(cfg.ray.num_cpus or os.cpu_count()) if local else None)
    summary = runner.run(synth, data, str(cfg.out))
    print(json.dumps(summary))
    return summary
