"""vLLM's utility routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /metrics``.

- ``/tokenize``: ``{"prompt": "..."}`` (``add_special_tokens`` default true) or ``{"messages":
  [...]}`` (rendered with the chat template exactly as /v1/chat/completions renders it) ->
  ``{"count", "max_model_len", "tokens", "token_strs"}`` (``token_strs`` with ``return_token_strs``).
- ``/detokenize``: ``{"tokens": [...]}`` -> ``{"prompt": "..."}``.
- ``/metrics``: this replica's metrics in the Prometheus text format (see `deploy.metrics`).
Bodies are read and validated like the completion routes' (size bound, unknown fields refused), and
tokenizing runs on the server's thread pool, so a long prompt does not hold up the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, model_validator

from deploy.errors import APIError
from deploy.limits import MAX_MESSAGES, check_depth, check_fields
from deploy.protocol import ChatMessage, TokenId, _Request

MAX_DETOKENIZE = 1 << 20  # token ids in one /detokenize body


class TokenizeRequest(_Request):
    """Either `prompt` (completion style) or `messages` (chat style), as vLLM's two shapes."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (vLLM's)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_shape(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_DETOKENIZE)]


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize(server, req: TokenizeRequest) -> TokenizeResponse:
    """The tokens a completion (`prompt`) or a chat (`messages`) request would be given."""
    server.check_model(req.model)
    check_fields(req.model_extra)
    check_depth(req.chat_template_kwargs, "chat_template_kwargs")
    if req.messages is not None:
        if req.add_special_tokens:
            raise APIError("add_special_tokens with messages: the chat template writes the special "
                           "tokens itself; omit it", param="add_special_tokens")
        ids = server.chat_prompt(req)
    else:
        server.check_prompt_text(req.prompt, "prompt")
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = list(server.tokenizer.encode(req.prompt, add_special_tokens=add))
    strs = server.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=server.max_model_len, tokens=ids, token_strs=strs)


def detokenize(server, req: DetokenizeRequest) -> DetokenizeResponse:
    server.check_model(req.model)
    check_fields(req.model_extra)
    vocab = len(server.tokenizer)
    bad = [t for t in req.tokens if not t < vocab]
    if bad:
        raise APIError(f"tokens holds id(s) outside the vocabulary [0, {vocab}): {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=server.tokenizer.decode(req.tokens))


def add_routes(app: FastAPI, server) -> None:
    """Mount the routes above on `app`, over the `OpenAIServer` `server`."""

    @app.post("/tokenize", openapi_extra=_body(TokenizeRequest))
    async def tokenize_route(request: Request) -> TokenizeResponse:
        return await server.offload(tokenize, server, await server.parse(request, TokenizeRequest))

    @app.post("/detokenize", openapi_extra=_body(DetokenizeRequest))
    async def detokenize_route(request: Request) -> DetokenizeResponse:
        return await server.offload(detokenize, server, await server.parse(request, DetokenizeRequest))

    @app.get("/metrics")
    async def metrics_route() -> Response:
        server.record_engine_stats()  # gauges as of this scrape, not of the last poll
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _body(model: type[BaseModel]) -> dict:
    """OpenAPI request body of a route that parses its body itself (see `OpenAIServer.parse`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}
