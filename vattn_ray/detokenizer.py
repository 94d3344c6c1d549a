"""Incremental detokenisation for streaming, and stop-string matching.

Decoding token by token breaks multi-byte characters (a UTF-8 character may span several byte-level
tokens) and word boundaries. We decode a short window of tokens twice: the part already emitted,
and the same part plus the new tokens; the difference is the new text. While the new text ends in
U+FFFD (an incomplete character) nothing is emitted and the window grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # start of the context window (already emitted)
    read_offset: int = 0  # end of what has been emitted

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text that became final (possibly empty)."""
        self.token_ids.extend(new_ids)
        ids = self.token_ids
        prefix = self._decode(ids[self.prefix_offset:self.read_offset])
        full = self._decode(ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (an incomplete character)."""
        ids = self.token_ids
        prefix = self._decode(ids[self.prefix_offset:self.read_offset])
        full = self._decode(ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def find_stop(text: str, new_from: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends in `text[new_from:]`: (index where it starts, the string).

    Only matches that overlap the new text are looked for, so each check costs O(new text).
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop, max(0, new_from - len(stop) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best
