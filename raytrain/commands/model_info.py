"""`raytrain model-info model=NAME`: parameter counts and per-layer shapes as one JSON object on stdout.
The model is built on the meta device, so any size answers in seconds."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from raytrain.models.registry import build_model, model_config

CONFIG_NAME = "model_info"
HELP = "print a model's parameter counts and per-layer shapes as JSON"


def run(cfg: DictConfig) -> None:
    model_cfg = model_config(cfg.model)
    model = build_model(model_cfg, "meta")
    info = {"model": model_cfg.name, **model.param_counts()}
    if hasattr(model_cfg, "layer_shapes"):  # decoders: per-layer widths differ
        info["layers"] = [{"q_heads": s.q_heads, "kv_heads": s.kv_heads, "ffn_dim": s.ffn_dim}
                          for s in model_cfg.layer_shapes()]
    print(json.dumps(info))
