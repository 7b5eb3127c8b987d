"""Incremental detokenization with stop strings, for streaming, in time linear in the text produced.

Tokens are decoded in a sliding window (the previous token or two, then the new ones), the way vLLM's incremental
detokenizer does, so a token costs the same at step 10 and at step 10,000; text ending in an incomplete UTF-8
sequence waits for the next token. Each stop string has a Knuth-Morris-Pratt matcher fed character by character:
its state is the longest prefix of the stop string that the text ends with, which is both the match test and how
much text must be held back because it could still become a stop string. Text is released as soon as it is final;
the pieces joined equal the completion cut before the first stop string.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StopMatcher:
    """Streaming matcher of one string: `feed(ch)` is True when the text fed so far ends with it."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.failure = [0] * len(pattern)  # failure[i]: longest proper border of pattern[:i + 1]
        k = 0
        for i in range(1, len(pattern)):
            while k and pattern[i] != pattern[k]:
                k = self.failure[k - 1]
            k += pattern[i] == pattern[k]
            self.failure[i] = k
        self.state = 0  # characters of the pattern matched at the end of the text

    def feed(self, ch: str) -> bool:
        while self.state and ch != self.pattern[self.state]:
            self.state = self.failure[self.state - 1]
        self.state += ch == self.pattern[self.state]
        if self.state == len(self.pattern):
            self.state = self.failure[-1]
            return True
        return False


def fast_decode(tokenizer: Any) -> Callable[[list[int]], str]:
    """ids -> text without special tokens; straight through the Rust tokenizer when that gives the same text (the
    transformers wrapper costs several times the decode itself, per call)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str], decode: Callable[[list[int]], str] | None = None) -> None:
        self.decode = decode or fast_decode(tokenizer)
        self.matchers = [StopMatcher(s) for s in stop]
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is the context the next window is decoded after
        self.read_offset = 0
        self.pieces: list[str] = []  # the text released so far, piece by piece
        self.held = ""  # decoded text not released yet: it may still begin a stop string
        self.stopped = False  # a stop string appeared; nothing more will be released

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token: int) -> str:
        """Add a token; return the newly final text (possibly empty)."""
        self.ids.append(token)
        return self._take(self._decode_window(final=False))

    def flush(self) -> str:
        """Release everything that was held back (the generation ended without a stop string)."""
        text = self._take(self._decode_window(final=True))
        return text + self._release(len(self.held))

    def _decode_window(self, final: bool) -> str:
        prefix = self.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.decode(self.ids[self.prefix_offset:])
        if len(window) <= len(prefix) or (window.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(prefix):]

    def _take(self, piece: str) -> str:
        """Append newly decoded text; release what can no longer be part of a stop string."""
        if self.stopped or not piece:
            return ""
        for offset, ch in enumerate(piece if self.matchers else ""):
            fired = [m for m in self.matchers if m.feed(ch)]  # every matcher sees every character
            if fired:
                self.held += piece[:offset + 1]
                self.stopped = True
                return self._release(len(self.held) - max(len(m.pattern) for m in fired))
        self.held += piece
        return self._release(len(self.held) - max((m.state for m in self.matchers), default=0))

    def _release(self, upto: int) -> str:
        """Release held[:upto]; what stays held is at most the longest stop string."""
        if self.stopped:
            piece, self.held = self.held[:upto], ""
        else:
            piece, self.held = self.held[:upto], self.held[upto:]
        if piece:
            self.pieces.append(piece)
        return piece
