"""An optional API key: when set, `/v1/*`, `/tokenize`, `/detokenize` and `/stats` need
``Authorization: Bearer <key>`` (and an elastic pair's ``/elastic/*``).

`/health` stays open (Serve's and Kubernetes' probes carry no key), and so do `/metrics`
(Prometheus scrapers, as vLLM leaves it) and the OpenAPI pages.
A plain ASGI middleware (not Starlette's `BaseHTTPMiddleware`), so streaming responses and
client-disconnect detection pass through untouched.
"""

from __future__ import annotations

import hmac
import os

from deploy.errors import error_response

API_KEY_ENV = "VATTN_RAY_API_KEY"
PROTECTED_PREFIXES = ("/v1/", "/stats", "/tokenize", "/detokenize", "/elastic/")


def resolve_api_key(configured: str | None) -> str | None:
    """The key from the app's arguments, else from the environment; None (or empty): no key."""
    key = configured if configured else os.environ.get(API_KEY_ENV)
    return key or None


class APIKeyMiddleware:
    """401 (OpenAI's body, `code: invalid_api_key`) for protected paths without the right key."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                missing = not given
                response = error_response(
                    401, "missing API key: send the header 'Authorization: Bearer <key>'" if missing
                    else "incorrect API key provided", code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
