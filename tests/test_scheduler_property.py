"""Property test: random add/step/abort/finish sequences against the scheduler AND a real KV manager.

Each plan's `kv_now` / `kv_prefetch` ops are applied to a `KVManager` over `HostVMM` (real demand
paging, 4 KiB pages, 4 tokens a page group). The fake model writes each chunk's token ids into the
K and V views of the slot and samples a checksum of the slot's tokens *read back from those views*,
so a request only matches its reference generation if its KV data survived every grow, shrink,
reuse and preemption of every slot. Prompts often start with one of a few shared prefixes (or repeat
another prompt whole), so with prefix caching on, slots share physical pages: a request then reads
KV that another request computed, through its own slot's view, and the worker checks that no
chunk ever writes a shared page. Pools are small, so cached groups are evicted and requests whose
prefix is shared are preempted. In some scenarios the scheduler is told the pool is larger than
it is, so `kv_now` ops fail for real and the recovery path runs. In some scenarios the head plans
one step ahead (`lookahead`): each plan runs on the worker before the head sees the previous output,
and decodes feed the worker's own last sample (`PREVIOUS_SAMPLE`), as in the engine's overlapped loop.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vattn_ray.config import SchedulerConfig
from vattn_ray.kvcache import HostVMM, KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler import SampledToken, Scheduler, StepOutput, StepPlan
from vattn_ray.scheduler.plan import PREVIOUS_SAMPLE
from test_scheduler import reference

VOCAB = 50  # small, so EOS and stop tokens are hit now and then
MAX_MODEL_LEN = 40
MAX_SLOTS = 4
LAYOUT = KVLayout.build(num_layers=2, layers_per_tensor=1, num_kv_heads=2, head_dim=128, itemsize=4,
                        page_bytes=4096, max_slots=MAX_SLOTS, max_model_len=MAX_MODEL_LEN)
TOKENS_PER_GROUP = 4
assert LAYOUT.groups_for_tokens(TOKENS_PER_GROUP) == 1 and LAYOUT.groups_for_tokens(5) == 2


def model(tokens: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % VOCAB


class KVWorker:
    """A single shard that obeys plans with a real KVManager and computes from its KV views."""

    def __init__(self, kv: KVManager) -> None:
        self.kv = kv
        self.carried: list = []  # prefetch failures not reported yet
        self.known: set[str] = set()  # requests whose NewRequest arrived (and not released since)
        self.last_sampled: dict[int, int] = {}  # slot -> token sampled there in its latest step
        self.last_executed = True

    def step(self, plan: StepPlan) -> StepOutput:
        if plan.follows_previous and not self.last_executed:
            return StepOutput(plan.step, (), (), executed=False)
        failures = self.carried + self.kv.wait_prefetch()
        self.carried = []
        now = self.kv.apply(plan.kv_now)
        self.last_executed = not now
        if now:
            return StepOutput(plan.step, (), tuple(failures + now), executed=False)
        self.known.difference_update(plan.finished)
        self.known.update(n.req_id for n in plan.new_requests)
        k_first, _ = self.kv.layer_kv(0)
        _, v_last = self.kv.layer_kv(LAYOUT.num_layers - 1)
        sampled = []
        for c in plan.seqs:
            assert c.req_id in self.known, f"{c.req_id} computed without its NewRequest"
            # Checked before touching memory: an unmapped page would fault, not fail the test.
            assert self.kv.mapped_groups(c.slot) >= LAYOUT.groups_for_tokens(c.end), (
                f"step {plan.step}: slot {c.slot} is not backed up to token {c.end}")
            first, last = c.start // TOKENS_PER_GROUP, (c.end - 1) // TOKENS_PER_GROUP
            assert not any(self.kv.is_shared(c.slot, g) for g in range(first, last + 1)), (
                f"step {plan.step}: {c.req_id} writes a page group shared with another slot")
            token_ids = [self.last_sampled[c.slot]] if c.token_ids == (PREVIOUS_SAMPLE,) else c.token_ids
            ids = torch.tensor(token_ids, dtype=torch.float32)
            k_first[c.slot, c.start:c.end, 0, 0] = ids
            v_last[c.slot, c.start:c.end, -1, -1] = ids + 1
            if c.sample:
                seen = k_first[c.slot, :c.end, 0, 0]
                assert torch.equal(v_last[c.slot, :c.end, -1, -1], seen + 1), "K and V disagree"
                tok = model([int(x) for x in seen.tolist()])
                self.last_sampled[c.slot] = tok
                sampled.append(SampledToken(c.req_id, tok))
        self.kv.prefetch(plan.kv_prefetch)
        return StepOutput(plan.step, tuple(sampled), tuple(failures))


@st.composite
def scenarios(draw):
    real_groups = draw(st.integers(4, 24))
    overstated = draw(st.sampled_from([0, 0, 0, 1, 3]))  # the scheduler believes in more groups
    others = draw(st.lists(st.integers(real_groups + overstated, 30), max_size=2))
    chunked = draw(st.booleans())
    config = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, MAX_SLOTS)),
        max_num_batched_tokens=draw(st.sampled_from([3, 8, 16, MAX_MODEL_LEN])) if chunked else MAX_MODEL_LEN,
        max_model_len=MAX_MODEL_LEN, enable_chunked_prefill=chunked,
        enable_prefix_caching=draw(st.sampled_from([True, True, True, False])))
    prefixes = [[(7 * p + 3 * j + 1) % VOCAB for j in range(24)] for p in range(2)]
    # Every request fits the real pool alone (prompt + max_tokens - 1 tokens of KV at most).
    limit = min(MAX_MODEL_LEN, real_groups * TOKENS_PER_GROUP + 1)
    requests = []
    for i in range(draw(st.integers(1, 7))):
        n = draw(st.integers(1, min(30, limit - 1)))
        max_tokens = draw(st.integers(1, min(12, limit - n)))
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.0, min_tokens=draw(st.integers(0, max_tokens)),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), max_size=1)))
        eos = tuple(draw(st.lists(st.integers(0, VOCAB - 1), max_size=2)))
        seed = draw(st.integers(0, 1000))
        tokens = [(seed + 13 * j) % VOCAB for j in range(n)]
        shared = draw(st.sampled_from(["none", "prefix", "prefix", "repeat"]))
        if shared == "prefix":  # a shared system prompt of some length, then its own tokens
            k = draw(st.integers(1, n))
            tokens = prefixes[draw(st.integers(0, 1))][:k] + tokens[k:]
        elif shared == "repeat" and requests:  # the same prompt again (n > 1 siblings, a retry)
            tokens = list(requests[draw(st.integers(0, len(requests) - 1))][1])[:n]
            tokens += [(seed + j) % VOCAB for j in range(n - len(tokens))]
        requests.append((f"r{i}", tokens, params, eos))
    events = draw(st.lists(st.one_of(
        st.just(("add", 0)), st.just(("step", 0)), st.just(("step", 0)),
        st.tuples(st.sampled_from(["abort", "finish", "abort_in_flight"]), st.integers(0, 6))),
        max_size=40))
    lookahead = draw(st.booleans())
    return real_groups, [real_groups + overstated] + others, config, requests, events, lookahead


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_scenarios_against_the_kv_manager(scenario):
    real_groups, capacities, config, requests, events, lookahead = scenario
    overstated = min(capacities) > real_groups
    kv = KVManager(LAYOUT, HostVMM(page_bytes=LAYOUT.page_bytes), real_groups, torch.float32)
    try:
        _run(Scheduler(config, LAYOUT, capacities), KVWorker(kv), kv, config, requests, events, overstated,
             lookahead)
    finally:
        kv.close()


def _run(sched, worker, kv, config, requests, events, overstated, lookahead=False):
    outputs: dict[str, list[int]] = {}
    finished: dict[str, tuple[str | None, int | None]] = {}
    ended: set[str] = set()  # aborted or finished by the engine: output is a prefix of the reference
    pending = list(requests)
    in_flight: list[tuple[StepPlan, StepOutput]] = []

    def step(abort_id: str | None = None) -> None:
        scheduled = False
        if not in_flight or (lookahead and sched.can_schedule()):
            plan = sched.schedule()
            assert plan.num_tokens <= config.max_num_batched_tokens
            assert len({c.slot for c in plan.seqs}) == len(plan.seqs) <= config.max_num_seqs
            if plan.seqs or plan.kv_now or plan.kv_prefetch or plan.finished:
                in_flight.append((plan, worker.step(plan)))
                scheduled = bool(plan.seqs)
        if abort_id is not None and sched.abort(abort_id):
            ended.add(abort_id)
        if not in_flight or (lookahead and scheduled and len(in_flight) == 1):
            sched.check_integrity()
            return
        plan, output = in_flight.pop(0)
        if not overstated:
            assert not output.kv_failures, f"a KV op failed with an honest capacity: {output.kv_failures}"
        for u in sched.update(plan, output):
            assert u.req_id not in finished and u.req_id not in ended, f"update after the end of {u.req_id}"
            outputs[u.req_id].extend(u.new_token_ids)
            if u.finished:
                finished[u.req_id] = (u.finish_reason, u.stop_reason)
        sched.check_integrity()
        if overstated:
            worker.carried += kv.wait_prefetch()
            kv.check_integrity()
            if output.executed and not output.kv_failures and not worker.carried and not in_flight:
                kv.check_integrity(sched.slot_group_ids())  # a clean step brings every shard in line
        else:
            kv.check_integrity(sched.slot_group_ids())

    def live(k: int) -> str | None:
        ids = [r[0] for r in requests if r[0] in outputs and r[0] not in finished and r[0] not in ended]
        return ids[k % len(ids)] if ids else None

    for kind, k in events:
        if kind == "add" and pending:
            req_id, prompt, params, eos = pending.pop(0)
            sched.add_request(req_id, prompt, params, eos)
            outputs[req_id] = []
        elif kind == "step":
            step()
        elif kind == "abort_in_flight":
            step(live(k))
        elif kind in ("abort", "finish") and (req_id := live(k)) is not None:
            if kind == "abort":
                assert sched.abort(req_id)
            else:
                sched.finish(req_id, "stop")
            ended.add(req_id)
            sched.check_integrity()
    for req_id, prompt, params, eos in pending:
        sched.add_request(req_id, prompt, params, eos)
        outputs[req_id] = []
    for _ in range(3000):
        if not sched.has_unfinished() and not in_flight:
            break
        step()
    assert not sched.has_unfinished(), "requests left unfinished: the scheduler stopped making progress"

    for req_id, prompt, params, eos in requests:
        expected, *how = reference(prompt, params, eos, model=model)
        if req_id in ended:
            assert outputs[req_id] == expected[:len(outputs[req_id])]
        else:
            assert outputs[req_id] == expected, f"{req_id}: tokens differ from the reference"
            assert finished[req_id] == tuple(how)
