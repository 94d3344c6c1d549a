"""The asyncio face of the engine, for serving.

One background thread calls `LLMEngine.step()` in a loop (model steps block, so they must not run
on the event loop). The event loop never takes the engine's lock (held while a step's outputs are
built, milliseconds at a large batch): new requests, aborts and calls go into an inbox under a lock
held only for a list append, and the loop thread applies them between two steps, so an HTTP
handler never waits for the engine or the GPU. A request the engine refuses gets its error as its
first item. Each step's outputs go back to each event loop in one `call_soon_threadsafe`, and a
stream whose reader has fallen behind reads the outputs waiting for it as one (see `merge_outputs`),
so a busy server sends fewer, larger chunks instead of falling further behind.

The engine is an `LLMEngine` or anything with its serving face (`config`, `tokenizer`, a settable
`lock`, `add_request`, `abort_request`, `step`, `has_work`, `has_unfinished_requests`,
`last_step_end`, `stats`, `check_integrity`, `compile_structured`, `shutdown`): an elastic pair is
served through `vattn_ray/elastic/serving.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator

from vattn_ray.config import EngineArgs
from vattn_ray.engine import LLMEngine
from vattn_ray.outputs import RequestOutput
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams
from vattn_ray.watchdog import StepWatchdog

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The step loop stopped (a worker died or raised); the engine cannot serve any more."""


class AsyncLLMEngine:
    """Add a request, iterate its outputs as tokens arrive, abort it."""

    def __init__(self, engine: LLMEngine) -> None:
        """`engine`: an `LLMEngine`, or an object with its serving face (see the module docstring)."""
        self.engine = engine
        if engine.config.device == "cuda" and isinstance(engine, LLMEngine):
            engine.warm_up()  # before the loop starts: nothing else steps the engine yet
        self._lock = threading.RLock()  # the engine takes it too (e.g. drain inside a call)
        engine.lock = self._lock
        self._wake = threading.Event()
        # The inbox: filled by event loops, emptied by the loop thread between steps. Its lock is
        # only ever held for a few list operations, so taking it never stalls an event loop.
        self._inbox = threading.Lock()
        self._adds: list[tuple[str, str | list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._calls: list[tuple] = []  # (fn, loop, future): run by the loop between two steps
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._stopping = False
        self._exit_lock = threading.Lock()
        self._loop_done = False
        self._release_on_exit = False  # shutdown timed out: the loop releases the workers as it ends
        self._thread = threading.Thread(target=self._run, name="vattn-engine-loop", daemon=True)
        self._thread.start()
        # A step that never finishes must not leave requests hanging behind a green health check.
        self._watchdog = StepWatchdog(engine.config.step_timeout_s)
        self._watchdog.watch(self._healthy)

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
        """Stream outputs; raises ValueError (or `QueueFull`) before the first one if the request is
        not admissible.

        Outputs that pile up while the caller is busy come as one (`merge_outputs`): with
        `DELTA` outputs nothing is lost, only fewer, larger pieces. Leaving the iteration early
        (client gone, task cancelled) aborts the request.
        """
        self.check_health()
        queue: asyncio.Queue = asyncio.Queue()
        with self._inbox:
            # Under the inbox lock: the loop may have died since, and it hands its error only to
            # the streams registered before it took this lock; a later one would wait forever.
            self._raise_if_dead()
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._adds.append((request_id, prompt, params))
        self._wake.set()
        finished = False
        held = None  # an item taken while merging that is not an output: next in line
        try:
            while not finished:
                if held is not None:
                    item, held = held, None
                else:
                    item = await queue.get()
                while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
                    nxt = queue.get_nowait()
                    if not isinstance(nxt, RequestOutput):
                        held = nxt
                        break
                    item = merge_outputs(item, nxt, params.output_kind)
                if isinstance(item, BaseException):
                    finished = True  # refused, or the engine failed: nothing more comes
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort at any time; the request's slot is freed between steps."""
        with self._inbox:
            self._aborts.append(request_id)
            self._streams.pop(request_id, None)
        self._wake.set()

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    async def check_integrity(self) -> None:
        """`LLMEngine.check_integrity` between two steps (AssertionError if the books disagree)."""
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._inbox:
            self._calls.append((self.engine.check_integrity, loop, future))
        self._wake.set()
        await future

    def compile_structured(self, spec) -> None:
        """Compile a structured-output constraint now (thread-safe, cached), so that admitting its
        request does not compile it under the engine lock; ValueError if it is invalid."""
        self.engine.compile_structured(spec)

    def check_health(self) -> None:
        if self._error is None:
            stall = self._watchdog.stalled(self.engine.has_unfinished_requests(), self.engine.last_step_end)
            if stall is not None:
                logger.error("%s; failing %d in-flight requests", stall, len(self._streams))
                self._fail(TimeoutError(stall))
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine loop stopped: {self._error!r}") from self._error
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    def _healthy(self) -> bool:
        try:
            self.check_health()
            return True
        except EngineDeadError:
            return False

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop (in-flight requests end with `EngineDeadError`), then release the workers.

        A step still running after `timeout_s` keeps its workers (freeing KV memory under a step
        would crash the process): the loop releases them when that step ends."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._watchdog.stop()
        self._thread.join(timeout=timeout_s)
        self._fail(EngineDeadError("the engine was shut down"))
        with self._exit_lock:
            self._release_on_exit = not self._loop_done
        if self._release_on_exit:
            logger.error("a step is still running %.0f s after shutdown; its workers are released when "
                         "it ends", timeout_s)
            return
        self.engine.shutdown()

    def _fail(self, exc: BaseException) -> None:
        """Mark the engine dead and end every stream in flight with the reason."""
        if self._error is None:
            self._error = exc
        with self._inbox:
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = self._calls, []
            self._adds.clear()
        err = EngineDeadError(f"engine failed: {exc}")
        for loop, queue in streams:
            loop.call_soon_threadsafe(queue.put_nowait, err)
        for _, loop, future in calls:
            loop.call_soon_threadsafe(future.set_exception, err)

    # ---- the loop -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping and self._error is None:
                with self._lock:
                    self._take_inbox()
                    idle = not self.engine.has_work()
                    if idle:
                        with self._inbox:
                            if not (self._adds or self._aborts or self._calls):
                                self._wake.clear()  # under the inbox lock: a new item sets it again
                if idle:
                    self._wake.wait(timeout=1.0)
                    continue
                outputs = self.engine.step()
                deliveries: dict[asyncio.AbstractEventLoop, list] = {}
                with self._inbox:
                    for o in outputs:
                        target = self._streams.get(o.request_id)
                        if o.finished:
                            self._streams.pop(o.request_id, None)
                        if target is not None:
                            deliveries.setdefault(target[0], []).append((target[1], o))
                # One wake-up per event loop per step, not one per request.
                for loop, items in deliveries.items():
                    loop.call_soon_threadsafe(_deliver, items)
        except BaseException as exc:  # noqa: BLE001 - every in-flight caller must hear of it
            logger.exception("engine loop failed; failing %d in-flight requests", len(self._streams))
            self._fail(exc)
        finally:
            with self._exit_lock:
                self._loop_done = True
                release = self._release_on_exit
            if release:
                self.engine.shutdown()

    def _take_inbox(self) -> None:
        """Apply what the event loops sent since the last step (on the loop thread, under the engine
        lock): admissions first, so an abort sent right after its request finds it."""
        with self._inbox:
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
            calls, self._calls = self._calls, []
        for request_id, prompt, params in adds:
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as exc:  # noqa: BLE001 - a refused request: its caller hears why
                with self._inbox:
                    target = self._streams.pop(request_id, None)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, exc)
        for request_id in aborts:
            self.engine.abort_request(request_id)
        for fn, loop, future in calls:
            _run_call(fn, loop, future)


def merge_outputs(first: RequestOutput, then: RequestOutput, kind: RequestOutputKind) -> RequestOutput:
    """`first` followed by `then` (two outputs of one request) as one output: what a reader that
    was not there for `first` needs. The new pieces (`delta_*`, and with `DELTA` outputs the text,
    token ids and log-probs too) are joined; everything else is `then`'s."""
    outs = []
    for a, b in zip(first.outputs, then.outputs):
        merged = dataclasses.replace(b, delta_text=a.delta_text + b.delta_text,
                                     delta_token_ids=a.delta_token_ids + b.delta_token_ids)
        if kind is RequestOutputKind.DELTA:
            merged.text = a.text + b.text
            merged.token_ids = a.token_ids + b.token_ids
            if a.logprobs is not None and b.logprobs is not None:
                merged.logprobs = a.logprobs + b.logprobs
        outs.append(merged)
    return dataclasses.replace(then, outputs=outs)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _run_call(fn, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    """Run `fn()` on the loop thread; its result or error goes to `future` on its event loop."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - the caller receives it
        loop.call_soon_threadsafe(future.set_exception, exc)
    else:
        loop.call_soon_threadsafe(future.set_result, result)
