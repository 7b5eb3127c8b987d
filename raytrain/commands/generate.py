"""`raytrain generate checkpoint=PATH prompt="..."`: stream a completion from a checkpoint to stdout."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from omegaconf import DictConfig

from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.specstream import SpecStreamDecoder

CONFIG_NAME = "generate"
HELP = "sample text from a checkpoint with the generation engine, streaming to stdout"
log = logging.getLogger("raytrain")


def sampling_params(node: Mapping[str, Any], key: str) -> SamplingParams:
    """SamplingParams from the sampling keys of a config node (other keys are ignored)."""
    names = {f.name for f in fields(SamplingParams)}
    return to_dataclass(SamplingParams, {k: v for k, v in plain(node).items() if k in names}, key)


def run(cfg: DictConfig) -> None:
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=PATH is required (a checkpoint directory or a training run directory)")
    params = sampling_params(cfg, "generate")
    engine_cfg = to_dataclass(EngineConfig, cfg.generation, "generation")
    if engine_cfg.specstream is not None and not SpecStreamDecoder.accepts(params):
        log.warning("generation=specstream speculates for greedy requests (temperature=0, repetition_penalty=1); "
                    "this one decodes plainly")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    engine = Engine.from_checkpoint(cfg.checkpoint, engine_cfg, device=device, tokenizer=cfg.tokenizer)
    print_completion(engine, cfg.prompt, params)


def print_completion(engine: Engine, prompt: str, params: SamplingParams) -> None:
    """Stream one completion of `prompt` to stdout after the prompt itself."""
    sys.stdout.write(prompt)
    for delta in engine.stream([Request(prompt, params)]):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
