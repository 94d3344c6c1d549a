"""The head scheduler: continuous batching over KV slots, one `StepPlan` per step.

Request-level policy lives here (what runs, in which order, who is preempted); page-group policy
(slot choice, prefix sharing, reclaiming) in `kv_policy.py`, and the books it keeps in `books.py`.

Hot path: `schedule()` and `update()` run once per model step for every running request; keep the
per-request work O(1) (no scans of the queues inside per-request loops).

Protocol: `schedule()` -> the engine runs the plan on every shard -> `update(plan, output)`, in plan
order (an empty plan may be skipped, update included). One plan may be scheduled ahead while the
previous one runs (`can_schedule()`): it is planned from what the plan in flight will have done
(`Request.planned_*`), and decode chunks whose last token is not known yet carry
`PREVIOUS_SAMPLE`. Request progress (`num_computed`, output tokens) is committed only in `update()`
and only for an executed step; a step that did not run only resets the plans' promises
(`Request.reset_plan`). A request that ends (stop token, stop string, abort) while a plan ahead
still computes one more token for it simply has that result ignored; its slot's pages are only ever
shrunk by a later plan, which a worker applies after the earlier steps' device work is done.

KV accounting and failures (see `update` and `_recover`):
- `PageGroupBooks` is what every shard will hold once all emitted ops are applied.
- Prefetch ops are hints: a shard may not have applied them yet (or failed to). Every slot whose
  shard state is not known to equal the table is *re-asserted*: the next plan's `kv_now` carries
  `KVOp(slot, mapped)` again. Ops are idempotent, so a healthy shard does nothing, and a shard that
  missed a prefetch maps the groups before the step computes, or reports a `kv_now` failure.
- A step whose `kv_now` failed on some shard (`executed=False`) ran nowhere: no tokens, no progress.
  Every slot that plan touched is re-asserted next step; each failed slot is forced to 0 groups and
  its owner preempted (recomputed later, generated tokens kept), and so is every slot the plan
  restructured (truncated for reuse or aliased to another slot's prefix: a shard may not have done
  it, and a count alone cannot re-assert it); the capacity estimate drops below
  the total that could not be mapped. Capacity thus strictly decreases on repeated failures, so the
  scheduler converges to what the shards really hold instead of failing forever.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from vattn_ray.config import SchedulerConfig
from vattn_ray.layout import KVLayout
from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.kv_policy import KVPolicy, KVStep
from vattn_ray.scheduler.plan import PREVIOUS_SAMPLE, NewRequest, SeqChunk, StepOutput, StepPlan
from vattn_ray.scheduler.request import QueueFull, Request, RequestRejected, RequestStatus, RequestUpdate

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "abort")

# How a request that needs more page groups may get them.
_NO_PREEMPT = 0  # free and idle groups only (admitting a waiting request)
_PREEMPT_OTHERS = 1  # may preempt newer running requests not scheduled in this step
_PREEMPT_ANY = 2  # as above, and itself when it is the newest (then it is not scheduled)


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_groups_mapped: int
    num_groups_free: int
    num_groups_idle: int  # mapped to slots without a request (deferred reclamation)
    capacity_groups: int
    num_steps: int
    num_kv_failures: int
    live_tokens: int = 0  # tokens in the KV cache of running requests
    groups_mapped_total: int = 0  # page groups the shards were told to map since start-up
    groups_unmapped_total: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (vLLM's meaning)
    prefix_cache_hits: int = 0  # ... of them served from it
    num_groups_shared: int = 0  # page groups mapped in more than one slot now


@dataclass
class _InFlight:
    """A plan sent to the workers whose output has not been taken in yet."""

    plan: StepPlan
    upper: dict[int, int]  # slot -> most groups its shards may hold while the plan is applied
    epochs: dict[str, int]  # request id -> its epoch when the plan was built
    total_mapped: int  # page groups the shards hold once the plan is applied
    structural: frozenset[int]  # slots the plan truncated for reuse or aliased


class _Step:
    """Scratch state while one plan is built."""

    __slots__ = ("step", "budget", "kv", "seqs", "new_requests")

    def __init__(self, step: int, budget: int) -> None:
        self.step = step  # requests scheduled in it carry `scheduled_step == step`
        self.budget = budget
        self.kv = KVStep()
        self.seqs: list[tuple[Request, SeqChunk]] = []
        self.new_requests: list[NewRequest] = []


class Scheduler:
    """Continuous-batching head scheduler with vAttention slot and page-group accounting."""

    def __init__(self, config: SchedulerConfig, layout: KVLayout, capacity_groups: int | Sequence[int],
                 annotate_chunks: Callable[[tuple[SeqChunk, ...]], tuple[SeqChunk, ...]] | None = None) -> None:
        """`capacity_groups`: page groups each shard's pool holds (an int, or one per shard).

        `annotate_chunks` may add per-row data to a plan's chunks before it is frozen (the engine's
        structured-output token masks); it must keep their order and everything else unchanged.
        """
        caps = [capacity_groups] if isinstance(capacity_groups, int) else list(capacity_groups)
        if not caps or any(not isinstance(c, int) or c < 0 for c in caps):
            raise ValueError(f"capacity_groups must be a non-negative int or a non-empty list of them, "
                             f"got {capacity_groups!r}")
        if config.max_num_seqs < 1 or config.max_num_batched_tokens < 1 or config.max_model_len < 1:
            raise ValueError(f"max_num_seqs, max_num_batched_tokens and max_model_len must be >= 1: {config}")
        if layout.max_slots < config.max_num_seqs:
            raise ValueError(f"the KV layout has {layout.max_slots} slots but max_num_seqs="
                             f"{config.max_num_seqs}; build the layout with max_slots >= max_num_seqs")
        if layout.max_tokens_per_slot < config.max_model_len:
            raise ValueError(f"a KV slot holds {layout.max_tokens_per_slot} tokens < max_model_len="
                             f"{config.max_model_len}; build the layout with the same max_model_len")
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < config.max_model_len:
            # A preempted request re-prefills prompt + generated tokens in one step.
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({config.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({config.max_model_len})")
        self.config = config
        self.layout = layout
        self._annotate_chunks = annotate_chunks
        self._kv = KVPolicy(layout, config.max_num_seqs, min(caps), config.enable_prefix_caching)
        self._slots = self._kv.books
        self._capacity = self._kv.probe
        self._reassert = self._kv.reassert  # slot -> most groups its shards may hold
        self._tb = layout.token_bytes
        self._pb = layout.page_bytes
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}  # in admission order: the last is preempted first
        self._to_release: list[str] = []  # finished ids to announce in the next plan
        self._releasing: set[str] = set()  # ... and those announced in the plan in flight
        self._in_flight: deque[_InFlight] = deque()  # oldest first; at most two
        self._draining = False  # a plan did not run: the one behind it will not either
        self._step = 0
        self._seq = 0
        self._num_preemptions = 0
        self._num_kv_failures = 0

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, req_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    eos_token_ids: Collection[int] = ()) -> None:
        """Queue a request; raises `RequestRejected` if it can never be served."""
        if req_id in self._requests or req_id in self._releasing:
            raise RequestRejected(f"request id {req_id!r} is already in use; give every request a unique id")
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty; send at least one token")
        limit = self.config.max_model_len
        if n + params.max_tokens > limit:
            raise RequestRejected(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_model_len={limit}; shorten the prompt or lower max_tokens")
        req = Request(req_id, prompt_token_ids, params, eos_token_ids, self._seq)
        need = self._groups(req.max_kv_tokens)
        if need > self._capacity.nominal:
            raise RequestRejected(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs {need} KV page groups but the "
                f"KV cache holds {self._capacity.nominal}; shorten the prompt, lower max_tokens or give the "
                f"KV cache more memory")
        limit = self.config.max_queued_requests
        if limit is not None and len(self._waiting) >= limit:
            raise QueueFull(f"{len(self._waiting)} requests are waiting for this server "
                            f"(max_queued_requests={limit}); retry later")
        self._seq += 1
        self._requests[req_id] = req
        self._waiting.append(req)

    def abort(self, req_id: str) -> bool:
        """Drop a waiting or running request; False if it is unknown or already finished.

        Its slot keeps its page groups (reused by the next request or reclaimed when dry).
        """
        req = self._requests.get(req_id)
        if req is None:
            return False
        self._finish(req)
        logger.debug("aborted request %s", req_id)
        return True

    def finish(self, req_id: str, reason: str = "stop") -> None:
        """The engine ended a request itself (e.g. it found a stop string); unknown ids are ignored."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason must be one of {FINISH_REASONS}, got {reason!r}")
        req = self._requests.get(req_id)
        if req is not None:
            self._finish(req)
            logger.debug("request %s finished by the engine (%s)", req_id, reason)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def has_work(self) -> bool:
        """Whether the next plan would be non-empty: requests, or announcements still to send."""
        return bool(self._requests or self._to_release or self._reassert)

    # ---------------------------------------------------------------- planning

    def can_schedule(self) -> bool:
        """Whether `schedule()` may be called now: nothing in flight, or one plan whose results the
        next one can be planned ahead of (not after a step that failed to run)."""
        return not self._in_flight or (len(self._in_flight) == 1 and not self._draining)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def schedule(self) -> StepPlan:
        """Plan the next step: decodes first, then running prefills, then waiting requests (FCFS)."""
        if not self.can_schedule():
            raise RuntimeError(f"{len(self._in_flight)} step(s) in flight (draining={self._draining}); "
                               "call update() before scheduling the next step")
        cfg = self.config
        slots = self._slots
        restored = self._capacity.tick(slots.capacity)
        if restored is not None:
            slots.capacity = restored
        st = _Step(self._step, cfg.max_num_batched_tokens)
        reassert = self._reassert
        if self._in_flight:
            # The plan in flight's prefetch may not have happened by the time this plan runs (its
            # result, which would re-assert those slots, is not known yet): re-assert them here.
            reassert = dict(reassert)
            for op in self._in_flight[-1].plan.kv_prefetch:
                reassert[op.slot] = max(reassert.get(op.slot, 0), op.num_groups)
        st.kv.touched.update(reassert)
        running = list(self._running.values())
        self._schedule_decodes(st, running)
        self._schedule_running_prefills(st, running)
        self._schedule_waiting(st)

        now, upper = self._kv.ops_now(st.kv, reassert)
        prefetch = self._kv.prefetch(st.seqs, upper)
        seqs = tuple(chunk for _, chunk in st.seqs)
        if self._annotate_chunks is not None and seqs:
            seqs = self._annotate_chunks(seqs)
        plan = StepPlan(step=self._step, kv_now=tuple(now), kv_prefetch=tuple(prefetch),
                        seqs=seqs, new_requests=tuple(st.new_requests),
                        finished=tuple(self._to_release), follows_previous=bool(self._in_flight))
        self._to_release = []
        if plan.seqs or plan.kv_now or plan.kv_prefetch or plan.finished:
            # An empty plan changes nothing anywhere: the engine may skip it (and its update()).
            self._in_flight.append(_InFlight(plan, upper, {r.req_id: r.epoch for r, _ in st.seqs},
                                             slots.total_mapped, frozenset(op.slot for op in st.kv.structural)))
            self._step += 1
        return plan

    def _schedule_decodes(self, st: _Step, running: list[Request]) -> None:
        # The common case of every step: kept inline (no helper calls unless a group is needed).
        tb, pb, mapped = self._tb, self._pb, self._slots.mapped
        seqs, step, RUNNING = st.seqs, st.step, RequestStatus.RUNNING
        budget = st.budget
        max_len = self.config.max_model_len
        for req in running:
            if budget <= 0:
                break
            end = req.planned_tokens
            if req.planned_computed != end - 1 or req.status is not RUNNING:
                continue
            out = req.output_token_ids
            pending = end - req.num_tokens  # sampled by the plan in flight, id not known yet
            if pending:
                if len(out) + pending >= req.params.max_tokens or end >= max_len:
                    continue  # the plan in flight ends it by length
                last = PREVIOUS_SAMPLE
            else:
                last = out[-1] if out else req.prompt_token_ids[-1]  # or a prefill's last single token
            if -(-end * tb // pb) > mapped[req.slot] and not self._reserve(st, req, end, _PREEMPT_ANY):
                continue
            seqs.append((req, SeqChunk(req.req_id, req.slot, end - 1, (last,), True, len(out) + pending)))
            req.planned_computed, req.planned_tokens = end, end + 1
            req.scheduled_step = step
            if not req.sent:  # a one-token prompt, or a retry after a step that did not run
                st.new_requests.append(NewRequest(req.req_id, req.params, tuple(sorted(req.eos_token_ids))))
                req.sent = True
            budget -= 1
        st.budget = budget

    def _schedule_running_prefills(self, st: _Step, running: list[Request]) -> None:
        chunked = self.config.enable_chunked_prefill
        for req in running:
            if st.budget <= 0:
                return
            if (req.status is not RequestStatus.RUNNING or req.scheduled_step == st.step
                    or req.pending_samples):  # its next token is a decode of an unknown id
                continue
            start = req.planned_computed
            n = req.num_tokens - start
            if n > st.budget:
                if not chunked:
                    continue
                n = st.budget
            if self._reserve(st, req, start + n, _PREEMPT_OTHERS):
                self._add_chunk(st, req, start, start + n)

    def _schedule_waiting(self, st: _Step) -> None:
        slots, kv = self._slots, self._kv
        while self._waiting and st.budget > 0 and slots.has_unowned():
            req = self._waiting[0]
            groups, src = kv.lookup(req)
            if kv.computing_elsewhere(req, groups, lambda: list(self._running.values())):
                return  # FCFS: wait for a running request to compute the same prefix, then share it
            start = groups * kv.tokens_per_group
            n = req.num_tokens - start
            if n > st.budget:
                if not self.config.enable_chunked_prefill:
                    return  # FCFS: the head waits for a step with room for its whole prompt
                n = st.budget
            # No preemption for admissions: running requests finish and free pages.
            slot = kv.place(st.kv, req, groups, src, start + n)
            if slot is None:
                return
            self._waiting.popleft()
            req.slot = slot
            req.status = RequestStatus.RUNNING
            req.num_computed = req.planned_computed = req.prefix_hit = start
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = start
            kv.queries += req.num_tokens
            kv.hits += start
            self._running[req.req_id] = req
            self._add_chunk(st, req, start, start + n)

    def _reserve(self, st: _Step, req: Request, num_tokens: int, mode: int) -> bool:
        """Back tokens [0, num_tokens) of `req`'s slot, reclaiming idle groups and preempting per `mode`.

        False if it cannot (then `req` is not scheduled this step; with _PREEMPT_ANY it may have
        been preempted itself).
        """
        def preempt() -> bool:
            victim = self._victim(st, req, mode)
            if victim is None:
                return False
            self._preempt(victim, st)
            return victim is not req

        return self._kv.reserve(st.kv, req.slot, num_tokens, None if mode == _NO_PREEMPT else preempt)

    def _victim(self, st: _Step, req: Request, mode: int) -> Request | None:
        """The newest running request admitted after `req` and not scheduled yet; else `req`
        itself under _PREEMPT_ANY. Older requests are never preempted for a newer one."""
        for other in reversed(self._running.values()):
            if other is req:
                return req if mode == _PREEMPT_ANY else None
            if other.scheduled_step != st.step:
                return other
        return None

    def _add_chunk(self, st: _Step, req: Request, start: int, end: int) -> None:
        chunk = SeqChunk(req.req_id, req.slot, start, req.tokens(start, end), end == req.num_tokens,
                         len(req.output_token_ids))
        st.seqs.append((req, chunk))
        st.budget -= end - start
        req.planned_computed = end
        req.planned_tokens = req.num_tokens + (1 if chunk.sample else 0)
        req.scheduled_step = st.step
        if not req.sent:
            st.new_requests.append(NewRequest(req.req_id, req.params, tuple(sorted(req.eos_token_ids))))
            req.sent = True

    # ---------------------------------------------------------------- results

    def update(self, plan: StepPlan, output: StepOutput) -> list[RequestUpdate]:
        """Apply the result of `plan`: append sampled tokens, finish requests, handle KV failures."""
        if not self._in_flight and not (plan.seqs or plan.kv_now or plan.kv_prefetch or plan.finished):
            return []  # an empty plan, never in flight
        if not self._in_flight or plan is not self._in_flight[0].plan:
            raise ValueError("update() takes the oldest plan in flight (plans are updated in order)")
        if output.step != plan.step:
            raise ValueError(f"output of step {output.step} does not answer plan {plan.step}")
        flight = self._in_flight.popleft()
        if not self._in_flight:
            self._draining = False
        if output.kv_failures:
            self._num_kv_failures += len(output.kv_failures)
            logger.warning("step %d: %d KV op(s) failed (executed=%s), first: %s", plan.step,
                           len(output.kv_failures), output.executed, output.kv_failures[0])
        if not output.executed:
            return self._recover(flight, output)
        # Executed: every kv_now op holds on every shard (failures here are of prefetch ops, whose
        # slots stay re-asserted until a kv_now confirms them).
        self._releasing.difference_update(plan.finished)
        for op in plan.kv_now:
            self._reassert.pop(op.slot, None)
        for op in plan.kv_prefetch:
            self._reassert[op.slot] = max(self._reassert.get(op.slot, 0), op.num_groups)
        sampled = {t.req_id: t for t in output.sampled}
        max_model_len = self.config.max_model_len
        updates: list[RequestUpdate] = []
        epochs = flight.epochs
        for chunk in plan.seqs:
            req = self._requests.get(chunk.req_id)
            if req is None or req.epoch != epochs[chunk.req_id]:
                continue  # aborted, finished or preempted while the step ran: its result is stale
            assert req.num_computed == chunk.start, f"{req.req_id}: chunk does not continue its KV"
            req.num_computed = chunk.end
            self._kv.register(req, chunk.start, chunk.end)
            if not chunk.sample:
                continue
            tok = sampled.get(req.req_id)
            if tok is None:
                raise RuntimeError(f"step {plan.step}: no sampled token for request {req.req_id}")
            req.append_output(tok.token_id)
            stop = req.stop_after(tok.token_id, max_model_len)
            if stop is None:
                updates.append(RequestUpdate(req.req_id, [tok.token_id], [tok], False,
                                             num_cached_tokens=req.num_cached_tokens))
            else:
                self._finish(req)
                updates.append(RequestUpdate(req.req_id, [tok.token_id], [tok], True, stop[0], stop[1],
                                             req.num_cached_tokens))
        return updates

    def _recover(self, flight: _InFlight, output: StepOutput) -> list[RequestUpdate]:
        """A `kv_now` op failed on some shard (or the plan before did not run), so no shard ran
        `plan`; make the next plan safe."""
        plan = flight.plan
        # What this plan (and any plan built on it) promised will not happen.
        for req_id, epoch in flight.epochs.items():
            req = self._requests.get(req_id)
            if req is not None and req.epoch == epoch:
                req.reset_plan()
        if self._in_flight:
            self._draining = True  # the plan behind it depends on it: workers will skip it too
        # What the plan announced may not have reached the workers: announce it again (workers
        # treat a repeated NewRequest or release as a no-op).
        self._to_release[:0] = plan.finished
        for new in plan.new_requests:
            req = self._requests.get(new.req_id)
            if req is not None:
                req.sent = False
        # Shards may hold anything up to the larger of before/after for every slot the plan touched.
        for slot, upper in flight.upper.items():
            self._reassert[slot] = max(self._reassert.get(slot, 0), upper)
        failed = {f.slot for f in output.kv_failures}
        # The failed slots' contents are unknown, and so are the restructured ones' (a count does
        # not say which pages): recompute their requests from scratch (newest first, so FCFS order
        # survives at the head of the waiting queue).
        unsure = failed | flight.structural
        for req in reversed(list(self._running.values())):
            if req.slot in unsure:
                self._preempt(req, None)
        for slot in unsure:
            if 0 <= slot < self._slots.num_slots:
                self._set_groups(None, slot, 0)
        if not failed:
            return []
        total_planned = flight.total_mapped  # what the shards were asked to hold (not a later plan's)
        estimate = self._capacity.failed(max(0, min(self._slots.capacity, total_planned - 1)))
        return self._shrink_capacity(estimate)

    def set_capacity(self, capacity_groups: int | Sequence[int]) -> list[RequestUpdate]:
        """Re-sync the pool size (e.g. after memory was lent to or returned by another user).

        Shrinking reclaims idle slots, then preempts; requests that can no longer fit even alone
        are aborted and returned as finished updates. Call between update() and schedule().
        """
        if self._in_flight:
            raise RuntimeError("set_capacity() while a step is in flight")
        caps = [capacity_groups] if isinstance(capacity_groups, int) else list(capacity_groups)
        self._capacity.reset(min(caps))
        return self._shrink_capacity(min(caps))

    def _shrink_capacity(self, capacity: int) -> list[RequestUpdate]:
        slots = self._slots
        if capacity != slots.capacity:
            logger.warning("KV capacity estimate %d -> %d page groups", slots.capacity, capacity)
        slots.capacity = capacity
        while slots.total_mapped > capacity:
            if not self._kv.reclaim(None):
                self._preempt(next(reversed(self._running.values())), None)
        updates = []
        # Only what the shards hold for good (not a lowered estimate) makes a request impossible.
        nominal = self._capacity.nominal
        for req in [r for r in self._requests.values() if self._groups(r.max_kv_tokens) > nominal]:
            logger.error("aborting request %s: it needs %d KV page groups, the shards now hold %d",
                         req.req_id, self._groups(req.max_kv_tokens), nominal)
            self._finish(req)
            updates.append(RequestUpdate(req.req_id, [], [], True, "abort"))
        return updates

    # ---------------------------------------------------------------- state changes

    def _groups(self, num_tokens: int) -> int:
        return -(-num_tokens * self._tb // self._pb) if num_tokens > 0 else 0

    def _set_groups(self, st: _Step | None, slot: int, num_groups: int) -> None:
        """Change a slot's accounted groups; outside a step (st None) the next plan re-asserts it."""
        self._kv.set_groups(None if st is None else st.kv, slot, num_groups)

    def _preempt(self, req: Request, st: _Step | None) -> None:
        """Recompute later: free the slot's pages, keep generated tokens, back to the queue head."""
        slot = req.slot
        del self._running[req.req_id]
        self._slots.release(slot)
        if not self._kv.caching:
            self._set_groups(st, slot, 0)
        # With the cache on the slot keeps its groups, idle: its computed groups serve the
        # recompute, and reclaiming takes them (last prefix last) only as far as space is needed.
        req.slot = None
        req.num_computed = 0
        req.reset_plan()
        req.epoch += 1  # a token sampled for it by a plan in flight is dropped and recomputed
        req.status = RequestStatus.WAITING
        self._waiting.appendleft(req)
        self._num_preemptions += 1
        logger.info("preempted request %s (slot %d, %d tokens to recompute) to free KV page groups",
                    req.req_id, slot, req.num_tokens)

    def _finish(self, req: Request) -> None:
        del self._requests[req.req_id]
        if req.status is RequestStatus.RUNNING:
            del self._running[req.req_id]
            self._slots.release(req.slot)  # deferred reclamation: the slot keeps its pages
            req.slot = None
        else:
            self._waiting.remove(req)
        req.status = RequestStatus.FINISHED
        if req.sent:
            self._to_release.append(req.req_id)
            self._releasing.add(req.req_id)

    # ---------------------------------------------------------------- introspection

    def slot_groups(self) -> dict[int, int]:
        """Page groups backing every slot once all emitted ops are applied (0 for empty slots)."""
        return dict(enumerate(self._slots.mapped))

    def slot_group_ids(self) -> dict[int, tuple[int, ...]]:
        """The same, as the head's group ids: slots naming one id must share one page group."""
        return {s: tuple(g) for s, g in enumerate(self._slots.groups)}

    @property
    def stats(self) -> SchedulerStats:
        s = self._slots
        return SchedulerStats(len(self._running), len(self._waiting), self._num_preemptions, s.total_mapped,
                              s.free_groups, s.idle_groups, s.capacity, self._step, self._num_kv_failures,
                              sum(r.num_computed for r in self._running.values()),
                              s.groups_mapped_total, s.groups_unmapped_total, self._kv.queries, self._kv.hits,
                              sum(1 for h in s.holders.values() if len(h) > 1))

    def check_integrity(self) -> None:
        """Raise AssertionError if queues, slot table and page accounting disagree."""
        slots = self._slots
        slots.check_integrity()
        waiting_ids = [r.req_id for r in self._waiting]
        assert len(set(waiting_ids)) == len(waiting_ids), "a request is queued twice"
        assert not set(waiting_ids) & self._running.keys(), "a request is both waiting and running"
        assert set(waiting_ids) | self._running.keys() == self._requests.keys(), (
            "waiting + running do not match the unfinished requests")
        assert slots.num_owned == len(self._running), "slot owners do not match the running requests"
        assert not self._releasing & self._requests.keys(), "a live request is being released"
        assert set(self._to_release) <= self._releasing
        for req in self._waiting:
            assert req.status is RequestStatus.WAITING and req.slot is None and req.num_computed == 0, (
                f"waiting request {req.req_id} holds a slot or computed tokens")
            assert req.planned_computed == 0 and req.pending_samples == 0, f"waiting {req.req_id} has plans"
        for rid, req in self._running.items():
            assert req.status is RequestStatus.RUNNING and req.slot is not None, f"{rid} runs without a slot"
            assert slots.owner[req.slot] == rid, f"slot {req.slot} is not owned by its request {rid}"
            assert 0 <= req.num_computed < req.num_tokens, f"{rid}: computed {req.num_computed} of {req.num_tokens}"
            assert req.num_computed <= req.planned_computed < req.planned_tokens, (
                f"{rid}: planned {req.planned_computed} of {req.planned_tokens}, computed {req.num_computed}")
            assert req.num_tokens <= req.planned_tokens <= req.num_tokens + len(self._in_flight), (
                f"{rid}: {req.pending_samples} pending samples with {len(self._in_flight)} plans in flight")
            assert slots.mapped[req.slot] >= self._groups(req.planned_computed), (
                f"{rid}: {req.planned_computed} planned tokens but slot {req.slot} has {slots.mapped[req.slot]} groups")
            # Shared pages are never written: every group it may still write is its own.
            first = req.num_computed * self._tb // self._pb
            for j, gid in enumerate(slots.groups[req.slot][first:], first):
                assert len(slots.holders[gid]) == 1, f"{rid} will write group {j} of slot {req.slot}, which is shared"
        for rid, req in self._requests.items():
            assert len(req.output_token_ids) < req.params.max_tokens, f"{rid} should have finished"
            assert self._groups(req.max_kv_tokens) <= self._capacity.nominal, f"{rid} can never fit"
            assert req.sent or req.num_computed == (req.prefix_hit if req.slot is not None else 0), (
                f"{rid} computed tokens before workers knew it")
