"""Sampling parameters and batched next-token selection.

Every row of a batch has its own parameters: greedy or temperature, top-k, top-p (nucleus), repetition penalty
(CTRL's rule) and a 64-bit seed. Selection is a handful of tensor ops over the whole batch, so a step costs the same
whatever the mix of parameters, and only the sampled token ids ever leave the device.

Seeded sampling needs no per-row `torch.Generator`: a row draws token i at its step t by the exponential race
argmax_i p_i / E_i, with E_i = -log U_i and U_i a counter-based hash of (seed, t, i). A request therefore samples the
same tokens alone and inside any batch, on any device. Requests without a seed get a random one at admission.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from raytrain.config import ConfigError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's rule): dividing by them overflows float32
PENALTY_RANGE = (0.01, 100.0)  # beyond it every seen logit saturates; 1e-300 would even become 0 in float32
SEED_RANGE = (-2 ** 63, 2 ** 64)  # what numpy, torch and vLLM accept: signed or unsigned 64-bit


class SamplingError(ConfigError):
    """An invalid sampling parameter; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SamplingError("max_new_tokens", f"max_new_tokens={self.max_new_tokens} must be an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise SamplingError("temperature", f"temperature={self.temperature} must be a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError("top_k", f"top_k={self.top_k} must be an integer >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"top_p={self.top_p} must be in (0, 1]")
        low, high = PENALTY_RANGE
        if not _is_number(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise SamplingError("repetition_penalty",
                                f"repetition_penalty={self.repetition_penalty} must be in [{low:g}, {high:g}]")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise SamplingError("seed", f"seed={self.seed} must be an integer in [-2^63, 2^64)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop", "stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SamplingTable:
    """Per-slot sampling state on the device: parameters, the hash counter and (when needed) the seen-token mask.

    The engine fills a slot when a request joins (`assign`) and reads the first rows of the table as one batch."""

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.temperature = torch.zeros(n_slots, device=device)
        self.top_k = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(n_slots, device=device)
        self.penalty = torch.ones(n_slots, device=device)
        self.seed = torch.zeros(n_slots, 2, dtype=torch.long, device=device)  # (low, high) 32-bit halves
        self.step = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.seen: torch.Tensor | None = None  # (n_slots, vocab) bool, allocated by the first penalised request
        self.params: list[SamplingParams | None] = [None] * n_slots

    def assign(self, slot: int, params: SamplingParams, seed: int, prompt: list[int]) -> None:
        """Give `slot` to a request: its parameters, its 64-bit seed, and its prompt for the repetition penalty."""
        self.params[slot] = params
        seed %= 2 ** 64
        values = (0.0 if params.greedy else params.temperature, params.top_k, params.top_p,
                  params.repetition_penalty)
        for table, value in zip((self.temperature, self.top_k, self.top_p, self.penalty), values):
            table[slot] = value
        self.seed[slot] = torch.tensor([seed & 0xFFFFFFFF, seed >> 32])
        self.step[slot] = 0
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(len(self.params), self.vocab_size, dtype=torch.bool, device=self.step.device)
            self.seen[slot] = False
            ids = torch.tensor([t for t in prompt if t < self.vocab_size], dtype=torch.long)
            self.seen[slot, ids.to(self.seen.device)] = True

    def release(self, slot: int) -> None:
        self.params[slot] = None

    def greedy(self, rows: int) -> bool:
        """Whether every request in slots 0..rows-1 takes the argmax of its logits (greedy, no repetition penalty):
        such a step needs no table (a greedy row draws no noise, so its counter need not advance)."""
        return all(p is None or (p.greedy and p.repetition_penalty == 1.0) for p in self.params[:rows])

    def sample(self, logits: torch.Tensor, slot: int | None = None, live: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, V) of slots 0..B-1, or (1, V) of `slot` -> next token ids (B,) on the device. Rows in `live`
        (B,) bool (None: all) advance their counter and seen mask; the others are computed and ignored."""
        B = logits.shape[0]
        rows = slice(0, B) if slot is None else slice(slot, slot + 1)
        used = [p for p in self.params[rows] if p is not None]
        penalised = self.seen is not None and any(p.repetition_penalty != 1.0 for p in used)
        tokens = select_tokens(
            logits[:, :self.vocab_size].float(), self.temperature[rows], self.top_k[rows], self.top_p[rows],
            self.penalty[rows], self.seed[rows], self.step[rows], self.seen[rows] if penalised else None,
            sampled=any(not p.greedy for p in used), filtered=any(p.top_k or p.top_p < 1 for p in used))
        self.step[rows] += 1 if live is None else live
        if penalised:
            seen, row = self.seen[rows], torch.arange(B, device=tokens.device)
            seen[row, tokens] |= True if live is None else live
        return tokens


def select_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  penalty: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, seen: torch.Tensor | None,
                  sampled: bool = True, filtered: bool = True) -> torch.Tensor:
    """logits (B, V) float32 and per-row parameters (B,) -> token ids (B,). `sampled`/`filtered` False skip work no
    row needs (decided on the host, so no device sync)."""
    if seen is not None:
        logits = penalize_repetition(logits, seen, penalty)
    greedy = logits.argmax(-1)
    if not sampled:
        return greedy
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if filtered:
        scaled = filter_logits(scaled, top_k, top_p)
    race = scaled.softmax(-1) / exponential_noise(seed, step, logits.shape[-1])
    return torch.where(temperature > 0, race.argmax(-1), greedy)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with everything outside each row's top-k (0 = off) and outside the smallest nucleus of mass
    >= top_p (1 = off) set to -inf; the most likely token always survives. top-p applies after top-k."""
    V = logits.shape[-1]
    ordered, order = logits.sort(-1, descending=True)
    ranks = torch.arange(V, device=logits.device)
    keep = ranks[None] < torch.where(top_k > 0, top_k, V)[:, None]
    probs = ordered.masked_fill(~keep, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    keep[:, 0] = True
    return logits.masked_fill(~keep.scatter(-1, order, keep), float("-inf"))


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool, penalty (B,): divide positive logits of seen tokens by the row's penalty,
    multiply negative ones."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of int64 values in [0, 2^32) (lowbias32's shape; multipliers below 2^31 keep every product
    under 2^63, so int64 arithmetic never overflows on any device)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """seed (B, 2), step (B,) -> (B, vocab) i.i.d. Exp(1) draws, a pure function of (seed, step, token index)."""
    key = _mix32(seed[:, 0] ^ _mix32(seed[:, 1] ^ _mix32(step & _MASK32)))  # (B,)
    token = _mix32(torch.arange(vocab, device=seed.device))  # hashed first, so rows are not permutations of each other
    bits = _mix32(token[None] ^ key[:, None]) >> 8  # 24 uniform bits
    return -torch.log((bits.float() + 0.5) * 2.0 ** -24)
