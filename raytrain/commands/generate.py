"""`raytrain generate checkpoint=PATH prompt="..."`: stream a completion from a checkpoint to stdout."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any

import torch
from omegaconf import DictConfig

from raytrain.checkpoint.hf import load_pretrained
from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.infer.generate import stream_text
from raytrain.infer.sampling import SamplingParams

CONFIG_NAME = "generate"
HELP = "sample text from a checkpoint with a KV cache, streaming to stdout"


def sampling_params(node: Mapping[str, Any], key: str) -> SamplingParams:
    """SamplingParams from the sampling keys of a config node (other keys are ignored)."""
    names = {f.name for f in fields(SamplingParams)}
    return to_dataclass(SamplingParams, {k: v for k, v in plain(node).items() if k in names}, key)


def run(cfg: DictConfig) -> None:
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=PATH is required (a checkpoint directory or a training run directory)")
    params = sampling_params(cfg, "generate")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    pretrained = load_pretrained(cfg.checkpoint, device=device, tokenizer=cfg.tokenizer)
    if pretrained.tokenizer is None:
        raise ConfigError(f"{pretrained.path} has no tokenizer files; pass tokenizer=DIR")
    print_stream(stream_text(pretrained.model, pretrained.tokenizer, cfg.prompt, params), cfg.prompt)


def print_stream(pieces: Iterable[str], prompt: str) -> None:
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
