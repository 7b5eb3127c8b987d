"""KV-cached autoregressive generation for one prompt, streamed as text.

The prompt is prefilled once into a `KVCache`; each step then feeds one token. Text is yielded as it becomes final:
a piece that could still turn into a stop string, or an incomplete UTF-8 sequence, is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from raytrain.config import RaytrainError
from raytrain.infer.sampling import SamplingParams, next_token
from raytrain.models.kv_cache import KVCache


def generate_ids(model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams,
                 eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids until `max_new_tokens` or EOS (not yielded)."""
    cfg = model.cfg
    if not prompt_ids:
        raise RaytrainError("the prompt is empty")
    total = len(prompt_ids) + params.max_new_tokens
    if total > cfg.max_positions:
        raise RaytrainError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                            f"the model's {cfg.max_positions} positions")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    cache = KVCache(len(model.layers), total)
    tokens = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        for _ in range(params.max_new_tokens):
            logits = model(tokens, cache=cache)[:, -1, :cfg.vocab_size]  # rows past the vocabulary are padding
            token = int(next_token(logits, params, generator))
            if token == eos_id:
                return
            yield token
            tokens = torch.tensor([[token]], device=device)


def stream_text(model: torch.nn.Module, tokenizer: Any, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the generated text in pieces; the pieces joined equal the full completion, cut before any stop."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    prompt_ids = [t for t in prompt_ids if t is not None]
    ids: list[int] = []
    emitted = 0
    for token in generate_ids(model, prompt_ids, params, tokenizer.eos_token_id):
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = _first_stop(text, params.stop)
        if cut is not None:
            yield text[emitted:cut]
            return
        safe = len(text) - _held_back(text, params.stop)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > emitted:
        yield text[emitted:]


def generate_text(model: torch.nn.Module, tokenizer: Any, prompt: str, params: SamplingParams) -> str:
    return "".join(stream_text(model, tokenizer, prompt, params))


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that must wait: a partial UTF-8 character or a prefix of a stop string."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
