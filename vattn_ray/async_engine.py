"""The asyncio face of the engine, for serving.

One background thread runs the step loop (model steps block, so they must not run on the event
loop). Callers add requests under a short lock; the lock is *not* held while a step executes, so
an HTTP handler never waits for the GPU. Aborts are queued and applied between steps. Outputs go
back to each caller's event loop through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from vattn_ray.config import EngineArgs
from vattn_ray.engine import LLMEngine
from vattn_ray.outputs import RequestOutput
from vattn_ray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop stopped (a worker died or raised); the engine cannot serve any more."""


class AsyncLLMEngine:
    """Add a request, iterate its outputs as tokens arrive, abort it."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vattn-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, *, placement_group=None) -> "AsyncLLMEngine":
        return cls(LLMEngine(args.resolve(), placement_group=placement_group))

    @property
    def config(self):
        return self.engine.config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream cumulative outputs; raises ValueError before the first one if not admissible.

        Leaving the iteration early (client gone, task cancelled) aborts the request.
        """
        self.check_health()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            # Again under the lock: the loop may have died since, and it hands its error only to
            # the streams registered before it took the lock; a later one would wait forever.
            self.check_health()
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort at any time; the request's slot is freed between steps."""
        with self._lock:
            self._aborts.append(request_id)
            self._streams.pop(request_id, None)
        self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def compile_structured(self, spec) -> None:
        """Compile a structured-output constraint now (thread-safe, cached), so that admitting its
        request does not compile it under the engine lock; ValueError if it is invalid."""
        self.engine.structured.compile(spec)

    def check_health(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop stopped: {self._error!r}") from self._error
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    for request_id in self._aborts:
                        self.engine.abort_request(request_id)
                    self._aborts.clear()
                    plan = self.engine.schedule()
                    if plan is None:
                        self._wake.clear()
                if plan is None:
                    self._wake.wait(timeout=1.0)
                    continue
                out = self.engine.executor.execute(plan)
                with self._lock:
                    outputs = self.engine.process(plan, out)
                    targets = [(o, self._streams.get(o.request_id)) for o in outputs]
                    for o in outputs:
                        if o.finished:
                            self._streams.pop(o.request_id, None)
                for output, target in targets:
                    if target is not None:
                        target[0].call_soon_threadsafe(target[1].put_nowait, output)
        except BaseException as exc:  # noqa: BLE001 - every in-flight caller must hear of it
            logger.exception("engine loop failed; failing %d in-flight requests", len(self._streams))
            self._error = exc
            err = EngineDeadError(f"engine failed: {exc}")
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for loop, queue in streams:
                loop.call_soon_threadsafe(queue.put_nowait, err)
