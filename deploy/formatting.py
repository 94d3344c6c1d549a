"""Engine outputs -> OpenAI shapes: log-probabilities, usage, SSE framing."""

from __future__ import annotations

import json

from deploy.protocol import (ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptTokensDetails, TopLogprob,
                             Usage)


def sse(payload: dict | str) -> str:
    """One server-sent event; the stream ends with ``sse("[DONE]")``."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class TokenText:
    """Token id -> its text, cached (the same few ids recur in top-k lists)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely of an entry; it holds the top-k and the sampled token (maybe not in top-k)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(token_text: TokenText, token_ids: list[int], entries: list[dict[int, float]],
                        k: int, offset: int = 0) -> CompletionLogprobs:
    """Legacy completions shape: parallel lists; `offset` is where these tokens start in the text."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries):
        text = token_text(tid)
        out.tokens.append(text)
        out.token_logprobs.append(entry.get(tid))
        out.top_logprobs.append({token_text(t): lp for t, lp in _top(entry, k)})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(token_text: TokenText, token_ids: list[int], entries: list[dict[int, float]],
                  k: int) -> ChatLogprobs:
    """Chat shape: one object per token, with its bytes and its top-k alternatives.

    A missing log-probability is -9999.0, the value OpenAI uses for "effectively impossible".
    """
    content = []
    for tid, entry in zip(token_ids, entries):
        text = token_text(tid)
        tops = [TopLogprob(token=token_text(t), logprob=lp, bytes=list(token_text(t).encode()))
                for t, lp in _top(entry, k)]
        lp = entry.get(tid)
        content.append(ChatTokenLogprob(token=text, logprob=lp if lp is not None else -9999.0,
                                        bytes=list(text.encode()), top_logprobs=tops))
    return ChatLogprobs(content=content)
