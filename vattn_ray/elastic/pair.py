"""`ElasticPair`: two replicas of one model that merge into a two-stage pipeline under a burst.

Split (the normal state), each replica is an ordinary `LLMEngine` with every layer and its own KV
cache; the pair routes each request to the replica with the most room. Merged, replica A keeps
layers [0, L/2) and replica B layers [L/2, L); each lends its other half's weight pages to a KV
cache laid out for its half, and one head (`LLMEngine` over a `PipelineExecutor`) schedules for
both. A transition drains every step in flight and moves the unfinished requests to the new
owner(s) as recomputation: prompt plus the tokens generated so far, with what remains of
`max_tokens`, so nothing is lost and greedy outputs do not change. Requests still waiting for
their first token move at once; those that already have tokens (*resumed*) yield to them: they are
handed to their new engine only while its unstarted work is under one step's token budget, so a
burst's new requests are not queued behind the recomputation of everything that was running. At
split the dropped layers are copied back from the peer (`stage.split`), timed.

Requests here are single-sequence (`n == 1`); outputs are the tokens of the whole generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vattn_ray.config import EngineArgs, EngineConfig
from vattn_ray.elastic import stage as stage_fns
from vattn_ray.elastic.pipeline import PipelineExecutor
from vattn_ray.elastic.policy import Decision, ElasticConfig, ElasticCoordinator, ReplicaLoad
from vattn_ray.engine import LLMEngine
from vattn_ray.scheduler.request import QueueFull
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)
NO_STRUCTURED_OUTPUT = ("structured output (response_format, structured_outputs) is not served by an elastic "
                        "pair; omit it or use a deployment without elastic")


@dataclass
class PairRequest:
    """One request as the pair sees it, wherever it runs."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finished: bool = False
    finish_reason: str | None = None
    engine: LLMEngine | None = None
    sub_id: str = ""
    moves: int = 0
    started: bool = False  # produced a token on its current engine (else it counts as waiting)
    logprobs: list[dict] | None = None  # per generated token, when the params ask for them


class ElasticPair:
    """Two replicas (A, B) that serve apart and merge into a pipeline when KV memory runs out."""

    def __init__(self, args: EngineArgs | EngineConfig, elastic: ElasticConfig | None = None,
                 coordinator=None, ray_workers: bool = False, placement_group=None) -> None:
        """`ray_workers`: every replica's workers are Ray actors (each TP group on its own
        devices), as on a GPU host; otherwise TP=1 replicas live in this process. With Ray
        workers, `placement_group` (default: the caller's, e.g. a Serve replica's) holds replica
        A's ranks in bundles [0, TP) and B's in [TP, 2 TP); without one each group makes its own."""
        config = args.resolve() if isinstance(args, EngineArgs) else args
        # The waiting-queue bound is the pair's (`check_request`), not each engine's: a merge puts
        # both replicas' waiting requests on one head, which must take them all.
        self.max_queued_requests = config.scheduler.max_queued_requests
        self.config = dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler,
                                                                                max_queued_requests=None))
        # Held while the pair's books change (`AsyncLLMEngine` sets a real lock); every engine of the
        # pair takes the same one. Transitions run without it: see `decide` and `transition`.
        self._lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        self.elastic = elastic or ElasticConfig()
        self.coordinator = coordinator or ElasticCoordinator(self.elastic)
        self.replicas: list[LLMEngine] = []
        self.head: LLMEngine | None = None
        self.requests: dict[str, PairRequest] = {}
        self._by_sub: dict[str, PairRequest] = {}
        self.events: list[dict] = []
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="elastic-pair")
        self._next_check = 0.0
        self._retired_preemptions = 0  # preemptions counted by heads of earlier merges
        self._resumed: deque[PairRequest] = deque()  # moved with tokens, not handed to an engine yet
        try:
            self._start_replicas(ray_workers, placement_group)
            self._both(lambda e: e.executor.run_on_workers(stage_fns.enable))
            addrs = self.replicas[0].executor.run_on_workers(stage_fns.pair_address)
            timeout = max(60.0, self.config.step_timeout_s)
            self._both(lambda e, i: e.executor.run_on_workers(stage_fns.join_pair, addrs, i, timeout),
                       indexed=True)
        except BaseException:
            self.shutdown()
            raise
        self.layout = self.replicas[0].layout
        self.replica_groups = min(e.scheduler.stats.capacity_groups for e in self.replicas)
        logger.info("elastic pair ready: 2 replicas x TP=%d, merge at KV usage >= %.0f%%, split below %.0f%%",
                    self.config.parallel.tensor_parallel_size, 100 * self.elastic.merge_kv_usage,
                    100 * self.elastic.split_kv_usage)

    def _start_replicas(self, ray_workers: bool, placement_group) -> None:
        """Two engines; with Ray workers both load at once (each on its own devices)."""
        if not ray_workers:
            self.replicas += [LLMEngine(self.config) for _ in range(2)]
            return
        import ray

        from vattn_ray.ray_executor import RayExecutor, ensure_ray

        ensure_ray()
        pg = placement_group or ray.util.get_current_placement_group()
        tp = self.config.parallel.tensor_parallel_size
        executors = [RayExecutor(self.config, placement_group=pg, bundle_offset=i * tp) for i in range(2)]
        # transformers resolves its names lazily and not thread-safely: two engines loading their
        # tokenizers at once can fail with "cannot import name 'AutoTokenizer'". Resolve it here.
        import transformers

        transformers.AutoTokenizer  # noqa: B018 - the attribute access is what resolves it

        futures = [self._threads.submit(LLMEngine, self.config, executor=x) for x in executors]
        errors = []
        for fut, executor in zip(futures, executors):
            try:
                self.replicas.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - the other replica is shut down below
                errors.append(exc)
                executor.shutdown()
        if errors:
            raise errors[0]

    def _both(self, fn, indexed: bool = False) -> list:
        """`fn(replica)` (or `fn(replica, index)`) on both replicas at once; both results."""
        futures = [self._threads.submit(fn, *((e, i) if indexed else (e,)))
                   for i, e in enumerate(self.replicas)]
        return [f.result() for f in futures]

    @property
    def merged(self) -> bool:
        return self.head is not None

    @property
    def lock(self) -> contextlib.AbstractContextManager:
        return self._lock

    @lock.setter
    def lock(self, lock: contextlib.AbstractContextManager) -> None:
        self._lock = lock
        for e in self.engines():
            e.lock = lock

    # ---- requests -------------------------------------------------------------------------
    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids if the pair can serve the request, else ValueError saying what
        to change (`QueueFull` when too many wait). Reads only what no transition changes."""
        if params.n != 1:
            raise ValueError(f"n must be 1 for an elastic pair, got n={params.n}; send {params.n} requests "
                             "of n=1")
        if params.structured_outputs is not None:
            # A moved request restarts on its new engine with its tokens so far in the prompt: the
            # grammar would start again from its beginning in the middle of the output.
            raise ValueError(NO_STRUCTURED_OUTPUT)
        _, ids = self.replicas[0].tokenize(prompt)
        params.check_vocab(self.replicas[0].vocab_size)
        need = self.layout.groups_for_tokens(len(ids) + params.max_tokens)
        if need > self.replica_groups:  # it must fit a replica again once the pair splits
            raise ValueError(f"the request needs {need} KV page groups, a replica holds "
                             f"{self.replica_groups}; shorten the prompt or lower max_tokens")
        limit = self.config.scheduler.max_model_len
        if len(ids) + params.max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len={limit}; shorten the prompt or lower max_tokens")
        if self.max_queued_requests is not None:
            # Requests that never produced a token (moved ones with tokens do not count: a merge
            # must not turn away the burst it was made for); two replicas' worth.
            # list(): one atomic copy, as a transition may take finished requests off meanwhile
            waiting = sum(1 for r in list(self.requests.values()) if r.first_token_time is None)
            if waiting >= 2 * self.max_queued_requests:
                raise QueueFull(f"{waiting} requests are waiting for this elastic pair (twice "
                                f"max_queued_requests={self.max_queued_requests}); retry later")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Admit a request, or raise ValueError saying what to change."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self.check_request(prompt, params)
        req = PairRequest(request_id, ids, params)
        self._place(req, self.head or self._least_loaded())
        self.requests[request_id] = req

    def _place(self, req: PairRequest, engine: LLMEngine) -> None:
        done = len(req.token_ids)
        p = req.params
        params = dataclasses.replace(p, max_tokens=p.max_tokens - done, min_tokens=max(0, p.min_tokens - done),
                                     output_kind=RequestOutputKind.DELTA)
        req.sub_id = f"{req.request_id}~{req.moves}"
        engine.add_request(req.sub_id, req.prompt_token_ids + req.token_ids, params)
        req.engine, req.started = engine, False
        self._by_sub[req.sub_id] = req

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req.engine is None:
            self._resumed.remove(req)
        else:
            req.engine.abort_request(req.sub_id)
            self._by_sub.pop(req.sub_id, None)
        req.finished, req.finish_reason = True, "abort"
        return True

    def has_work(self) -> bool:
        return bool(self.requests) or any(e.has_work() for e in self.engines())

    def _hand_over_resumed(self) -> None:
        """Give resumed requests to an engine whose unstarted work is under one step's budget."""
        budget = self.config.scheduler.max_num_batched_tokens
        while self._resumed:
            engine = self.head or self._least_loaded()
            if self._unstarted_tokens(engine) >= budget:
                return
            self._place(self._resumed.popleft(), engine)

    def _unstarted_tokens(self, engine: LLMEngine) -> int:
        return sum(len(r.prompt_token_ids) + len(r.token_ids) for r in self.requests.values()
                   if r.engine is engine and not r.started)

    def engines(self) -> list[LLMEngine]:
        """The engines serving now: the head while merged, else both replicas."""
        return [self.head] if self.head is not None else self.replicas

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[PairRequest]:
        """Consult the policy (every `check_interval_s`), then step every live engine once;
        returns the requests that produced tokens or finished."""
        decision = self.decide()
        if decision is not None:
            self.transition(decision)
        return self.step_engines()

    def decide(self, now: float | None = None) -> Decision | None:
        """Ask the coordinator, if a check is due: the transition to make now, or None. The loads
        are read under the lock; the coordinator (maybe a Ray actor) is asked outside it."""
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return None
        self._next_check = now + self.elastic.check_interval_s
        with self.lock:
            loads, merged = self.loads(), self.merged
        return self.coordinator.observe(loads, merged, now)

    def check_due(self, now: float | None = None) -> bool:
        """Whether `decide` would ask the coordinator now."""
        return (time.monotonic() if now is None else now) >= self._next_check

    def transition(self, decision: Decision) -> dict:
        """Merge or split as `decision` says. It drains the engines and moves every request, so
        the caller must keep others from adding requests meanwhile (it runs without the lock)."""
        return (self.merge if decision.action == "merge" else self.split)(decision.reason)

    def step_engines(self) -> list[PairRequest]:
        """Step every live engine once (each takes the lock only while its books change);
        returns the requests that produced tokens or finished."""
        with self.lock:
            if self._resumed:
                self._hand_over_resumed()
            engines = self.engines()
        if len(engines) == 1:
            outs = engines[0].step()
        else:
            outs = [o for per in self._both(lambda e: e.step()) for o in per]
        with self.lock:
            return self._take(outs)

    def _take(self, outs) -> list[PairRequest]:
        touched = []
        now = time.monotonic()
        for out in outs:
            req = self._by_sub.get(out.request_id)
            if req is None:
                continue
            o = out.outputs[0]
            if o.logprobs is not None:
                if req.logprobs is None:
                    req.logprobs = []
                req.logprobs.extend(o.logprobs)
            if o.token_ids:
                req.token_ids.extend(o.token_ids)
                req.started = True
                if req.first_token_time is None:
                    req.first_token_time = now
            if out.finished and o.finish_reason != "abort":
                req.finished, req.finish_reason = True, o.finish_reason
                self.requests.pop(req.request_id, None)
                self._by_sub.pop(req.sub_id, None)
            touched.append(req)
        return touched

    def loads(self) -> list[ReplicaLoad]:
        """Each replica's KV load; while merged, the head's load in the units of the two replicas
        it would split into (their page groups, their total capacity), so that "usage below the
        split threshold" means the split replicas would be that full."""
        resumed = sum(self.layout.groups_for_tokens(len(r.prompt_token_ids) + len(r.token_ids) + 1)
                      for r in self._resumed)  # in the replicas' page groups
        if self.head is None:
            loads = [self._load_of(e) for e in self.replicas]
            share = -(-resumed // len(loads))  # they will go to either replica
            return [dataclasses.replace(l, waiting_groups=l.waiting_groups + share) for l in loads]
        load = self._load_of(self.head)
        scale = self.head.layout.tokens_per_group / self.layout.tokens_per_group
        return [ReplicaLoad(2 * self.replica_groups, math.ceil(load.used_groups * scale),
                            math.ceil(load.waiting_groups * scale) + resumed)]

    def _least_loaded(self) -> LLMEngine:
        def room(e: LLMEngine) -> int:
            load = self._load_of(e)
            return load.free_groups - load.waiting_groups

        return max(self.replicas, key=room)

    def _load_of(self, engine: LLMEngine) -> ReplicaLoad:
        """KV books of `engine`; waiting work is estimated from the requests placed on it that
        have not produced a token there yet (prompt and tokens so far, plus one)."""
        s = engine.scheduler.stats
        waiting = sum(engine.layout.groups_for_tokens(len(r.prompt_token_ids) + len(r.token_ids) + 1)
                      for r in self.requests.values() if r.engine is engine and not r.started)
        return ReplicaLoad(s.capacity_groups, s.num_groups_mapped - s.num_groups_idle, waiting)

    # ---- transitions ----------------------------------------------------------------------
    def _collect(self, engines: list[LLMEngine]) -> list[PairRequest]:
        """Take in every step in flight, then take the unfinished requests off `engines`."""
        for e in engines:
            self._take(e.drain())
        moving = sorted((r for r in self.requests.values() if r.engine in engines), key=lambda r: r.arrival)
        for req in moving:
            req.engine.abort_request(req.sub_id)
            self._by_sub.pop(req.sub_id, None)
            req.engine, req.moves = None, req.moves + 1
        return moving

    def _move(self, moving: list[PairRequest], engine_for) -> None:
        """Requests without a first token go to `engine_for()` now; resumed ones wait their turn."""
        for req in moving:
            if req.first_token_time is None:
                self._place(req, engine_for())
        self._resumed = deque(sorted(list(self._resumed) + [r for r in moving if r.first_token_time is not None],
                                     key=lambda r: r.arrival))

    def merge(self, reason: str = "requested") -> dict:
        """Become one two-stage pipeline; returns the event recorded."""
        if self.merged:
            raise RuntimeError("the pair is merged already")
        start = time.perf_counter()
        before = [e.scheduler.stats.capacity_groups for e in self.replicas]
        moving = self._collect(self.replicas)
        for e in self.replicas:
            e.scheduler.set_capacity(0)  # every page is the pipeline's now
        results = self._both(lambda e, i: e.executor.run_on_workers(stage_fns.merge, i), indexed=True)
        infos = [info for per in results for info, _ in per]
        executor = PipelineExecutor(self.config, [e.executor for e in self.replicas], infos)
        self.head = LLMEngine(self.config, executor=executor)
        self.head.lock = self.lock
        self._move(moving, lambda: self.head)
        event = self._record("merge", reason, start, kv_groups_before=before,
                             kv_groups_after=min(i.capacity_groups for i in infos),
                             tokens_per_group_before=self.layout.tokens_per_group,
                             tokens_per_group_after=self.head.layout.tokens_per_group,
                             pages_lent=[per[0][1]["pages_lent"] for per in results],
                             requests_recomputed=len(moving))
        return event

    def split(self, reason: str = "requested") -> dict:
        """Restore every layer on both replicas and serve apart again; returns the event recorded."""
        if not self.merged:
            raise RuntimeError("the pair is split already")
        start = time.perf_counter()
        head, before = self.head, self.head.scheduler.stats.capacity_groups
        moving = self._collect([head])
        self._retired_preemptions += head.scheduler.stats.num_preemptions
        head.shutdown()
        self.head = None
        results = self._both(lambda e: e.executor.run_on_workers(stage_fns.split))
        for e, per in zip(self.replicas, results):
            if per[0][0].layout != e.layout:
                raise RuntimeError(f"restored KV layout {per[0][0].layout} differs from {e.layout}")
            e.scheduler.set_capacity([info.capacity_groups for info, _ in per])
        self.replica_groups = min(e.scheduler.stats.capacity_groups for e in self.replicas)
        self._move(moving, self._least_loaded)
        restore = [per[0][1] for per in results]
        return self._record("split", reason, start, kv_groups_before=before,
                            kv_groups_after=[e.scheduler.stats.capacity_groups for e in self.replicas],
                            pages_taken=[r["pages_taken"] for r in restore],
                            restore_s=max(r["restore_s"] for r in restore),
                            restore_bytes=sum(r["bytes_received"] for r in restore),
                            requests_recomputed=len(moving))

    def _record(self, kind: str, reason: str, start: float, **facts) -> dict:
        event = {"event": kind, "reason": reason, "at": time.time(), "monotonic": time.monotonic(),
                 "duration_s": time.perf_counter() - start, **facts}
        self.events.append(event)
        self.coordinator.record(event)
        logger.info("elastic %s in %.3f s (%s): %s", kind, event["duration_s"], reason,
                    ", ".join(f"{k}={v}" for k, v in facts.items()))
        return event

    # ---- checks and shutdown ----------------------------------------------------------------
    def check_integrity(self) -> list[dict]:
        """Every live scheduler against its shards' KV caches, page ownership and resident weight
        bytes on every rank; returns each rank's page counts."""
        for e in self.engines():
            self._take(e.drain())  # the steps in flight produced tokens: keep them
        for e in self.replicas:
            e.scheduler.check_integrity()
        if self.merged:
            self.head.check_integrity()  # the pipeline checks pages and weights too (stage.check)
            return self.head.executor.run_on_workers(stage_fns.check, None)
        out = []
        for e in self.replicas:
            e.executor.check_integrity(e.scheduler.slot_groups())
            out += e.executor.run_on_workers(stage_fns.check, e.scheduler.slot_groups())
        return out

    def set_policy(self, config: ElasticConfig) -> None:
        """Change the merge/split thresholds (or switch transitions on and off) from now on."""
        self.elastic = config
        self.coordinator.configure(config)

    @property
    def num_resumed(self) -> int:
        """Requests moved with tokens that wait for room on their new engine."""
        return len(self._resumed)

    def preemptions(self) -> int:
        """Requests preempted (recomputed for want of KV memory) by every scheduler of the pair."""
        heads = [self.head] if self.head is not None else []
        return self._retired_preemptions + sum(e.scheduler.stats.num_preemptions for e in self.replicas + heads)

    def metrics(self) -> dict:
        """Counts and times of transitions (for /metrics and benchmarks)."""
        merges = [e for e in self.events if e["event"] == "merge"]
        splits = [e for e in self.events if e["event"] == "split"]
        return {"merges": len(merges), "splits": len(splits),
                "merge_s": [e["duration_s"] for e in merges], "split_s": [e["duration_s"] for e in splits],
                "restore_s": [e["restore_s"] for e in splits],
                "requests_recomputed": sum(e["requests_recomputed"] for e in self.events),
                "preemptions": self.preemptions(),
                "merged": self.merged}

    def shutdown(self) -> None:
        if self.head is not None:
            try:
                self.head.shutdown()
            finally:
                self.head = None
        for e in self.replicas:
            try:
                if e.executor.failure is None:
                    e.drain()
                    e.executor.run_on_workers(stage_fns.close)
            finally:
                e.shutdown()
        self.replicas = []
        self._threads.shutdown(wait=True)

    def __enter__(self) -> "ElasticPair":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
