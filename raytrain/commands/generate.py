"""`raytrain generate checkpoint=PATH prompt="..."`: stream a completion from a checkpoint to stdout.

With `rag.documents=FILE rag.question="..."` it answers the question from the documents: through superposition
prompting with `generation=superposition` (the kept documents are logged to stderr), else as naive RAG (every
document in one prompt).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from omegaconf import DictConfig

from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.rag import forkjoin_prompt, read_documents
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
    if cfg.rag.documents is None:
        engine = Engine.from_checkpoint(cfg.checkpoint, engine_cfg, device=device, tokenizer=cfg.tokenizer)
        print_completion(engine, cfg.prompt, params)
        return
    if not cfg.rag.question:
        raise ConfigError('rag.question="..." is required with rag.documents')
    documents = read_documents(cfg.rag.documents)
    engine = Engine.from_checkpoint(cfg.checkpoint, engine_cfg, device=device, tokenizer=cfg.tokenizer)
    prompt = forkjoin_prompt(engine.tokenizer, documents, cfg.rag.question, cfg.rag.instruction)
    print_answer(engine, Request(params=params, forkjoin=prompt))


def print_completion(engine: Engine, prompt: str, params: SamplingParams) -> None:
    """Stream one completion of `prompt` to stdout after the prompt itself."""
    sys.stdout.write(prompt)
    for delta in engine.stream([Request(prompt, params)]):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def print_answer(engine: Engine, request: Request) -> None:
    """Stream the answer to a RAG request to stdout; which documents superposition kept goes to stderr."""
    for delta in engine.stream([request]):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        done = delta.completion
    sys.stdout.write("\n")
    n = len(request.forkjoin.documents)
    if done.superposition is None:
        print(f"naive RAG: {n} documents in one prompt of {done.prompt_tokens} tokens", file=sys.stderr)
        return
    kept = ", ".join(str(d + 1) for d in done.superposition.kept)
    print(f"superposition: kept document(s) {kept} of {n}", file=sys.stderr)
