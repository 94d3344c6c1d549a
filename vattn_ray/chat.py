"""Chat messages -> prompt tokens through the checkpoint's chat template (what `LLM.chat` sends)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, None, or a list of ``{"type": "text"}`` parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"{where} has a {kind!r} part; only text parts are supported")
            parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    raise ValueError(f"{where} must be a string or a list of text parts")


def apply_chat_template(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                        continue_final_message: bool = False, chat_template: str | None = None,
                        chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids) of one conversation; ValueError saying what to change.

    `chat_template` replaces the checkpoint's template; `chat_template_kwargs` are extra variables
    for it (e.g. ``enable_thinking``). The template writes the special tokens (BOS) itself, so the
    text is encoded without adding them again.
    """
    if not messages:
        raise ValueError("messages is empty; send at least one message")
    if add_generation_prompt and continue_final_message:
        raise ValueError("set at most one of add_generation_prompt and continue_final_message")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"messages[{i}] must be an object with a 'role' and a 'content'")
        rendered.append({**m, "content": message_text(m.get("content"), f"messages[{i}].content")})
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError("this model has no chat template; pass chat_template=... or use generate()")
    kwargs = dict(chat_template_kwargs or {})
    try:
        text = tokenizer.apply_chat_template(rendered, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja raises anything for messages it rejects
        raise ValueError(f"the chat template rejected the messages: {exc}") from exc
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError("the chat template produced an empty prompt")
    return text, ids
