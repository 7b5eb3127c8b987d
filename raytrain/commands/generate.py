"""`raytrain generate checkpoint=PATH [adapter=PATH] prompt="..." [chat=true]`: stream a completion from a checkpoint
(with a LoRA adapter trained on it) to stdout; with `chat=true` the prompt is one user message put through the
tokenizer's chat template, and only the answer is printed. A vision-language checkpoint (`job=vlm`) answers `prompt`
as a question about `image=FILE`.

With `rag.documents=FILE rag.question="..."` it answers the question from the documents: through superposition
prompting with `generation=superposition` (the kept documents are logged to stderr), through the Prompt Cache
baseline with `generation=prompt_cache`, else as naive RAG (every document in one prompt).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from raytrain.checkpoint.hf import read_model_config
from raytrain.config import ConfigError, plain, to_dataclass
from raytrain.infer.engine import Engine, EngineConfig, Request
from raytrain.infer.rag import forkjoin_prompt, read_documents
from raytrain.infer.sampling import SamplingParams
from raytrain.infer.specstream import SpecStreamDecoder
from raytrain.models.vlm import VLMConfig

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
    if isinstance(read_model_config(cfg.checkpoint), VLMConfig):
        print(answer_about_image(cfg.checkpoint, cfg.image, cfg.prompt, params, device, cfg.tokenizer))
        return
    if cfg.image is not None:
        raise ConfigError(f"image={cfg.image}: checkpoint {cfg.checkpoint} is a language model, not a VLM")
    if cfg.rag.documents is not None and not cfg.rag.question:
        raise ConfigError('rag.question="..." is required with rag.documents')
    documents = read_documents(cfg.rag.documents) if cfg.rag.documents is not None else None
    engine = Engine.from_checkpoint(cfg.checkpoint, engine_cfg, device=device, tokenizer=cfg.tokenizer,
                                    adapter=cfg.adapter)
    if documents is not None:
        prompt = forkjoin_prompt(engine.tokenizer, documents, cfg.rag.question, cfg.rag.instruction)
        print_answer(engine, Request(params=params, forkjoin=prompt))
    elif cfg.chat:
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


def answer_about_image(checkpoint: str, image: str | None, question: str, params: SamplingParams, device: str,
                       tokenizer: str | None) -> str:
    from raytrain.checkpoint.hf import load_pretrained
    from raytrain.infer.vlm import answer, pixels

    pretrained = load_pretrained(checkpoint, device=device, tokenizer=tokenizer)
    if pretrained.tokenizer is None:
        raise ConfigError(f"{pretrained.path} has no tokenizer files; pass tokenizer=DIR")
    try:
        data = Path(image).read_bytes() if image is not None else None
    except OSError as e:
        raise ConfigError(f"image={image}: {e.strerror}") from None
    size = pretrained.config.image.image_size
    try:
        picture = pixels(data, size) if data is not None else None
    except Exception as e:  # PIL raises many types for bad data
        raise ConfigError(f"image={image}: not an image ({type(e).__name__})") from None
    return answer(pretrained.model, pretrained.tokenizer, [question], [picture], params)[0]


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
    selection = done.superposition
    if engine.config.superposition.method == "prompt_cache":
        print(f"prompt cache: {n} documents as modules, {selection.cached} of them from the path cache",
              file=sys.stderr)
        return
    kept = ", ".join(str(d + 1) for d in selection.kept)
    print(f"superposition: kept document(s) {kept} of {n}", file=sys.stderr)
