"""What a request may be: its size, its nesting, the fields this server knows.

Everything here runs before a request reaches the engine. The body is read with a size bound
(413 past it) and parsed by pydantic's JSON parser (nesting beyond ~200 levels is a 400, never a
RecursionError); free-form values (message parts, extra fields) are held to `MAX_JSON_DEPTH`.
A field of OpenAI's or vLLM's API that this server does not implement is accepted only at the
value that changes nothing, and an unknown field is refused, as OpenAI does: a request is never
served with part of it silently ignored.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # 4 MiB: far above any prompt a context window holds
MAX_PROMPTS = 128  # prompts in one completions request
MAX_MESSAGES = 2048  # chat messages
MAX_CONTENT_PARTS = 256  # parts of one message's content
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1024  # characters of one stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_JSON_DEPTH = 32  # nesting of free-form values

# Fields that change nothing and are accepted as such (OpenAI bookkeeping).
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "safety_identifier"})
# Fields this server does not implement -> the values that mean "not used".
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "priority": (0, None), "use_beam_search": (False, None), "length_penalty": (1.0, None),
    "early_stopping": (False, None), "prompt_logprobs": (None,), "include_stop_str_in_output": (False, None),
    "skip_special_tokens": (True, None), "spaces_between_special_tokens": (True, None),
    "allowed_token_ids": (None,), "bad_words": (None, []), "truncate_prompt_tokens": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,), "verbosity": (None,),
    "return_tokens_as_token_ids": (False, None), "detokenize": (True, None), "chat_template": (None,),
    "chat_template_kwargs": (None,), "documents": (None,), "mm_processor_kwargs": (None,),
    "continue_final_message": (False, None), "add_special_tokens": (None,), "echo": (False, None),
}


def _error(*args, **kwargs):
    from deploy.errors import APIError  # here: deploy.errors imports the wire models, which import us

    return APIError(*args, **kwargs)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past `limit` bytes before reading more than that."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int):
    return _error(f"the request body has {'at least ' if size else ''}{size} bytes; this server accepts at "
                    f"most {limit} (max_request_bytes); send a shorter prompt or fewer prompts",
                    status=413, code="request_too_large")


def check_fields(extra: dict[str, Any] | None, exempt: frozenset[str] = frozenset()) -> None:
    """400 for an unknown field, or an unsupported one set to a value that would change the result."""
    for name, value in (extra or {}).items():
        if name in IGNORED_FIELDS or name in exempt:
            check_depth(value, name)
        elif name in UNSUPPORTED_FIELDS:
            if value not in UNSUPPORTED_FIELDS[name]:
                raise _error(f"{name} is not supported by this server; omit it", param=name)
        else:
            raise _error(f"unknown field {name!r}; remove it (see the API reference in docs/serving.md)",
                           param=name)


def check_depth(value: Any, param: str, limit: int = MAX_JSON_DEPTH) -> None:
    """400 when a free-form value nests deeper than `limit` levels."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise _error(f"{param} nests deeper than {limit} levels; flatten it", param=param)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
