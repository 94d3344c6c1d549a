"""Incremental detokenisation: the native stream (`tokenizers`' DecodeStream) and the window decode
give the same text as decoding every token at once, however the tokens arrive; a stream that
refuses a token hands over to the window decode without losing or repeating text.

The project's byte-level BPE (the tokenizer every random checkpoint ships), at a 128k vocabulary.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vattn_ray.detokenizer import IncrementalDetokenizer, stream_backend
from vattn_ray.model.tokenizer_builder import save_tokenizer

VOCAB = 128256


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(str(path), VOCAB, 4096)
    return AutoTokenizer.from_pretrained(str(path))


def emitted(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int]) -> str:
    """Feed `ids` in chunks of the given sizes (the rest at the end), then flush."""
    text, i = "", 0
    for n in chunks:
        text += detok.add(ids[i:i + n])
        i += n
    if i < len(ids):
        text += detok.add(ids[i:])
    return text + detok.flush()


# Token ids: mostly the byte alphabet and merges (multi-byte characters split over tokens), some
# specials (skipped), some of the padding entries at the top of the vocabulary.
TOKEN = st.one_of(st.integers(0, 6), st.integers(7, 600), st.integers(600, 4000), st.integers(VOCAB - 50, VOCAB - 1))


def test_the_stream_is_used_for_this_tokenizer(tokenizer):
    assert stream_backend(tokenizer) is not None


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(TOKEN, min_size=1, max_size=60), chunks=st.lists(st.integers(1, 4), max_size=30))
def test_stream_and_window_decode_equal_decoding_at_once(tokenizer, ids, chunks):
    want = tokenizer.decode(ids, skip_special_tokens=True)
    window = emitted(IncrementalDetokenizer(tokenizer), ids, chunks)
    stream = emitted(IncrementalDetokenizer(tokenizer, backend=stream_backend(tokenizer)), ids, chunks)
    assert window == want
    assert stream == want


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("é 😀 ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, backend=stream_backend(tokenizer))
    pieces = [detok.add([t]) for t in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + detok.flush() == "é 😀 ok"


class RefusingStream:
    """A stream that takes `n` tokens, then refuses (as DecodeStream does on an invalid prefix)."""

    def __init__(self, real, n: int) -> None:
        self.real, self.n = real, n

    def step(self, backend, token_id):
        if self.n == 0:
            raise RuntimeError("Invalid prefix encountered")
        self.n -= 1
        return self.real.step(backend, token_id)


@pytest.mark.parametrize("refuse_after", [0, 1, 5, 17])
def test_a_refused_token_hands_over_to_the_window_decode(tokenizer, refuse_after):
    ids = tokenizer.encode("Streams of tokens: naïve café, 日本語, and more text to go.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, backend=stream_backend(tokenizer))
    detok._stream = RefusingStream(detok._stream, refuse_after)
    text = emitted(detok, ids, [1, 2, 3, 1, 1, 2])
    assert detok._stream is None
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_final_only_sequences_decode_once_at_the_end(tokenizer):
    ids = tokenizer.encode("decoded once, at the end", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, backend=stream_backend(tokenizer))
    detok.token_ids.extend(ids)  # what the engine does when nobody reads the text before the end
    assert detok.flush() == "decoded once, at the end"
