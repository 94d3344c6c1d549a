"""Scheduler limits and recovery: a transient KV failure does not shrink the capacity for good,
nor drop a request; the waiting queue is bounded (`max_queued_requests`); and the decode-graph
path refuses the one-token, non-sampling prefill chunks a small token budget produces."""

from __future__ import annotations

import pytest

from vattn_ray.config import SchedulerConfig
from vattn_ray.scheduler import QueueFull, Scheduler
from vattn_ray.scheduler.capacity import BASE_WAIT, MAX_FAILED_PROBES
from workers.cuda_graph import DecodeGraphs
from test_scheduler import Harness, assert_matches_reference, make_layout, make_scheduler, params, prompt


def test_a_transient_kv_failure_lowers_capacity_only_for_a_while():
    h = Harness(make_scheduler(capacity=64, max_num_seqs=4, budget=32, max_model_len=64))
    reqs = [(f"r{i}", prompt(9 + i, i), params(max_tokens=6)) for i in range(3)]
    for r in reqs:
        h.add(*r)
    h.worker.fail_next_grow = True
    h.expect_in_sync = False
    h.step()
    lowered = h.sched.stats.capacity_groups
    assert h.sched.stats.num_kv_failures == 1 and lowered < 64
    h.run()
    assert_matches_reference(h, reqs)
    for _ in range(BASE_WAIT + 1):  # idle steps: the announced size is tried again, and holds
        h.step()
    assert h.sched.stats.capacity_groups == 64
    big = ("big", prompt(40, 9), params(max_tokens=20))  # needs 15 of the 16 groups of one slot
    h.add(*big)
    h.run()
    assert_matches_reference(h, [big])
    assert h.sched.stats.num_kv_failures == 1


def test_a_request_larger_than_a_lowered_estimate_waits_instead_of_being_aborted():
    # 15 groups: the request alone fills the cache; one transient failure lowers the estimate below it.
    h = Harness(make_scheduler(capacity=15, max_num_seqs=2, budget=64, max_model_len=64))
    req = ("r", prompt(40, 3), params(max_tokens=20))
    h.add(*req)
    h.expect_in_sync = False
    h.worker.fail_next_grow = True
    h.step()
    assert h.sched.stats.capacity_groups < 15
    h.run()
    assert h.finished["r"] == ("length", None), "recomputed once the estimate was raised again"
    assert_matches_reference(h, [req])


def test_a_shard_that_really_holds_less_is_believed_after_repeated_trials():
    h = Harness(make_scheduler(capacity=16, max_num_seqs=2, budget=32, max_model_len=64), worker_capacity=4)
    h.add("small", prompt(4, 1), params(max_tokens=5))  # 2 groups
    h.add("huge", prompt(40, 2), params(max_tokens=5))  # 11 groups: never fits the real shard
    h.run()
    assert h.finished["huge"] == ("abort", None)
    # The first descent (16 -> 11 -> 8 -> 7 groups) takes 3 failures, then one per trial of 16.
    assert h.sched.stats.num_kv_failures == 3 + MAX_FAILED_PROBES, "trials back off, they do not spin"
    assert h.sched.stats.capacity_groups < 16


def test_waiting_queue_is_bounded():
    cfg = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64, max_queued_requests=3)
    h = Harness(Scheduler(cfg, make_layout(2, 64), 64))
    for i in range(3):
        h.add(f"r{i}", prompt(4, i), params(max_tokens=4))
    with pytest.raises(QueueFull, match=r"max_queued_requests=3\); retry later"):
        h.add("r3", prompt(4, 3), params(max_tokens=4))
    assert issubclass(QueueFull, ValueError)  # the engine rolls back a refused request like any other
    h.step()  # two are admitted (two slots): room for two more in the queue
    for i in (3, 4):
        h.add(f"r{i}", prompt(4, i), params(max_tokens=4))
    h.run()
    assert set(h.finished) == {f"r{i}" for i in range(5)}


def test_decode_graphs_refuse_a_one_token_prefill_chunk():
    """max_num_seqs >= max_num_batched_tokens: a prompt is prefilled one token at a time, so a plan
    can hold only one-token chunks, some of which do not sample. The graphs compute logits for
    every row and the sampler gets one row per sampling chunk, so such a plan must not replay."""
    h = Harness(make_scheduler(capacity=64, max_num_seqs=4, budget=2, max_model_len=64))
    h.add("a", prompt(1, 1), params(max_tokens=6))  # decodes from its first step
    h.add("b", prompt(5, 2), params(max_tokens=3))  # prefilled in one-token chunks
    shapes = []
    while h.sched.has_unfinished():
        plan = h.step()
        if plan is not None and plan.seqs:
            shapes.append(plan.seqs)
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # `fits` reads only the bucket limit (no CUDA here)
    graphs.max_batch = 4
    offending = [s for s in shapes if all(len(c.token_ids) == 1 for c in s) and not all(c.sample for c in s)]
    assert offending, "the scheduler produces one-token, non-sampling chunks with this budget"
    assert not any(graphs.fits(s) for s in offending)
    decode_only = [s for s in shapes if all(len(c.token_ids) == 1 and c.sample for c in s)]
    assert decode_only and all(graphs.fits(s) for s in decode_only)
