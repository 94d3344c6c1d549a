"""vLLM's utility routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /metrics``.

- ``/tokenize``: ``{"prompt": "..."}`` (``add_special_tokens`` default true) or ``{"messages":
  [...]}`` (rendered with the chat template exactly as /v1/chat/completions renders it) ->
  ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` with ``return_token_strs``).
- ``/detokenize``: ``{"tokens": [...]}`` -> ``{"prompt": "..."}``.
- ``/metrics``: this replica's metrics in the Prometheus text format (see `deploy.metrics`).
Tokenizing runs on a worker thread, so a long prompt does not hold up the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from deploy.errors import APIError
from deploy.protocol import ChatMessage, _Request


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize(server, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
    """The tokens a completion (`prompt`) or a chat (`messages`) request would be given."""
    server.check_model(req.model)
    if isinstance(req, TokenizeChatRequest):
        ids = server.chat_prompt(req)
    else:
        ids = list(server.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
    strs = server.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=server.max_model_len, tokens=ids, token_strs=strs)


def detokenize(server, req: DetokenizeRequest) -> DetokenizeResponse:
    server.check_model(req.model)
    vocab = len(server.tokenizer)
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(f"tokens holds id(s) outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=server.tokenizer.decode(req.tokens))


def add_routes(app: FastAPI, server) -> None:
    """Mount the routes above on `app`, over the `OpenAIServer` `server`."""

    @app.post("/tokenize")
    async def tokenize_route(body: dict[str, Any] = Body(...)) -> TokenizeResponse:
        # Dispatch on the body's shape, so a validation error names the fields of that shape.
        kind = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
        try:
            req = kind.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        return await asyncio.to_thread(tokenize, server, req)

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> DetokenizeResponse:
        return await asyncio.to_thread(detokenize, server, req)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        server.record_engine_stats()  # gauges as of this scrape, not of the last poll
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
