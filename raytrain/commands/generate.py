"""`raytrain generate checkpoint=PATH [adapter=PATH] prompt="..." [chat=true]`: stream a completion from a checkpoint
(with a LoRA adapter trained on it) to stdout; with `chat=true` the prompt is one user message put through the
tokenizer's chat template, and only the answer is printed."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from omegaconf import DictConfig

from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.sampling import SamplingParams

CONFIG_NAME = "generate"
HELP = "sample text from a checkpoint with the generation engine, streaming to stdout"


def sampling_params(node: Mapping[str, Any], key: str) -> SamplingParams:
    """SamplingParams from the sampling keys of a config node (other keys are ignored)."""
    names = {f.name for f in fields(SamplingParams)}
    return to_dataclass(SamplingParams, {k: v for k, v in plain(node).items() if k in names}, key)


def run(cfg: DictConfig) -> None:
    if cfg.checkpoint is None:
        raise ConfigError("checkpoint=PATH is required (a checkpoint directory or a training run directory)")
    params = sampling_params(cfg, "generate")
    engine_cfg = to_dataclass(EngineConfig, cfg.generation, "generation")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    engine = Engine.from_checkpoint(cfg.checkpoint, engine_cfg, device=device, tokenizer=cfg.tokenizer,
                                    adapter=cfg.adapter)
    if cfg.chat:
        print_completion(engine, chat_prompt(engine.tokenizer, cfg.prompt), params, echo=False)
    else:
        print_completion(engine, cfg.prompt, params)


def chat_prompt(tokenizer: Any, message: str) -> list[int]:
    """Token ids of one user message through the tokenizer's chat template, ending where the assistant answers
    (token ids go to the engine as they are: the template decides about BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat=true: the checkpoint's tokenizer has no chat template")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def print_completion(engine: Engine, prompt: str | list[int], params: SamplingParams, echo: bool = True) -> None:
    """Stream one completion of `prompt` to stdout, after the prompt itself if `echo`."""
    if echo:
        sys.stdout.write(prompt)
    for delta in engine.stream([Request(prompt, params)]):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
