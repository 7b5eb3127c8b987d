"""Measuring a compressed model: held-out perplexity of any causal LM given as a logits function.

The text is tokenized document by document (BOS first), concatenated and cut into non-overlapping windows of
seq_len + 1 tokens; perplexity is exp of the mean next-token cross-entropy over every predicted position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens (B, T) -> logits (B, T, >= vocab)


def token_windows(token_lists: Iterable[list[int]], seq_len: int, max_tokens: int) -> torch.Tensor:
    """(n, seq_len + 1) int64 windows from the concatenated token lists, at most `max_tokens` predicted tokens."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if len(stream) >= max_tokens + seq_len + 1:
            break
    n = min(len(stream) - 1, max_tokens) // seq_len
    if n < 1:
        raise ValueError(f"the evaluation text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    return torch.tensor(stream[:n * seq_len + 1]).unfold(0, seq_len + 1, seq_len)


@torch.inference_mode()
def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, vocab_size: int, batch_size: int = 8,
               device: torch.device | str = "cpu") -> float:
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i:i + batch_size].to(device)
        logits = logits_fn(batch[:, :-1])[..., :vocab_size].float()
        total += float(F.cross_entropy(logits.reshape(-1, vocab_size), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(total / count)
