"""The engine: tokenizer + head scheduler + executor, stepped in a loop.

`LLMEngine.step()` is the one step loop of the project (the offline `LLM`, the async engine and the
benchmarks all call it): schedule a plan and hand it to the workers, then take in the oldest step
whose output is back (scheduler update, detokenise, stop strings, `RequestOutput`s). When the
executor overlaps steps (TP=1) and `async_scheduling` is on, one plan is scheduled *ahead*: step
t+1 is planned and launched while step t still runs on the device, so the head's work (planning,
metadata, detokenising, outputs) hides behind the GPU's. A request with `n > 1` is run as n child
sequences (seed + i when seeded) and reported as one output with n completions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vattn_ray.config import EngineArgs, EngineConfig, read_hf_config
from vattn_ray.detokenizer import IncrementalDetokenizer, find_stop, stream_backend
from vattn_ray.executor import make_executor
from vattn_ray.outputs import CompletionOutput, RequestOutput
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams
from vattn_ray.scheduler.plan import StepOutput, StepPlan
from vattn_ray.startup import check_kv_fits
from vattn_ray.structured import StructuredOutputs

logger = logging.getLogger(__name__)
GIB = 1 << 30


@dataclass
class _Sequence:
    """Head-side state of one generated sequence (one child of a request)."""

    parent: "_Request"
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    output: CompletionOutput
    emitted_text: int = 0  # characters of output.text already streamed
    emitted_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[_Sequence] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, asked a few times per request per step
            return seqs[0].output.finished
        return all(s.output.finished for s in seqs)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One processed step, for benchmarks and metrics (`LLMEngine.step_observers`)."""

    step: int
    num_seqs: int
    num_tokens: int  # new tokens computed in the step
    num_decode: int  # rows computing exactly one token
    context_tokens: int  # tokens attended by all rows after the step
    executed: bool
    done_at: float  # time.perf_counter() when its output reached the head

    @property
    def decode_only(self) -> bool:
        return self.num_seqs > 0 and self.num_decode == self.num_seqs


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLMEngine:
    """Synchronous engine; the async engine and the offline `LLM` both wrap it."""

    def __init__(self, config: EngineConfig, placement_group=None, executor=None) -> None:
        """`executor`: drive these workers instead of starting a group from `config` (an elastic
        pair's pipeline, `vattn_ray/elastic/`)."""
        self.config = config
        self.tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
        self.detok_backend = stream_backend(self.tokenizer)  # None: decode through the tokenizer
        self.executor = executor or make_executor(config, placement_group=placement_group)
        try:
            infos = self.executor.start()
            self.layout = _agreed_layout(infos)
            check_kv_fits(config.scheduler.max_model_len, self.layout, min(i.capacity_groups for i in infos))
        except BaseException:
            self.executor.shutdown()  # actors and the placement group must not outlive a failed start
            raise
        from vattn_ray.scheduler import Scheduler

        self.eos_token_ids = _eos_ids(self.tokenizer, config.model.model)
        self.vocab_size = int(read_hf_config(config.model.model)["vocab_size"])
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.scheduler = Scheduler(config.scheduler, self.layout, [i.capacity_groups for i in infos],
                                   annotate_chunks=self.structured.annotate)
        self.requests: dict[str, _Request] = {}
        self.seq_of: dict[str, _Sequence] = {}  # scheduler request id -> sequence
        self.num_steps = 0
        self.last_step_end = time.monotonic()  # when a step last finished (the serving watchdog reads it)
        # Called with a `StepRecord` after every processed step (timing hooks for benchmarks).
        self.step_observers: list[Callable[[StepRecord], None]] = []
        # Plans handed to the workers whose outputs are not taken in yet, oldest first (touched by
        # the stepping thread only).
        self._in_flight: deque = deque()
        self._depth = 2 if config.scheduler.async_scheduling and self.executor.overlaps_steps else 1
        # Held while the engine's books change; `AsyncLLMEngine` replaces it with a real lock so
        # callers can add and abort requests while a step runs on the device.
        self.lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        info = infos[0]
        logger.info("engine ready: %s on %s x%d, weights %.2f GiB/rank, KV pool %.2f GiB/rank "
                    "(%d page groups, %.1f tokens each), %d slots, max_model_len %d",
                    info.architecture, info.device_name, len(infos), info.weight_bytes / GIB,
                    info.kv_pool_bytes / GIB, min(i.capacity_groups for i in infos),
                    self.layout.tokens_per_group, self.layout.max_slots, config.scheduler.max_model_len)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, placement_group=None) -> "LLMEngine":
        return cls(args.resolve(), placement_group=placement_group)

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids); clear errors for empty or malformed prompts."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; send at least one token of text")
            return prompt, list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty; send at least one token id")
        vocab = self.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t!r} is not an integer in [0, {vocab})")
        return None, ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Admit a request (all n sequences) or raise ValueError saying what to change."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        params.check_vocab(self.vocab_size)
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # a bad schema is refused here
        req = _Request(request_id, text, ids, kind=params.output_kind)
        added: list[str] = []
        try:
            for i in range(params.n):
                child = params if params.n == 1 else dataclasses.replace(
                    params, n=1, seed=None if params.seed is None else params.seed + i)
                seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
                seq = _Sequence(req, i, child, IncrementalDetokenizer(self.tokenizer, backend=self.detok_backend),
                                CompletionOutput(index=i, logprobs=[] if child.logprobs is not None else None))
                self.scheduler.add_request(seq_id, ids, child, self.eos_token_ids)
                added.append(seq_id)
                if child.structured_outputs is not None:
                    self.structured.add(seq_id, child.structured_outputs)
                req.seqs.append(seq)
                self.seq_of[seq_id] = seq
        except ValueError:
            for seq_id in added:
                self.scheduler.abort(seq_id)
                self.seq_of.pop(seq_id, None)
                self.structured.remove(seq_id)
            raise
        self.requests[request_id] = req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its slot keeps its pages for the next request (deferred reclamation)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq_id, seq in self._seq_ids(req):
            if not seq.output.finished:
                self.scheduler.abort(seq_id)
                seq.output.finish_reason = "abort"
                seq.output.text += seq.detok.flush()  # text decoded at the end only (final-only)
            self.seq_of.pop(seq_id, None)
            self.structured.remove(seq_id)
        return self._make_output(req)

    def compile_structured(self, spec) -> None:
        """Compile a structured-output constraint (cached); ValueError if it is invalid."""
        self.structured.compile(spec)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Whether `step()` would do anything (requests, announcements, or steps in flight)."""
        return bool(self._in_flight) or self.scheduler.has_work()

    def needs_sync(self) -> bool:
        """Whether the next step must be planned only after this one is processed: a live request
        has structured output, whose next token mask depends on the token being sampled now."""
        return self.structured.needs_sync()

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch the next step, then take in the oldest finished one; returns the outputs of
        requests that produced text or finished (none while the first step of a pipeline runs)."""
        plan = None
        with self.lock:
            self.executor.check_alive()  # after a worker failure, say so rather than plan again
            # A structured-output request's next token mask needs the token being sampled now:
            # while one is live, no step is planned ahead of the one in flight.
            depth = 1 if self.needs_sync() else self._depth
            if len(self._in_flight) < depth and self.scheduler.can_schedule():
                plan = self.scheduler.schedule()
                if not (plan.seqs or plan.kv_now or plan.kv_prefetch or plan.finished):
                    plan = None
        # Launching may block (a TP group runs the step before it answers): never under the lock.
        if plan is not None:
            self._in_flight.append((plan, self.executor.submit(plan)))
            if plan.seqs and len(self._in_flight) < depth:
                return []  # the next call plans ahead of this step before waiting for it
        if not self._in_flight:
            return []
        plan, handle = self._in_flight.popleft()
        out = handle.result()  # waits for the device without holding the lock
        with self.lock:
            return self.process(plan, out)

    def drain(self) -> list[RequestOutput]:
        """Take in every step in flight (before integrity checks or shutdown)."""
        outputs = []
        while self._in_flight:
            plan, handle = self._in_flight.popleft()
            out = handle.result()
            with self.lock:
                outputs += self.process(plan, out)
        return outputs

    def process(self, plan: StepPlan, out: StepOutput) -> list[RequestOutput]:
        """Take a step's output into the scheduler; build the outputs it produced."""
        self.num_steps += 1
        if self.step_observers:
            self._observe(plan, out)
        touched: dict[str, _Request] = {}
        now = self.last_step_end = time.monotonic()
        for upd in self.scheduler.update(plan, out):
            seq = self.seq_of.get(upd.req_id)
            if seq is None:
                continue  # aborted while its step was in flight
            req = seq.parent
            seq.num_cached_tokens = upd.num_cached_tokens
            if upd.new_token_ids and req.first_token is None:
                req.first_token = now
            ended = self.structured.accept(upd.req_id, upd.new_token_ids)
            if ended is not None and not upd.finished:  # the grammar is complete: end like a stop token
                self.scheduler.finish(upd.req_id, ended)
                upd.finished, upd.finish_reason = True, ended
            self._append(seq, upd)
            if seq.output.finished:
                self.seq_of.pop(upd.req_id, None)
                self.structured.remove(upd.req_id)
            touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            if req.finished or req.kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(self._make_output(req))
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    def _observe(self, plan: StepPlan, out: StepOutput) -> None:
        rec = StepRecord(plan.step, len(plan.seqs), plan.num_tokens,
                         sum(1 for s in plan.seqs if len(s.token_ids) == 1),
                         sum(s.end for s in plan.seqs), out.executed, time.perf_counter())
        for fn in self.step_observers:
            fn(rec)

    def _append(self, seq: _Sequence, upd) -> None:
        o = seq.output
        o.token_ids.extend(upd.new_token_ids)
        if o.logprobs is not None:
            for tok in upd.new_tokens:
                entry = dict(tok.top_logprobs or ())
                if tok.logprob is not None:
                    entry[tok.token_id] = tok.logprob
                    o.cumulative_logprob = (o.cumulative_logprob or 0.0) + tok.logprob
                o.logprobs.append(entry)
        before = len(o.text)
        if seq.params.stop or seq.parent.kind is not RequestOutputKind.FINAL_ONLY:
            o.text += seq.detok.add(list(upd.new_token_ids))
        else:
            # Nobody reads the text before the end and no stop string looks at it: decode once,
            # at the end (the same text; per-step decoding of a whole batch costs milliseconds).
            seq.detok.token_ids.extend(upd.new_token_ids)
        if upd.finished:
            o.text += seq.detok.flush()
        stop = find_stop(o.text, before, seq.params.stop) if seq.params.stop else None
        if stop is not None:
            o.text = o.text[:stop[0]]
            o.finish_reason, o.stop_reason = "stop", stop[1]
            if not upd.finished:
                self.scheduler.finish(upd.req_id, "stop")
        elif upd.finished:
            o.finish_reason = upd.finish_reason
            o.stop_reason = getattr(upd, "stop_reason", None)

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = []
        delta = req.kind is RequestOutputKind.DELTA
        for seq in req.seqs:
            o = seq.output
            # Hold back a tail that could still become a stop string, so streamed text never
            # has to be taken back.
            hold = 0 if o.finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
            visible = max(seq.emitted_text, len(o.text) - hold)
            start_tok, start_text = seq.emitted_tokens, seq.emitted_text
            o.delta_text = o.text[start_text:visible]
            o.delta_token_ids = o.token_ids[start_tok:]
            seq.emitted_text, seq.emitted_tokens = visible, len(o.token_ids)
            # Built field by field: `dataclasses.replace` costs several microseconds per call, and
            # this runs for every running sequence at every step.
            if delta:  # only what is new: O(new) per output instead of O(everything so far)
                token_ids, text = o.delta_token_ids, o.delta_text
                logprobs = None if o.logprobs is None else o.logprobs[start_tok:]
            else:
                token_ids, text = list(o.token_ids), o.text[:visible]
                logprobs = None if o.logprobs is None else list(o.logprobs)
            outs.append(CompletionOutput(index=o.index, text=text, token_ids=token_ids,
                                         cumulative_logprob=o.cumulative_logprob, logprobs=logprobs,
                                         finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                                         delta_text=o.delta_text, delta_token_ids=o.delta_token_ids))
        metrics = {"arrival_time": req.arrival, "first_token_time": req.first_token}
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, metrics,
                             req.seqs[0].num_cached_tokens)

    @staticmethod
    def _seq_ids(req: _Request):
        n = len(req.seqs)
        for seq in req.seqs:
            yield (req.request_id if n == 1 else f"{req.request_id}#{seq.index}"), seq

    # ---- operations -----------------------------------------------------------------------
    def warm_up(self) -> float:
        """Serve a few throwaway requests (prompts of several lengths, greedy and sampled, each
        admitted while the earlier ones decode, so steps mix prefills with decodes as they do when
        serving) so the kernels built on first use (Triton specialises on shapes) are built now and
        not inside the first user's time to first token; returns the seconds taken. Nothing else
        may be running."""
        t0 = time.monotonic()
        s = self.config.scheduler
        longest = max(2, min(2048, s.max_model_len - 8, s.max_num_batched_tokens))
        lengths = sorted({1, 7, 16, min(100, longest), min(512, longest), longest})
        for i, n in enumerate(lengths):
            params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0 if i % 2 else 0.0,
                                    top_p=0.9 if i % 2 else 1.0, seed=i)
            self.add_request(f"warm-up-{i}", [(17 * i + j) % self.vocab_size for j in range(n)], params)
            self.step()
        while self.has_unfinished_requests() or self._in_flight:
            self.step()
        took = time.monotonic() - t0
        logger.info("warm-up: %d requests (prompts %s tokens) in %.1f s", len(lengths), lengths, took)
        return took

    def check_integrity(self) -> None:
        """The scheduler's books and every shard's page tables agree (tests call this)."""
        self.drain()
        self.scheduler.check_integrity()
        self.executor.check_integrity(self.scheduler.slot_group_ids())

    def stats(self) -> dict:
        s = self.scheduler.stats
        out = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(s)
        out["num_steps"] = self.num_steps
        # Internal fragmentation: mapped KV bytes (idle slots' kept pages included) not holding a
        # live token. Computed from the scheduler's books: no round trip to the workers.
        mapped = out["num_groups_mapped"] * self.layout.page_group_bytes
        live = out["live_tokens"] * self.layout.token_bytes * self.layout.num_tensors
        # Shared prefix groups hold the live tokens of several requests at once: never below 0.
        out["kv_fragmentation"] = max(0.0, 1.0 - live / mapped) if mapped else 0.0
        return out

    def shutdown(self) -> None:
        try:
            if self.executor.failure is None:
                self.drain()  # no step may still run on the device when its memory goes
        finally:
            self.executor.shutdown()


def _agreed_layout(infos: list):
    """All shards must hold the same model and KV layout, or lockstep paging cannot work."""
    first = infos[0]
    for info in infos[1:]:
        if info.layout != first.layout or info.architecture != first.architecture:
            raise RuntimeError(f"shards disagree: rank 0 has {first.architecture} {first.layout}, "
                               f"rank {info.rank} has {info.architecture} {info.layout}")
    return first.layout


def _eos_ids(tokenizer, model_dir: str) -> tuple[int, ...]:
    """EOS ids from the tokenizer and from generation_config.json (Llama 3 lists several)."""
    import json
    import os

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return tuple(sorted(ids))
