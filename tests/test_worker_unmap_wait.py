"""Before unmapping a slot's pages the worker waits only for the last launched step that uses the
slot, not for the whole device: a reused idle slot must not stall the overlap of head and device.

The events are stand-ins with CUDA events' `query`/`synchronize` (this machine has no GPU); the
worker's choice of which one to wait for, and of which slots an op unmaps (on a real host-twin KV
manager), is what is tested. tests/gpu/test_prefix_cuda.py runs the same path on CUDA.
"""

from __future__ import annotations

from collections import deque

import torch

from vattn_ray.scheduler.plan import KVOp
from tests.test_kv_manager import make_manager, memory  # noqa: F401 - fixture
from workers.worker import Worker


class StepEvent:
    def __init__(self, done: bool = False) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True


def worker_with(launched) -> Worker:
    w = Worker.__new__(Worker)
    w._launched = launched
    return w


def test_waits_for_the_last_step_using_the_slots_only():
    old, mid, last = StepEvent(), StepEvent(), StepEvent()
    w = worker_with(deque(
        [(old, frozenset({1, 2})), (mid, frozenset({2, 3})), (last, frozenset({4}))]))
    w._wait_for_slots({2})
    assert (old.waited, mid.waited, last.waited) == (False, True, False)  # mid covers old (one stream)
    w._wait_for_slots({7})  # an idle slot no launched step uses
    assert not last.waited and not old.waited
    w._wait_for_slots(set())
    assert not last.waited


def test_only_ops_that_unmap_count_as_shrinking(memory):  # noqa: F811
    w = worker_with(None)
    w.kv = make_manager(memory, groups=8, max_slots=4)
    w.kv.apply([KVOp(0, 2), KVOp(1, 1)])
    ops = (KVOp(0, 1),  # truncates: unmaps
           KVOp(1, 3),  # grows: unmaps nothing
           KVOp(2, 1, share_from=0),  # aliases into an empty slot: unmaps nothing
           KVOp(1, 1, share_from=0))  # replaces its own group by a shared one: unmaps
    assert w._shrinking(ops) == {0, 1}


def test_cpu_steps_leave_nothing_to_wait_for():
    w = worker_with(deque())
    w.device = torch.device("cpu")
    w._note_launched(None)
    assert not w._launched
