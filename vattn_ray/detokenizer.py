"""Incremental detokenisation for streaming, and stop-string matching.

Decoding token by token breaks multi-byte characters (a UTF-8 character may span several byte-level
tokens) and word boundaries. We decode a short window of tokens twice: the part already emitted,
and the same part plus the new tokens; the difference is the new text. While the new text ends in
U+FFFD (an incomplete character) nothing is emitted and the window grows.

With a fast (Rust) tokenizer whose `decode` does no clean-up of spaces, `tokenizers`' own
`DecodeStream` does the same windowed decode in one native call per token (about 1.6 us against 8 us
through `tokenizer.decode` twice): it runs on the engine's step loop, once per token of every
running sequence. A sequence whose stream refuses a token goes on with the window decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers before 0.21
    DecodeStream = None

_REPLACEMENT = "\ufffd"


def stream_backend(tokenizer) -> object | None:
    """The Rust tokenizer to stream-decode with, when that gives exactly `tokenizer.decode`'s text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is None or backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return backend


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0  # start of the context window (already emitted)
    read_offset: int = 0  # end of what has been emitted
    backend: object | None = None  # stream_backend(tokenizer): set to use DecodeStream
    emitted: int = 0  # characters returned so far (stream mode)

    def __post_init__(self) -> None:
        self._stream = None if self.backend is None else DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text that became final (possibly empty)."""
        if self._stream is not None:
            return self._add_streamed(new_ids)
        self.token_ids.extend(new_ids)
        ids = self.token_ids
        prefix = self._decode(ids[self.prefix_offset:self.read_offset])
        full = self._decode(ids[self.prefix_offset:])
        start = max(len(prefix), self._skip())
        if len(full) <= start or full.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        self.emitted = 0
        return full[start:]

    def _add_streamed(self, new_ids: list[int]) -> str:
        pieces = []
        for i, t in enumerate(new_ids):
            try:
                piece = self._stream.step(self.backend, t)
            except Exception:  # noqa: BLE001 - the stream refused a token: go on with the window decode
                # from the first token, past the characters already returned.
                self._stream = None
                text = "".join(pieces)
                self.emitted += len(text)
                self.prefix_offset = self.read_offset = 0
                return text + self.add(list(new_ids[i:]))
            self.token_ids.append(t)
            if piece:
                pieces.append(piece)
        text = "".join(pieces)
        self.emitted += len(text)
        return text

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (an incomplete character)."""
        if self._stream is not None:
            # Stream-decoded text is a prefix of decoding everything; the rest is what was held.
            full = self._decode(self.token_ids)
            rest = full[self.emitted:] if len(full) > self.emitted else ""
            self.emitted = len(full)
            self.prefix_offset = self.read_offset = len(self.token_ids)
            return rest
        ids = self.token_ids
        prefix = self._decode(ids[self.prefix_offset:self.read_offset])
        full = self._decode(ids[self.prefix_offset:])
        start = max(len(prefix), self._skip())
        self.prefix_offset = self.read_offset = len(ids)
        self.emitted = 0
        return full[start:] if len(full) > start else ""

    def _skip(self) -> int:
        """Characters of the window's text already returned: those a refused stream returned, while
        the window still starts at the first token."""
        return self.emitted if self.prefix_offset == 0 else 0

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
