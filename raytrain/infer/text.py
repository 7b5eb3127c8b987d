"""Incremental detokenization with stop strings, for streaming.

Text is released as soon as it is final: a trailing piece that could still become a stop string, or an incomplete
UTF-8 sequence, is held back until it cannot. The pieces joined equal the completion cut before the first stop.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters already released
        self.text = ""  # the text released so far
        self.stopped = False  # a stop string appeared; nothing more will be released

    def push(self, token: int) -> str:
        """Add a token; return the newly final text (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(text, min(hits))
        return self._release(text, len(text) - self._held_back(text))

    def flush(self) -> str:
        """Release what was held back (the generation ended without a stop string)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        piece = text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        self.text += piece
        return piece

    def _held_back(self, text: str) -> int:
        if text.endswith("\ufffd"):
            return 1
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
