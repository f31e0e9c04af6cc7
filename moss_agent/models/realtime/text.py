"""Turning streamed text deltas into token ids.

``GrowingTextTokenizer`` (default) gives, for any split of a text into deltas, exactly the ids of
tokenizing the whole text at once. BPE never merges across pre-tokens (the tokenizer's regex split),
so once a later pre-token has started, every earlier one is final: each push tokenizes the pending
text and commits the tokens that end before the last pre-token, keeping the rest pending.

``UpstreamSegmentTokenizer`` reproduces upstream ``push_text``: cut the buffer at punctuation or
after 32 characters and tokenize each segment alone (the space that ends a segment becomes its own
token). Behaviour described in reference/realtime-model.md section 8.
"""

from __future__ import annotations

import re
from typing import Any, Protocol


class TextTokenizer(Protocol):
    def push(self, delta: str) -> list[int]:
        """Add text; return the ids that became final."""

    def finish(self) -> list[int]:
        """No more text; return the remaining ids."""


class GrowingTextTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = tokenizer.backend_tokenizer
        self._normalizer = backend.normalizer
        self._pre_tokenizer = backend.pre_tokenizer
        self._pending = ""

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False)) if text else []

    def push(self, delta: str) -> list[int]:
        if not delta:
            return []
        pending = self._pending + delta
        if self._normalizer is not None:
            pending = self._normalizer.normalize_str(pending)
        pieces = self._pre_tokenizer.pre_tokenize_str(pending) if self._pre_tokenizer is not None else []
        if len(pieces) < 2:
            self._pending = pending
            return []
        # Encode the whole pending text so pre-tokens that look ahead (whitespace runs) see their
        # context, and commit the tokens that end before the last pre-token.
        cut = pieces[-1][1][0]
        encoding = self._tokenizer(pending, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        done = sum(1 for _, end in encoding["offset_mapping"] if end <= cut)
        self._pending = pending[cut:]
        return ids[:done]

    def finish(self) -> list[int]:
        ids = self._encode(self._pending)
        self._pending = ""
        return ids


_UPSTREAM_SPLIT = re.compile(r"[。！？!?\.\u2026]\s*|[,，;；:：\u2014\u2013\-]\s*|\)\s*|\]\s*|\n")


class UpstreamSegmentTokenizer:
    """Upstream's segmentation: look for a cut once 8 characters are buffered, force one at 32."""

    def __init__(self, tokenizer: Any, min_chars: int = 8, max_chars: int = 32) -> None:
        self._tokenizer = tokenizer
        self._min_chars = min_chars
        self._max_chars = max_chars
        self._buffer = ""

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _next_cut(self) -> int | None:
        buffer = self._buffer
        if len(buffer) >= self._min_chars:
            for match in _UPSTREAM_SPLIT.finditer(buffer):
                if match.end() >= self._min_chars:
                    return match.end()
        if len(buffer) >= self._max_chars:
            space = buffer.rfind(" ")
            return space + 1 if space != -1 else self._max_chars
        return None

    def push(self, delta: str) -> list[int]:
        self._buffer += delta
        ids: list[int] = []
        while self._buffer and (cut := self._next_cut()) is not None:
            ids += self._encode(self._buffer[:cut])
            self._buffer = self._buffer[cut:]
        return ids

    def finish(self) -> list[int]:
        ids = self._encode(self._buffer)
        self._buffer = ""
        return ids
