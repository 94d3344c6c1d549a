"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

Bad input is a 400 whose message says what to change; an unknown model is a 404 with
``code: model_not_found`` (what OpenAI answers). Only a fault of ours is a 500.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# SamplingParams and the engine start their ValueError messages with the offending field's name.
_LEADING_FIELD = re.compile(r"^([a-z][a-z_]*) ")
_LOC_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*|\d+)$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_KNOWN_PARAMS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                 "logprobs", "n", "min_tokens", "prompt", "messages", "top_logprobs", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "min_p", "logit_bias"}


class APIError(Exception):
    """An error to answer with an OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        response = error_response(self.status, self.message, param=self.param, code=self.code, type=self.type)
        response.headers.update(self.headers)
        return response

    @classmethod
    def from_value_error(cls, exc: ValueError, param: str | None = None) -> "APIError":
        """A ValueError from SamplingParams or the engine: 400, `param` read from the message."""
        message = str(exc)
        if param is None:
            m = _LEADING_FIELD.match(message)
            param = m.group(1) if m and m.group(1) in _KNOWN_PARAMS else None
        return cls(message, param=param)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def error_body(exc: APIError) -> dict:
    """The error as a dict (sent as an SSE event when a stream fails after its first byte)."""
    return ErrorResponse(error=ErrorInfo(message=exc.message, type=exc.type, param=exc.param,
                                         code=exc.code)).model_dump()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    # Of a union's errors, a bound or a size says more than "not a string" from another member.
    first = min(errors, key=lambda e: str(e.get("type", "")).endswith("_type"))
    # Union members add their type to the location ("stop", "list[constrained-str]", 0): keep
    # only field names and indexes, which is what `param` means to a client.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and _LOC_PART.match(str(p))
           and str(p) not in _TYPE_TAGS]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('msg', '')}); send a JSON object", None
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    where = f"{param}: " if param else "request body: "
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error")
