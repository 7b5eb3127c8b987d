"""`raytrain autolabel distill data.path=SEQUENCES labels=LABELS out=STUDENT`: train the LiDAR-only point head.

Distils the per-point VL features saved by `raytrain autolabel` into a pillar network, saves it as a checkpoint
(`config.json` + `model.safetensors`), and prints one JSON object: the distillation loss at the start and end, and on
held-out sequences the per-point text-query accuracy (points cameras saw, and points none did) and the per-class AP
of the auto-label boxes labelled by the student versus by the auto-labeler.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from raytrain.checkpoint.hf import save_pretrained
from raytrain.config import ConfigError, to_dataclass
from raytrain.data.lidar import Sequence, find_sequences
from raytrain.pipelines.autolabel import distill
from raytrain.pipelines.autolabel.config import LabelConfig, VLMConfig
from raytrain.pipelines.autolabel.evaluate import EvalConfig
from raytrain.pipelines.autolabel.label import Prompts
from raytrain.pipelines.autolabel.vlm import build_vlm

CONFIG_NAME = "autolabel_distill"
HELP = "distil auto-label VL features into a LiDAR-only point network (also: raytrain autolabel distill)"


def run(cfg: DictConfig) -> dict:
    dcfg = to_dataclass(distill.DistillConfig, cfg.distill, "distill")
    lcfg = to_dataclass(LabelConfig, cfg.label, "label")
    ecfg = to_dataclass(EvalConfig, cfg.eval, "eval")
    try:
        model = build_vlm(to_dataclass(VLMConfig, cfg.vlm, "vlm"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if model.dim != dcfg.model.out_dim:
        raise ConfigError(f"distill.model.out_dim={dcfg.model.out_dim} must equal the VLM feature size {model.dim}")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out}: already holds files; choose a new directory")
    seqs = [Sequence(p) for p in find_sequences(cfg.data.path)]
    if len(seqs) <= dcfg.holdout_sequences:
        raise ConfigError(f"data.path={cfg.data.path}: {len(seqs)} sequences; distill.holdout_sequences="
                          f"{dcfg.holdout_sequences} leaves none to train on")
    labels = Path(cfg.labels)
    try:
        per_seq = [distill.load_frames(s, labels) for s in seqs]
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    split = len(seqs) - dcfg.holdout_sequences
    train_frames = [f for frames in per_seq[:split] for f in frames]
    held_out = [f for frames in per_seq[split:] for f in frames]
    if not train_frames:
        raise ConfigError(f"labels={labels}: no feature shards; label with autolabel.save_features=true, mode=full")
    student, losses = distill.train(train_frames, dcfg)
    prompts = Prompts.encode(model, lcfg)
    result = {"steps": dcfg.steps, "train_frames": len(train_frames), "heldout_frames": len(held_out),
              "loss_first": round(float(np.mean(losses[:10])), 4), "loss_last": round(float(np.mean(losses[-10:])), 4),
              **distill.held_out_report(student, held_out, prompts, lcfg.tau, ecfg)}
    save_pretrained(out, dcfg.model, dict(student.state_dict()), meta={"labels": str(labels), "report": result})
    result["checkpoint"] = str(out)
    print(json.dumps(result))
    return result
