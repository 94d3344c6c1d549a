"""The OpenAI-compatible HTTP layer over one `AsyncLLMEngine`.

`OpenAIServer` turns requests into engine calls and engine outputs into OpenAI responses;
`create_app` puts it behind FastAPI routes. The engine is injected (the Serve replica builds the
real one; HTTP tests may pass another object with the same methods), so nothing here knows how
the engine is made or placed.

Nothing slow runs on the event loop (it also answers health checks and feeds every other stream):
the body is read with a size bound, then parsing, validation, chat templating and tokenization run
on a small thread pool (`offload`); a prompt too long to ever fit is refused before tokenizing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from deploy.auth import APIKeyMiddleware
from deploy.errors import APIError, error_body, install_error_handlers
from deploy.formatting import TokenText, chat_logprobs, completion_logprobs, sse, usage
from deploy.limits import DEFAULT_MAX_REQUEST_BYTES, check_depth, check_fields, read_body
from deploy.metrics import RequestTimer, ServerMetrics
from deploy.protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                             CompletionChoice, CompletionRequest, CompletionResponse, ModelCard,
                             ModelList, new_id, now)
from deploy.response_format import structured_outputs
from deploy.routes import DetokenizeRequest, TokenizeRequest, add_routes
from vattn_ray.async_engine import EngineDeadError
from vattn_ray.outputs import RequestOutput
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams
from vattn_ray.scheduler.request import QueueFull

T = TypeVar("T", bound=BaseModel)
RETRY_AFTER_S = 1  # what a 429 asks the client to wait

logger = logging.getLogger(__name__)


@dataclass
class _EngineRequest:
    """One engine request in flight (one prompt; its n sequences are choices base .. base+n-1)."""

    request_id: str
    prompt_len: int
    choice_base: int
    stream: AsyncIterator[RequestOutput]
    timer: RequestTimer
    last: RequestOutput | None = None
    num_generated: int = 0  # tokens over all n sequences (outputs are deltas when streaming)

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished


class OpenAIServer:
    """Completions and chat completions over one engine; see `create_app` for the routes."""

    def __init__(self, engine, served_model_name: str | list[str], metrics: ServerMetrics | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.engine = engine
        # Clients may send any of the names; responses and metrics use the first (vLLM's rule).
        self.model_names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.model_name = self.model_names[0]
        self.max_model_len = int(engine.config.scheduler.max_model_len)
        self.max_num_seqs = int(engine.config.scheduler.max_num_seqs)
        # generation_config.json's sampling fields, for requests that leave them out (startup.py)
        self.sampling_defaults = dict(getattr(getattr(engine.config, "model", None), "sampling_defaults", {}))
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(engine.tokenizer)
        self.metrics = metrics or ServerMetrics(self.model_name, self.max_model_len)
        self.num_client_aborts = 0
        self.max_request_bytes = max_request_bytes
        # A token covers at most this many bytes of text, and a character is at least one byte
        # (normalization may shrink text, hence the margin): longer text can never fit.
        self.max_prompt_chars = self.max_model_len * _max_token_bytes(self.tokenizer) * 4
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vattn-http")
        self.replica_id: str | None = None  # set by the Serve replica, reported in /stats

    async def offload(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on the server's thread pool: keeps CPU work off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def parse(self, request: Request, model: type[T]) -> T:
        """The request body as `model`: size-bounded read, JSON parsing and validation off the loop."""
        body = await read_body(request, self.max_request_bytes)
        return await self.offload(_validate, model, body)

    # ---- validation -------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            served = self.model_name if len(self.model_names) == 1 else self.model_names
            raise APIError(f"The model {model!r} does not exist; this server serves {served!r} "
                           "(see GET /v1/models)", status=404, param="model", code="model_not_found")

    def check_prompt_text(self, text: str, param: str) -> None:
        """400 without tokenizing when `text` is too long to ever fit the context window."""
        if len(text) > self.max_prompt_chars:
            raise APIError(f"{param} has {len(text)} characters, far more than this model's maximum context "
                           f"length of {self.max_model_len} tokens can hold; shorten it", param=param,
                           code="context_length_exceeded")

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(f"{param} is empty; send at least one token", param=param)
        return ids

    def completion_prompts(self, prompt) -> list[list[int]]:
        """The prompt(s) of a completion request as token ids (a list of strings is a batch)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError("prompt is empty; send a string, a list of strings or token ids", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise APIError("prompt is an empty string; send at least one character", param="prompt")
                self.check_prompt_text(p, "prompt")
                out.append(list(self.tokenizer.encode(p)))
            else:
                out.append(self._check_ids(list(p), "prompt"))
        return out

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        """The chat template applied to the messages, as token ids."""
        if not req.messages:
            raise APIError("messages is empty; send at least one message", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text":
                        raise APIError(f"messages[{i}].content has a {part.get('type')!r} part; only text "
                                       "parts are supported", param=f"messages.{i}.content")
                    parts.append(str(part.get("text", "")))
                content = "\n".join(parts)
            check_depth(m.model_extra, f"messages.{i}")
            messages.append({"role": m.role, "content": content or ""})
        self.check_prompt_text("".join(m["content"] for m in messages), "messages")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(f"model {self.model_name!r} has no chat template; use /v1/completions",
                           param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt,
                                                      **(req.chat_template_kwargs or {}))
        except Exception as exc:  # jinja raises for e.g. roles the template does not accept
            raise APIError(f"the chat template rejected the messages: {exc}", param="messages") from exc
        # The template writes the special tokens (BOS) itself; don't add them twice.
        return self._check_ids(list(self.tokenizer.encode(text, add_special_tokens=False)), "messages")

    def max_tokens(self, requested: int | None, prompt_len: int, param: str, prompt_param: str) -> int:
        """`requested`, or the rest of the context when None; 400 when it does not fit."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens, and the "
                           f"prompt has {prompt_len}; shorten the prompt",
                           param=prompt_param,
                           code="context_length_exceeded")
        if requested is None:
            return min(room, self.sampling_defaults.get("max_tokens", room))
        if isinstance(requested, int) and requested > room:
            raise APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                           f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                           f"{requested} for the completion). Set {param} to at most {room} or shorten "
                           "the prompt", param=param, code="context_length_exceeded")
        return requested

    def sampling_params(self, req, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if isinstance(req.n, int) and req.n > self.max_num_seqs:
            # The engine runs a request's n sequences side by side; more than its slots never fit.
            raise APIError(f"n={req.n} exceeds this server's max_num_seqs={self.max_num_seqs}; lower n",
                           param="n")
        defaults = self.sampling_defaults

        def pick(name: str, value, fallback):  # the request's value, else the checkpoint's, else ours
            return value if value is not None else defaults.get(name, fallback)

        structured = structured_outputs(req.response_format, req.structured_outputs)
        try:
            params = SamplingParams(
                max_tokens=max_tokens, n=req.n,
                temperature=pick("temperature", req.temperature, 1.0),
                top_p=pick("top_p", req.top_p, 1.0),
                top_k=pick("top_k", req.top_k, -1),
                seed=req.seed, stop=req.stop or (), stop_token_ids=req.stop_token_ids or (),
                ignore_eos=req.ignore_eos, logprobs=logprobs, min_tokens=req.min_tokens,
                repetition_penalty=pick("repetition_penalty", req.repetition_penalty, 1.0),
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                min_p=pick("min_p", req.min_p, 0.0), logit_bias=_logit_bias(req.logit_bias),
                structured_outputs=structured,
                # A stream needs what is new each step; a plain response only the end.
                output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY)
        except ValueError as exc:
            raise APIError.from_value_error(exc) from exc
        self.compile_structured(params)
        return params

    def compile_structured(self, params: SamplingParams) -> None:
        """Compile a structured-output constraint now (on the pool: `prepare_*` run there), so the
        engine finds it compiled at admission; 400 when it cannot be compiled."""
        spec = params.structured_outputs
        compile_fn = getattr(self.engine, "compile_structured", None)
        if spec is None or compile_fn is None:
            return
        try:
            compile_fn(spec)
        except ValueError as exc:
            raise APIError(str(exc), param="response_format") from exc

    # ---- driving the engine -----------------------------------------------------------------
    async def start(self, prompts: list[list[int]], params: list[SamplingParams],
                    request_id: str) -> list[_EngineRequest]:
        """Admit every prompt; all or none (a refused one aborts the others)."""
        reqs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            rid = f"{request_id}-{i}"
            reqs.append(_EngineRequest(rid, len(ids), i * p.n, self.engine.generate(ids, p, rid),
                                       self.metrics.request(len(ids))))
        # The first __anext__ admits the request (ValueError if it can't be) and waits for output.
        firsts = await asyncio.gather(*(r.stream.__anext__() for r in reqs), return_exceptions=True)
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            for r, f in zip(reqs, firsts):
                if not isinstance(f, BaseException):
                    r.last = f
            await self.abort(reqs, client_gone=False)
            if isinstance(errors[0], QueueFull):
                raise APIError(f"this server is at capacity: {errors[0]}", status=429, type="requests",
                               code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
            if isinstance(errors[0], ValueError):
                raise APIError.from_value_error(errors[0])
            if isinstance(errors[0], EngineDeadError):
                raise _unavailable(errors[0]) from errors[0]
            raise errors[0]
        for r, first in zip(reqs, firsts):
            self._observe(r, first)
        return reqs

    def _observe(self, r: _EngineRequest, out: RequestOutput) -> None:
        r.last = out
        r.num_generated += sum(len(o.delta_token_ids) for o in out.outputs)
        r.timer.on_output(out)

    async def outputs(self, reqs: list[_EngineRequest]
                      ) -> AsyncIterator[tuple[_EngineRequest, RequestOutput]]:
        """Every output of every request as it comes; a dead engine is a 503 `APIError`."""
        try:
            async for item in self._outputs(reqs):
                yield item
        except EngineDeadError as exc:
            raise _unavailable(exc) from exc

    async def _outputs(self, reqs: list[_EngineRequest]
                       ) -> AsyncIterator[tuple[_EngineRequest, RequestOutput]]:
        for r in reqs:
            yield r, r.last
        live = [r for r in reqs if not r.finished]
        if len(live) == 1:
            r = live[0]
            async for out in r.stream:
                self._observe(r, out)
                yield r, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(r: _EngineRequest) -> None:
            try:
                async for out in r.stream:
                    queue.put_nowait((r, out))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait((r, exc))
            finally:
                queue.put_nowait((r, None))

        tasks = [asyncio.create_task(pump(r)) for r in live]
        try:
            remaining = len(tasks)
            while remaining:
                r, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    self._observe(r, item)
                    yield r, item
        finally:
            for t in tasks:
                t.cancel()

    async def abort(self, reqs: list[_EngineRequest], client_gone: bool = True) -> None:
        """Abort every unfinished request so its KV slot is freed now, not at max_tokens."""
        pending = [r for r in reqs if not r.finished]
        if client_gone and pending:
            self.num_client_aborts += 1
            self.metrics.client_aborts.record(1)
            logger.info("client went away; aborting %s", [r.request_id for r in pending])
        for r in pending:
            await self.engine.abort(r.request_id)
            try:
                await r.stream.aclose()
            except RuntimeError:  # still running inside a pump task that is being cancelled
                pass

    async def run_to_end(self, reqs: list[_EngineRequest]) -> None:
        try:
            async for _ in self.outputs(reqs):
                pass
        finally:
            await self.abort(reqs)  # only unfinished ones: the client left (or we failed)

    # ---- endpoints ----------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, max_model_len=self.max_model_len) for name in self.model_names])

    def prepare_completion(self, req: CompletionRequest) -> tuple[list[list[int]], list[SamplingParams]]:
        """Validate and tokenize (CPU work: runs on the pool)."""
        self.check_model(req.model)
        check_fields(req.model_extra)
        if req.echo and req.logprobs is not None:
            raise APIError("echo with logprobs needs prompt log-probabilities, which are not supported yet; "
                           "omit one of them", param="echo")
        if req.suffix:
            raise APIError("suffix is not supported; omit it", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("best_of is not supported; omit it (or set it equal to n)", param="best_of")
        prompts = self.completion_prompts(req.prompt)
        params = [self.sampling_params(req, self.max_tokens(req.max_tokens, len(p), "max_tokens", "prompt"),
                                       req.logprobs) for p in prompts]
        return prompts, params

    async def completions(self, req: CompletionRequest):
        prompts, params = await self.offload(self.prepare_completion, req)
        rid = new_id("cmpl")
        reqs = await self.start(prompts, params, rid)
        echo = self._echo_texts(req, prompts)
        if req.stream:
            return _sse_response(self._completion_stream(req, reqs, rid, echo))
        await self.run_to_end(reqs)
        choices = []
        for r, prefix in zip(reqs, echo):
            for o in r.last.outputs:
                lp = None
                if req.logprobs is not None and o.logprobs is not None:
                    lp = completion_logprobs(self.token_text, o.token_ids, o.logprobs, req.logprobs)
                choices.append(CompletionChoice(index=r.choice_base + o.index, text=prefix + o.text, logprobs=lp,
                                                finish_reason=o.finish_reason))
        return CompletionResponse(id=rid, created=now(), model=self.model_name,
                                  choices=sorted(choices, key=lambda c: c.index), usage=self._usage(reqs))

    def _echo_texts(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """Per prompt, the text `echo` puts before the completion ("" without echo)."""
        if not req.echo:
            return [""] * len(prompts)
        if isinstance(req.prompt, str):
            return [req.prompt]
        if isinstance(req.prompt[0], str):
            return list(req.prompt)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]  # token-id prompts

    async def _completion_stream(self, req: CompletionRequest, reqs, rid: str,
                                 echo: list[str]) -> AsyncIterator[str]:
        created, offsets, done, echoed = now(), {}, set(), set()
        try:
            async for r, out in self.outputs(reqs):
                for o in out.outputs:
                    index = r.choice_base + o.index
                    if index in done or not (o.delta_text or o.delta_token_ids or o.finish_reason):
                        continue
                    prefix = "" if index in echoed else echo[reqs.index(r)]
                    echoed.add(index)
                    lp = None
                    if req.logprobs is not None and o.logprobs is not None:
                        lp = completion_logprobs(self.token_text, o.delta_token_ids, _new_logprobs(o),
                                                 req.logprobs, offsets.get(index, 0))
                        if lp.tokens:
                            offsets[index] = lp.text_offset[-1] + len(lp.tokens[-1])
                        lp = lp.model_dump()
                    if o.finish_reason:
                        done.add(index)
                    yield sse({"id": rid, "object": "text_completion", "created": created,
                               "model": self.model_name,
                               "choices": [{"index": index, "text": prefix + o.delta_text, "logprobs": lp,
                                            "finish_reason": o.finish_reason}]})
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": created,
                           "model": self.model_name, "choices": [], "usage": self._usage(reqs).model_dump()})
            yield sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - the status is already sent: report in-band
            yield _stream_error(exc)
        finally:
            await self.abort(reqs)

    def prepare_chat(self, req: ChatCompletionRequest) -> tuple[list[int], SamplingParams, int | None]:
        """Validate, apply the chat template and tokenize (CPU work: runs on the pool)."""
        self.check_model(req.model)
        check_fields(req.model_extra)
        if req.tools:
            raise APIError("tools are not supported; omit them", param="tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        if k is not None and not 0 <= k <= 20:
            raise APIError(f"top_logprobs must be in [0, 20], got {k}", param="top_logprobs")
        ids = self.chat_prompt(req)
        wanted, param = ((req.max_completion_tokens, "max_completion_tokens")
                         if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
        params = self.sampling_params(req, self.max_tokens(wanted, len(ids), param, "messages"), k)
        return ids, params, k

    async def chat(self, req: ChatCompletionRequest):
        ids, params, k = await self.offload(self.prepare_chat, req)
        rid = new_id("chatcmpl")
        reqs = await self.start([ids], [params], rid)
        if req.stream:
            return _sse_response(self._chat_stream(req, reqs, rid, k))
        await self.run_to_end(reqs)
        choices = []
        for o in reqs[0].last.outputs:
            lp = None
            if k is not None and o.logprobs is not None:
                lp = chat_logprobs(self.token_text, o.token_ids, o.logprobs, k)
            choices.append(ChatChoice(index=o.index, message=AssistantMessage(content=o.text), logprobs=lp,
                                      finish_reason=o.finish_reason))
        return ChatCompletionResponse(id=rid, created=now(), model=self.model_name, choices=choices,
                                      usage=self._usage(reqs))

    async def _chat_stream(self, req: ChatCompletionRequest, reqs, rid: str,
                           k: int | None) -> AsyncIterator[str]:
        created, done = now(), set()

        def chunk(choices: list[dict], **extra) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name, "choices": choices, **extra})

        try:
            # OpenAI opens every choice with the assistant role and empty content.
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(req.n)])
            async for _, out in self.outputs(reqs):
                for o in out.outputs:
                    if o.index in done or not (o.delta_text or o.delta_token_ids or o.finish_reason):
                        continue
                    lp = None
                    if k is not None and o.logprobs is not None:
                        lp = chat_logprobs(self.token_text, o.delta_token_ids, _new_logprobs(o), k).model_dump()
                    delta = {"content": o.delta_text} if o.delta_text or not o.finish_reason else {}
                    if o.finish_reason:
                        done.add(o.index)
                    yield chunk([{"index": o.index, "delta": delta, "logprobs": lp,
                                  "finish_reason": o.finish_reason}])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage=self._usage(reqs).model_dump())
            yield sse("[DONE]")
        except Exception as exc:  # noqa: BLE001 - the status is already sent: report in-band
            yield _stream_error(exc)
        finally:
            await self.abort(reqs)

    @staticmethod
    def _usage(reqs: list[_EngineRequest]):
        prompt = sum(r.prompt_len for r in reqs)
        completion = sum(r.num_generated for r in reqs)
        cached = sum(r.last.num_cached_tokens for r in reqs if r.last is not None)
        return usage(prompt, completion, cached)

    # ---- operations ---------------------------------------------------------------------------
    async def stats(self, check_integrity: bool = False) -> dict:
        """Engine statistics plus this server's own counters (a vattn-ray extension); with
        `check_integrity`, the engine's books are checked against every shard's page tables."""
        out = dict(self.engine.stats())
        out["num_client_aborts"] = self.num_client_aborts
        out["pid"], out["replica"] = os.getpid(), self.replica_id
        if check_integrity:
            try:
                await self.engine.check_integrity()
                out["integrity"] = "ok"
            except AssertionError as exc:
                out["integrity"] = f"failed: {exc}"
        return jsonable_encoder(out)

    def record_engine_stats(self) -> None:
        self.metrics.record_engine_stats(self.engine.stats())


def _new_logprobs(o) -> list[dict[int, float]]:
    """The log-probability entries of the tokens new in this output (`logprobs` is cumulative)."""
    end = len(o.token_ids)
    return o.logprobs[end - len(o.delta_token_ids):end]


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    # no-transform / no buffering so proxies pass each token through at once
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _unavailable(exc: BaseException) -> APIError:
    """503 for a dead or stuck engine: the replica is unhealthy and Serve replaces it; a request
    that got no token yet may be sent again."""
    return APIError(str(exc), status=503, type="server_error", code="engine_unavailable")


def _validate(model: type[T], body: bytes) -> T:
    try:
        return model.model_validate_json(body)  # nesting past ~200 levels is a json_invalid error
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings)."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise APIError(f"logit_bias key {key!r} is not a token id; use token ids as keys", param="logit_bias")
        out[int(key)] = value
    return out


def _max_token_bytes(tokenizer) -> int:
    """UTF-8 bytes of the longest vocabulary entry (an upper bound of what one token covers)."""
    try:
        return max(len(t.encode()) for t in tokenizer.get_vocab()) or 1
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: be generous
        return 64


def _stream_error(exc: Exception) -> str:
    if isinstance(exc, EngineDeadError):
        exc = _unavailable(exc)
    if not isinstance(exc, APIError):
        logger.exception("stream failed", exc_info=exc)
        exc = APIError(f"generation failed: {exc}", status=500, type="server_error")
    return sse(error_body(exc)) + sse("[DONE]")


def _body(model: type[BaseModel]) -> dict:
    """OpenAPI request body of a route that parses its body itself (see `OpenAIServer.parse`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _with_request_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Publish the request models in the OpenAPI document (clients and schema fuzzers read it)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def create_app(server: OpenAIServer, api_key: str | None = None) -> FastAPI:
    """FastAPI routes over `server`; every error is an OpenAI error body. With `api_key`, `/v1/*`
    and `/stats` need ``Authorization: Bearer <api_key>`` (401 otherwise)."""
    app = FastAPI(title="vattn-ray", summary="OpenAI-compatible LLM server")
    install_error_handlers(app)
    _with_request_schemas(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest])
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    add_routes(app, server)  # /tokenize, /detokenize, /metrics
    if hasattr(server.engine, "transition"):  # an elastic pair: /elastic/merge, /elastic/split
        from deploy.elastic import add_elastic_routes

        add_elastic_routes(app, server)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            server.engine.check_health()
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
            return JSONResponse({"status": "unhealthy", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        return server.models()

    @app.get("/stats")
    async def stats(check_integrity: bool = False) -> dict:
        return await server.stats(check_integrity)

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(request: Request):
        return await server.completions(await server.parse(request, CompletionRequest))

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest))
    async def chat(request: Request):
        return await server.chat(await server.parse(request, ChatCompletionRequest))

    return app
