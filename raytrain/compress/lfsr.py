"""Fibonacci LFSR of SeedLM (spec §2.1-2.2): the register, its full cycle as a table, and seed -> U(s).

A K-bit register shifts right and feeds the XOR of its tap bits into the most significant bit. Seeds are the nonzero
states. Seed s emits the states that follow it; filled row-major into a C x P matrix they give V(s), and
U(s) = (V(s) - 2^(K-1)) / (2^(K-1) - 1). With a maximal-length tap set every nonzero state lies on one cycle, so the
cycle table T (T[i] = the state i+1 steps after seed 1) lists all candidate matrices as windows: seed s emits the window
of T starting at its *cycle offset* o(s) = (position of s in T) + 1 mod N. The codec searches and the kernel gathers
by offset; the file stores the LFSR state, which is what hardware regenerates from.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LFSRConfig:
    """Register width `K` and tap bit indices (alpha_j = 1); the default is the spec's K=16 maximal-length set."""

    K: int = 16
    taps: tuple[int, ...] = (0, 1, 3, 12)

    def __post_init__(self) -> None:
        if not 2 <= self.K <= 24:
            raise ValueError(f"lfsr K={self.K}: supported widths are 2..24 bits")
        if not self.taps or 0 not in self.taps or any(not 0 <= t < self.K for t in self.taps):
            raise ValueError(f"lfsr taps={list(self.taps)}: need tap 0 and every tap in 0..{self.K - 1}")

    @property
    def period(self) -> int:
        return (1 << self.K) - 1

    @property
    def centre(self) -> int:
        """2^(K-1): subtracted from a state to centre it; U = (V - centre) / (centre - 1)."""
        return 1 << (self.K - 1)


def step(x: int, cfg: LFSRConfig) -> int:
    """One shift: the feedback bit (XOR of the tap bits) enters at the MSB."""
    b = 0
    for j in cfg.taps:
        b ^= (x >> j) & 1
    return (x >> 1) | (b << (cfg.K - 1))


def emit(seed: int, n: int, cfg: LFSRConfig) -> Iterator[int]:
    """The `n` states after `seed` (the seed itself is not emitted): the reference definition of V(s)."""
    x = seed
    for _ in range(n):
        x = step(x, cfg)
        yield x


def stream_bits(cfg: LFSRConfig, n: int, seeds: np.ndarray | None = None) -> np.ndarray:
    """The first `n` output bits (uint8) of the register started at seed 1, or (len(seeds), n) for each of `seeds`:
    bit j of the state at time t is bit t+j, so the state at time t is bits t .. t+K-1 (the seed is bits 0 .. K-1).
    The stream obeys s[m+K] = XOR_j s[m+j] over the taps, so it is filled K - max(taps) bits at a time."""
    K = cfg.K
    lag = K - max(cfg.taps)
    starts = np.array([1] if seeds is None else seeds, dtype=np.int64)
    bits = np.zeros((len(starts), max(n, K)), dtype=np.uint8)
    bits[:, :K] = (starts[:, None] >> np.arange(K)) & 1
    for m in range(K, bits.shape[1], lag):
        stop = min(m + lag, bits.shape[1])
        acc = np.zeros((len(starts), stop - m), dtype=np.uint8)
        for j in cfg.taps:
            acc ^= bits[:, m - K + j:stop - K + j]
        bits[:, m:stop] = acc
    return bits[0, :n] if seeds is None else bits[:, :n]


@functools.lru_cache(maxsize=8)
def cycle(cfg: LFSRConfig) -> torch.Tensor:
    """T, int64 (N,): T[i] is the state i+1 steps after seed 1. Raises if the taps are not maximal-length."""
    K, N = cfg.K, cfg.period
    bits = stream_bits(cfg, N + 2 * K)
    weights = (1 << np.arange(K, dtype=np.int64))
    windows = np.lib.stride_tricks.sliding_window_view(bits[1:N + K], K)  # state t+1 = bits t+1 .. t+K
    table = torch.from_numpy(windows.astype(np.int64) @ weights)
    if table[-1] != 1 or torch.unique(table).numel() != N:
        raise ValueError(f"lfsr taps={list(cfg.taps)} with K={cfg.K} are not maximal-length "
                         f"(the cycle through seed 1 is not all {N} nonzero states)")
    return table


@functools.lru_cache(maxsize=8)
def offset_of_state(cfg: LFSRConfig) -> torch.Tensor:
    """int64 (2^K,): the cycle offset o(s) of every state s (entry 0 is unused and set to -1)."""
    table = cycle(cfg)
    inverse = torch.full((cfg.period + 1,), -1, dtype=torch.int64)
    inverse[table] = (torch.arange(cfg.period) + 1) % cfg.period
    return inverse


def state_of_offset(offsets: torch.Tensor, cfg: LFSRConfig) -> torch.Tensor:
    """The seed (LFSR state) whose emitted window starts at each cycle offset: the state just before T[o]."""
    return cycle(cfg)[(offsets.long() - 1) % cfg.period]


def extended_cycle(cfg: LFSRConfig, window: int) -> torch.Tensor:
    """T followed by its first `window - 1` entries (wrapping again for windows longer than the cycle), so any window
    of that length is a plain slice (no modulo)."""
    table = cycle(cfg)
    return table.repeat(-(-(cfg.period + window - 1) // cfg.period))[:cfg.period + window - 1]


def window_states(offsets: torch.Tensor, C: int, P: int, cfg: LFSRConfig) -> torch.Tensor:
    """V for each cycle offset: int64 (len(offsets), C, P), V[o][c, p] = T[o + c*P + p] (row-major fill)."""
    ext = extended_cycle(cfg, C * P)
    return ext[offsets.long()[:, None] + torch.arange(C * P)].view(-1, C, P)


def centred_table(cfg: LFSRConfig, window: int) -> torch.Tensor:
    """The extended cycle as int32 V - 2^(K-1): the integer form the decoder and the GPU kernel gather from."""
    return (extended_cycle(cfg, window) - cfg.centre).to(torch.int32)


def matrices(offsets: torch.Tensor, C: int, P: int, cfg: LFSRConfig, dtype: torch.dtype = torch.float64
             ) -> torch.Tensor:
    """U for each cycle offset: (len(offsets), C, P) in [-1, 1]."""
    V = window_states(offsets, C, P, cfg).to(dtype)
    return (V - cfg.centre) / (cfg.centre - 1)
