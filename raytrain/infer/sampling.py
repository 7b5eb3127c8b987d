"""Sampling parameters and next-token selection: greedy, temperature, top-k, top-p (nucleus), repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raytrain.config import ConfigError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL's rule); 1 = off
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past EOS (fixed-length outputs, e.g. for load tests)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (B, V) with everything outside the top-k and outside the smallest nucleus of mass >= top_p set to
    -inf; the most likely token always survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,), seen (n,) token ids: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits[seen]
    return logits.scatter(0, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               seen: torch.Tensor | None = None) -> int:
    """logits (V,) of one sequence -> the next token id."""
    if seen is not None:
        logits = penalize_repetition(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    logits = filter_logits(logits.float()[None] / params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
