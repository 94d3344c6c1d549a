"""The HTTP front for prefix-aware routing (`request_router: prefix_aware`).

Serve's HTTP proxy picks a replica before it has read the request body, so a router behind it
sees no prompt. This thin deployment reads the body first, then hands the whole request to an
`LLMServer` replica through a deployment handle, where `deploy.routing.PrefixAwareRouter` reads
the prompt. The replica runs the request through its own OpenAI app (`replay`) and streams back
the ASGI messages, which this front sends to the client unchanged: status, headers, and every
server-sent event as it comes. It holds no engine and no model; it costs one more hop per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from deploy.errors import APIError
from deploy.limits import read_body

_running: set[asyncio.Task] = set()


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress hands it to a replica (the router reads `body`)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None


async def replay(app: Any, req: ForwardedRequest) -> AsyncIterator[dict]:
    """Run `req` through the ASGI `app`; yield the ASGI messages it sends (the response)."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
             "root_path": "", "query_string": req.query_string, "headers": list(req.headers),
             "client": req.client, "server": None}
    messages: asyncio.Queue = asyncio.Queue()
    left = asyncio.Event()  # set when the client is gone: the app sees a disconnect
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.get_running_loop().create_task(app(scope, receive, send))
    _running.add(task)  # the loop holds tasks weakly; the app may still clean up after its last byte
    task.add_done_callback(_running.discard)
    task.add_done_callback(lambda _: messages.put_nowait(None))
    finished = False
    try:
        while (message := await messages.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
                break
        if task.done() and task.exception() is not None:
            raise task.exception()
    finally:
        left.set()  # the client is gone (or the response is complete): a streaming route aborts
        if not finished and not task.done():
            task.cancel()


class _Replay(Response):
    """A response that sends ASGI messages received from a replica, as they arrive."""

    def __init__(self, messages: AsyncIterator[dict]) -> None:
        self.messages = messages
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        async for message in self.messages:
            await send(message)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
class Ingress:
    """Reads each HTTP request and forwards it to an `LLMServer` replica chosen by its router."""

    def __init__(self, llm: Any, max_request_bytes: int) -> None:
        self.llm = llm.options(method_name="forward", stream=True)
        self.max_request_bytes = max_request_bytes

    async def __call__(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.max_request_bytes)
        except APIError as exc:
            return exc.response()
        scope = request.scope
        forwarded = ForwardedRequest(method=request.method, path=scope["path"],
                                     query_string=scope.get("query_string", b""),
                                     headers=list(scope.get("headers", [])), body=body,
                                     client=tuple(scope["client"]) if scope.get("client") else None)
        return _Replay(self.llm.remote(forwarded))
