"""An elastic pair behind the serving engine: `PairEngine` gives `ElasticPair` the face of an
`LLMEngine` that `AsyncLLMEngine` steps on its loop thread, and `AsyncElasticEngine` adds
transitions an operator asks for (`POST /elastic/merge`, `/elastic/split` in `deploy/elastic.py`).

Outputs: the pair reports each request's whole generation, across transitions; this module turns
it into `RequestOutput`s of the kind the request asked for (delta, cumulative, final only), with
text decoded over the whole generation, stop strings looked for in it (also across a transition,
which each engine alone would miss), log-probabilities and times.

Threads: the loop thread owns the pair; it admits and aborts requests between steps (they wait in
`AsyncLLMEngine`'s inbox meanwhile, so a request sent during a transition is admitted, or refused,
when the transition is over). A transition (a second or more on GPUs: drain, remap, recompute)
runs *without* the shared lock, so `stats()` from the event loop never waits for it: it answers
from the snapshot taken before the transition began.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

from vattn_ray.async_engine import AsyncLLMEngine, EngineDeadError
from vattn_ray.detokenizer import IncrementalDetokenizer, find_stop, stream_backend
from vattn_ray.elastic.pair import NO_STRUCTURED_OUTPUT, ElasticPair, PairRequest
from vattn_ray.elastic.policy import Decision
from vattn_ray.outputs import CompletionOutput, RequestOutput
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams


class TransitionConflict(RuntimeError):
    """A merge asked of a merged pair, or a split of a split one."""


# Counters an engine keeps from its start; a head retired at a split hands its counts on here.
_CUMULATIVE = ("num_steps", "num_kv_failures", "groups_mapped_total", "groups_unmapped_total",
               "prefix_cache_queries", "prefix_cache_hits")
EVENTS_IN_STATS = 20  # the latest transitions listed by stats()


@dataclass
class _Stream:
    """What a caller has been sent of one request."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output: CompletionOutput  # cumulative
    detok: IncrementalDetokenizer
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    taken: int = 0  # tokens of the pair's request taken in
    emitted_text: int = 0
    emitted_tokens: int = 0


class PairEngine:
    """`ElasticPair` with the serving face of `LLMEngine` (see `vattn_ray/async_engine.py`)."""

    def __init__(self, pair: ElasticPair) -> None:
        self.pair = pair
        self.config = pair.config
        self.tokenizer = pair.replicas[0].tokenizer
        self.detok_backend = stream_backend(self.tokenizer)
        self._streams: dict[str, _Stream] = {}
        self._forced: deque[tuple[str, Future]] = deque()  # transitions an operator asked for
        self._transitioning = False
        self._snapshot: dict = {}
        self._retired: dict[str, int] = dict.fromkeys(_CUMULATIVE, 0)
        self.last_step_end = time.monotonic()

    @property
    def lock(self) -> contextlib.AbstractContextManager:
        return self.pair.lock

    @lock.setter
    def lock(self, lock: contextlib.AbstractContextManager) -> None:
        self.pair.lock = lock

    # ---- requests (loop thread, between steps, under the lock) ------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Admit a request or raise ValueError (`QueueFull` when too many wait) saying what to change."""
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.pair.check_request(prompt, params)
        self.pair.add_request(request_id, ids, params)
        logprobs = [] if params.logprobs is not None else None
        self._streams[request_id] = _Stream(prompt if isinstance(prompt, str) else None, ids, params,
                                            CompletionOutput(index=0, logprobs=logprobs),
                                            IncrementalDetokenizer(self.tokenizer, backend=self.detok_backend))

    def abort_request(self, request_id: str) -> None:
        """Stop a request now (the loop calls this between steps, never during a transition)."""
        if self._streams.pop(request_id, None) is not None:
            self.pair.abort_request(request_id)

    def compile_structured(self, spec) -> None:
        raise ValueError(NO_STRUCTURED_OUTPUT)

    def request_transition(self, action: str) -> Future:
        """Merge or split before the next step; the future holds the transition's event."""
        if action not in ("merge", "split"):
            raise ValueError(f"a transition is 'merge' or 'split', not {action!r}")
        future: Future = Future()
        self._forced.append((action, future))
        return future

    def has_unfinished_requests(self) -> bool:
        return bool(self._streams)

    def has_work(self) -> bool:
        # Merged and idle, the policy must still be asked now and then, or the pair never splits.
        return bool(self._forced) or self.pair.has_work() or (
            self.pair.merged and self.pair.check_due())

    # ---- the step (loop thread) ------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Transition if the policy (or an operator) says so, then step the pair once."""
        self._transition_if_due()
        touched = self.pair.step_engines()
        with self.lock:
            outputs = [o for o in map(self._output, touched) if o is not None]
        self.last_step_end = time.monotonic()
        return outputs

    def _transition_if_due(self) -> None:
        """Make the transition due, if any (requests sent meanwhile wait in the async engine's inbox)."""
        forced = None
        with self.lock:
            if self._forced:
                forced = self._forced.popleft()
        if forced is not None:
            action, future = forced
            if (action == "merge") == self.pair.merged:
                state = "merged" if self.pair.merged else "split"
                future.set_exception(TransitionConflict(f"the pair is {state} already"))
                return
            decision = Decision(action, "requested by an operator")
        else:
            decision = self.pair.decide()
            if decision is None:
                return
        with self.lock:
            self._snapshot = self._stats()
            self._transitioning = True
        try:
            if decision.action == "split":
                head = self.pair.head.stats()
                for key in _CUMULATIVE:
                    self._retired[key] += int(head.get(key, 0))
            event = self.pair.transition(decision)
        except BaseException as exc:  # the loop fails every stream with it: the pair is unusable
            if forced is not None:
                forced[1].set_exception(exc)
            raise
        finally:
            with self.lock:
                self._transitioning = False
        if forced is not None:
            forced[1].set_result(event)
        self.last_step_end = time.monotonic()

    def _output(self, req: PairRequest) -> RequestOutput | None:
        """What is new for the caller of `req` (None: nothing to send)."""
        st = self._streams.get(req.request_id)
        if st is None:
            return None  # aborted meanwhile
        o, params = st.output, st.params
        new = req.token_ids[st.taken:]
        st.taken = len(req.token_ids)
        if new and st.first_token is None:
            st.first_token = req.first_token_time
        if o.logprobs is not None and req.logprobs is not None:
            for tok, entry in zip(new, req.logprobs[len(o.token_ids):]):
                o.logprobs.append(entry)
                o.cumulative_logprob = (o.cumulative_logprob or 0.0) + entry.get(tok, 0.0)
        o.token_ids.extend(new)
        final_only = params.output_kind is RequestOutputKind.FINAL_ONLY
        before = len(o.text)
        if params.stop or not final_only:
            o.text += st.detok.add(new)
        else:
            st.detok.token_ids.extend(new)  # decoded once, at the end (as LLMEngine does)
        if req.finished:
            o.text += st.detok.flush()
        stop = find_stop(o.text, before, params.stop) if params.stop else None
        if stop is not None:
            o.text, o.finish_reason, o.stop_reason = o.text[:stop[0]], "stop", stop[1]
            if not req.finished:  # the stop string spans a transition: no engine saw it whole
                self.pair.abort_request(req.request_id)
        elif req.finished:
            o.finish_reason = req.finish_reason
            if req.finish_reason == "stop" and o.token_ids and o.token_ids[-1] in params.stop_token_ids:
                o.stop_reason = o.token_ids[-1]
        if o.finished:
            self._streams.pop(req.request_id, None)
        elif not new or final_only:
            return None
        return self._make_output(req.request_id, st)

    @staticmethod
    def _make_output(request_id: str, st: _Stream) -> RequestOutput:
        o, params = st.output, st.params
        # Hold back a tail that could still become a stop string: streamed text is never taken back.
        hold = 0 if o.finished or not params.stop else max(len(s) for s in params.stop) - 1
        visible = max(st.emitted_text, len(o.text) - hold)
        start_tok, start_text = st.emitted_tokens, st.emitted_text
        o.delta_text, o.delta_token_ids = o.text[start_text:visible], o.token_ids[start_tok:]
        st.emitted_text, st.emitted_tokens = visible, len(o.token_ids)
        if params.output_kind is RequestOutputKind.DELTA:
            out = CompletionOutput(0, o.delta_text, list(o.delta_token_ids), o.cumulative_logprob,
                                   None if o.logprobs is None else o.logprobs[start_tok:], o.finish_reason,
                                   o.stop_reason, o.delta_text, list(o.delta_token_ids))
        else:
            out = CompletionOutput(0, o.text[:visible], list(o.token_ids), o.cumulative_logprob,
                                   None if o.logprobs is None else list(o.logprobs), o.finish_reason,
                                   o.stop_reason, o.delta_text, list(o.delta_token_ids))
        metrics = {"arrival_time": st.arrival, "first_token_time": st.first_token}
        return RequestOutput(request_id, st.prompt, st.prompt_token_ids, [out], o.finished, metrics)

    # ---- operations ------------------------------------------------------------------------
    def stats(self) -> dict:
        """The engines' statistics summed over the live engines (both replicas, or the head), plus
        `elastic`: the pair's state, KV capacity, transition counts and times, and its latest events."""
        if self._transitioning:
            return {**self._snapshot, "elastic": {**self._snapshot.get("elastic", {}), "transitioning": True}}
        return self._stats()

    def _stats(self) -> dict:
        engines = self.pair.engines()
        per = [e.stats() for e in engines]
        out = {k: sum(s[k] for s in per) for k, v in per[0].items() if isinstance(v, int)}
        mapped = out.get("num_groups_mapped", 0)
        out["kv_fragmentation"] = (sum(s["kv_fragmentation"] * s["num_groups_mapped"] for s in per) / mapped
                                   if mapped else 0.0)
        for key in _CUMULATIVE:
            out[key] = out.get(key, 0) + self._retired[key]
        out["num_preemptions"] = self.pair.preemptions()
        out["num_waiting"] += self.pair.num_resumed
        capacity = sum(int(e.scheduler.stats.capacity_groups * e.layout.tokens_per_group) for e in engines)
        out["elastic"] = {**self.pair.metrics(), "state": "merged" if self.pair.merged else "split",
                          "kv_capacity_tokens": capacity, "transitioning": False,
                          "policy": asdict(self.pair.elastic), "events": self.pair.events[-EVENTS_IN_STATS:]}
        return out

    def check_integrity(self) -> list[dict]:
        """Every scheduler against its shards, page ownership and resident weights (`ElasticPair`)."""
        return self.pair.check_integrity()

    def fail_transitions(self, exc: BaseException) -> None:
        """The loop stopped: nobody will run the transitions asked for."""
        while self._forced:
            _, future = self._forced.popleft()
            if not future.done():
                future.set_exception(exc)

    def shutdown(self) -> None:
        self.pair.shutdown()


class AsyncElasticEngine(AsyncLLMEngine):
    """`AsyncLLMEngine` over a `PairEngine`, with transitions on request."""

    engine: PairEngine

    async def transition(self, action: str) -> dict:
        """Merge or split between two steps (in flight requests are recomputed, none is lost);
        the event recorded. `TransitionConflict` if the pair is in that state already."""
        self.check_health()
        with self._lock:
            self._raise_if_dead()
            future = self.engine.request_transition(action)
        self._wake.set()
        return await asyncio.wrap_future(future)

    def _fail(self, exc: BaseException) -> None:
        super()._fail(exc)
        self.engine.fail_transitions(EngineDeadError(f"engine failed: {exc}"))
