"""`raytrain autolabel eval data.path=SEQUENCES labels=LABELS [baseline=LABELS]`: 3D and BEV AP of auto labels.

Prints one JSON object: the AP tables of `labels` (class-agnostic, moving, static, per class, at each IoU) and, when
`baseline` is set (a `mode=moving_only` run), the same tables for it and the static-object gain between the two.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from raytrain.config import ConfigError, to_dataclass
from raytrain.data.lidar import find_sequences
from raytrain.pipelines.autolabel.evaluate import EvalConfig, load_frames, report

CONFIG_NAME = "autolabel_eval"
HELP = "score auto labels against ground truth: 3D/BEV AP (also: raytrain autolabel eval)"


def evaluate(sequences: list[Path], labels: Path, cfg: EvalConfig) -> dict:
    if not labels.is_dir():
        raise ConfigError(f"labels={labels}: no such directory")
    frames, missing = load_frames(sequences, labels)
    return {**report(frames, cfg), "missing_sequences": missing}


def run(cfg: DictConfig) -> dict:
    ecfg = to_dataclass(EvalConfig, cfg.eval, "eval")
    sequences = find_sequences(cfg.data.path)
    out = {"labels": {"path": str(cfg.labels), **evaluate(sequences, Path(cfg.labels), ecfg)}}
    if cfg.baseline:
        out["baseline"] = {"path": str(cfg.baseline), **evaluate(sequences, Path(cfg.baseline), ecfg)}
        out["static_gain"] = {k: None if v is None or out["baseline"]["static"][k] is None
                              else round(v - out["baseline"]["static"][k], 4)
                              for k, v in out["labels"]["static"].items()}
    print(json.dumps(out))
    return out
