"""Path caching for superposition prompting: a document path's KV, computed once, reused by later requests.

A document's KV depends on what it attends to (the preamble) and on where it sits: with equilibrium positions its
step S/|d_i| depends on every document length of the fork, so an entry is valid only for the same (model, preamble,
document, step, start), and that tuple is the key (spec section 6). An entry holds the path's per-layer KV and its
mean log-likelihood (the document term of the path score), so a hit skips the document's forward entirely.

The cache is a least-recently-used map bounded in bytes: an insertion evicts the oldest entries until the total fits.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


def digest(tokens: list[int]) -> str:
    """A short hash of a token sequence (cache keys hold it instead of the tokens)."""
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16).hexdigest()


class PathCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # oldest first
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable) -> Any | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Store `value` (taking `nbytes`); an entry larger than the whole cache is not stored."""
        if key in self.entries:
            self.bytes -= self.entries.pop(key)[1]
        if nbytes > self.max_bytes:
            return
        self.entries[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, freed) = self.entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {"entries": len(self.entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}
