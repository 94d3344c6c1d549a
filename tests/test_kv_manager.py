"""KVManager tests: run on HostVMM here and, through tests/gpu/test_kv_cuda.py, on CudaVMM.

Layouts are sized from the backend's page, so the same scenarios run with 4 KiB host pages and
2 MiB GPU pages. Every scenario ends with `check_integrity` against the scheduler's view.
"""

from __future__ import annotations

import pytest
import torch

from vattn_ray.kvcache.backend import PhysicalMemory
from vattn_ray.kvcache.host import HostVMM
from vattn_ray.kvcache.manager import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.plan import KVFailure, KVOp

HOST_PAGE = 4096
NUM_LAYERS = 4
HEADS, HEAD_DIM = 2, 8
DTYPE = torch.float32


@pytest.fixture
def memory():
    mem = HostVMM(page_bytes=HOST_PAGE)
    yield mem
    mem.close()


def make_layout(page_bytes: int, g: int = 1, max_slots: int = 4, pages_per_slot: int = 4) -> KVLayout:
    token_bytes = g * HEADS * HEAD_DIM * DTYPE.itemsize
    return KVLayout.build(num_layers=NUM_LAYERS, layers_per_tensor=g, num_kv_heads=HEADS,
                          head_dim=HEAD_DIM, itemsize=DTYPE.itemsize, page_bytes=page_bytes,
                          max_slots=max_slots, max_model_len=pages_per_slot * page_bytes // token_bytes)


def make_manager(memory: PhysicalMemory, groups: int, g: int = 1, **kw) -> KVManager:
    return KVManager(make_layout(memory.page_bytes, g, **kw), memory, groups, DTYPE)


def tokens(m: KVManager, groups: int) -> int:
    """Tokens fully inside the first `groups` page groups of a slot."""
    return int(groups * m.layout.tokens_per_group)


def fill_slot(m: KVManager, slot: int, groups: int, tag: float) -> None:
    """Write a distinct value per (layer, K/V) over the slot's mapped tokens."""
    n = tokens(m, groups)
    for layer in range(m.layout.num_layers):
        k, v = m.layer_kv(layer)
        k[slot, :n].fill_(tag + 2 * layer)
        v[slot, :n].fill_(tag + 2 * layer + 1)


def assert_slot(m: KVManager, slot: int, groups: int, tag: float) -> None:
    n = tokens(m, groups)
    for layer in range(m.layout.num_layers):
        k, v = m.layer_kv(layer)
        assert torch.all(k[slot, :n].cpu() == tag + 2 * layer), f"K of layer {layer}, slot {slot}"
        assert torch.all(v[slot, :n].cpu() == tag + 2 * layer + 1), f"V of layer {layer}, slot {slot}"


@pytest.mark.parametrize("g", [1, 2, NUM_LAYERS])
def test_grow_shrink_free_keep_data_and_accounting(memory, g):
    with make_manager(memory, groups=8, g=g) as m:
        assert m.apply([KVOp(0, 2), KVOp(1, 3)]) == []
        assert (m.mapped_groups(0), m.mapped_groups(1), m.free_groups()) == (2, 3, 3)
        fill_slot(m, 0, 2, 10.0)
        fill_slot(m, 1, 3, 100.0)
        m.check_integrity({0: 2, 1: 3})
        assert m.apply([KVOp(1, 1), KVOp(2, 4)]) == []  # shrink one neighbour, grow another
        assert_slot(m, 0, 2, 10.0)
        assert_slot(m, 1, 1, 100.0)
        m.check_integrity({0: 2, 1: 1, 2: 4})
        assert m.apply([KVOp(1, 0), KVOp(2, 0), KVOp(0, 4)]) == []
        assert_slot(m, 0, 2, 10.0)  # growing a slot keeps what it held
        assert m.free_groups() == 4
        m.check_integrity({0: 4})


@pytest.mark.parametrize("g", [1, 2, NUM_LAYERS])
def test_layers_and_k_v_do_not_alias_and_views_agree(memory, g):
    with make_manager(memory, groups=4, g=g) as m:
        m.apply([KVOp(3, 2)])
        fill_slot(m, 3, 2, 0.0)
        assert_slot(m, 3, 2, 0.0)
        n = tokens(m, 2)
        lay = m.layout
        for layer in range(lay.num_layers):
            t, pos = lay.tensor_index(layer, "v")
            k, v = m.layer_kv(layer)
            assert v.shape == (lay.max_slots, lay.max_tokens_per_slot, HEADS, HEAD_DIM)
            assert m.layer_kv(layer)[0] is k and m.layer_kv(layer)[1] is v  # cached objects
            assert torch.all(m.tensors[t][3, :n, pos].cpu() == 2 * layer + 1)
        # A fresh wrap of slot 3's range in the last tensor sees the same bytes.
        last = lay.num_tensors - 1
        va = m.tensors[last].data_ptr() + 3 * lay.slot_bytes
        again = memory.wrap(va, (n, g, HEADS, HEAD_DIM), (g * HEADS * HEAD_DIM, HEADS * HEAD_DIM,
                                                         HEAD_DIM, 1), DTYPE)
        again[n - 1, g - 1, HEADS - 1, HEAD_DIM - 1] = -9.0
        assert m.layer_kv(lay.num_layers - 1)[1][3, n - 1, HEADS - 1, HEAD_DIM - 1].item() == -9.0
        m.check_integrity({3: 2})


def test_exhaustion_returns_a_failure_and_maps_nothing(memory):
    with make_manager(memory, groups=3) as m:
        fails = m.apply([KVOp(0, 2), KVOp(1, 2), KVOp(2, 1)])
        assert len(fails) == 1
        f = fails[0]
        assert isinstance(f, KVFailure) and (f.rank, f.slot, f.num_groups) == (0, 1, 2)
        assert "out of pages" in f.reason
        assert m.mapped_groups(1) == 0 and m.free_groups() == 0
        m.check_integrity({0: 2, 2: 1})
        # Shrinks listed before grows free the pages those grows need.
        assert m.apply([KVOp(0, 0), KVOp(1, 2)]) == []
        m.check_integrity({1: 2, 2: 1})
        assert m.stats().groups_free == 0


def test_ops_are_idempotent(memory):
    with make_manager(memory, groups=4) as m:
        ops = [KVOp(0, 2), KVOp(1, 1)]
        m.apply(ops)
        fill_slot(m, 0, 2, 5.0)
        before = m.stats()
        assert m.apply(ops) == []
        after = m.stats()
        assert after.groups_mapped_total == before.groups_mapped_total == 3
        assert_slot(m, 0, 2, 5.0)
        m.check_integrity({0: 2, 1: 1})


def test_invalid_ops_raise_before_changing_anything(memory):
    with make_manager(memory, groups=4) as m:
        per_slot = m.layout.pages_per_slot
        for bad in (KVOp(0, per_slot + 1), KVOp(m.layout.max_slots, 1), KVOp(-1, 1), KVOp(0, -1)):
            with pytest.raises(ValueError, match="invalid KVOp"):
                m.apply([KVOp(1, 1), bad])
            with pytest.raises(ValueError, match="invalid KVOp"):
                m.prefetch([bad])
        m.check_integrity({})


def test_prefetch_maps_in_the_background_then_wait_reports_failures(memory):
    with make_manager(memory, groups=4) as m:
        m.prefetch([KVOp(0, 2), KVOp(1, 1)])
        assert m.wait_prefetch() == []
        assert (m.mapped_groups(0), m.mapped_groups(1)) == (2, 1)
        fill_slot(m, 0, 2, 1.0)
        m.prefetch([KVOp(2, 2)])  # only one group left
        assert m.wait_prefetch()[0].slot == 2
        assert m.wait_prefetch() == []  # a failure is reported once
        # apply joins a pending prefetch first; that prefetch's failures wait for wait_prefetch.
        m.prefetch([KVOp(1, 2), KVOp(3, 1)])
        assert m.apply([KVOp(1, 0)]) == []
        assert [f.slot for f in m.wait_prefetch()] == [3]
        assert_slot(m, 0, 2, 1.0)
        m.check_integrity({0: 2})


def test_prefetch_runs_on_another_thread(memory):
    import threading

    seen: list[str] = []
    real_map = memory.map

    def spy(va, handle):  # records the thread; the real mapping still happens
        seen.append(threading.current_thread().name)
        real_map(va, handle)

    memory.map = spy
    with make_manager(memory, groups=2) as m:
        seen.clear()
        m.prefetch([KVOp(0, 1)])
        m.wait_prefetch()
        assert seen and all(name.startswith("kv-prefetch") for name in seen)
        m.check_integrity({0: 1})


def test_check_integrity_catches_corruption(memory):
    with make_manager(memory, groups=4) as m:
        m.apply([KVOp(0, 2)])
        with pytest.raises(AssertionError, match="expects 3"):
            m.check_integrity({0: 3})
        with pytest.raises(AssertionError, match="slot 1 has 0 page groups mapped, the scheduler expects 1"):
            m.check_integrity({0: 2, 1: 1})
        with pytest.raises(AssertionError, match="slot 0 has 2 page groups mapped, the scheduler expects 0"):
            m.check_integrity({})
        mapped_page = m._slots[0][0][0]
        m._pool._free.append(mapped_page)  # a page both mapped and free
        with pytest.raises(AssertionError, match=f"page {mapped_page} appears"):
            m.check_integrity({0: 2})
        m._pool._free.pop()
        leaked = m._pool._free.pop()  # a page neither free nor mapped
        with pytest.raises(AssertionError, match="leaked"):
            m.check_integrity({0: 2})
        m._pool._free.append(leaked)
        m.check_integrity({0: 2})


def test_stats_report_occupancy_fragmentation_and_counters(memory):
    with make_manager(memory, groups=6) as m:
        lay = m.layout
        m.apply([KVOp(0, 2), KVOp(1, 1)])
        m.apply([KVOp(1, 0)])
        live = {0: int(1.5 * lay.tokens_per_group)}
        s = m.stats(live)
        assert (s.groups_total, s.groups_mapped, s.groups_free) == (6, 2, 4)
        assert s.bytes_mapped == 2 * lay.page_group_bytes
        assert s.bytes_live == live[0] * lay.token_bytes * lay.num_tensors
        assert s.fragmentation == pytest.approx(0.25, abs=0.01)
        assert (s.groups_mapped_total, s.groups_unmapped_total) == (3, 1)
        assert s.map_seconds > 0 and s.unmap_seconds > 0
        assert m.stats().bytes_live is None and m.stats().fragmentation is None
        m.check_integrity({0: 2})


def test_from_budget_sizes_the_pool_and_rejects_too_small_budgets(memory):
    lay = make_layout(memory.page_bytes, g=2)
    with KVManager.from_budget(lay, memory.device, 5 * lay.page_group_bytes + 1, DTYPE) as m:
        assert m.num_page_groups == 5 and m.free_groups() == 5
        assert type(m.memory) is type(memory)
        assert m.apply([KVOp(0, 4), KVOp(1, 1)]) == []
        fill_slot(m, 0, 4, 3.0)
        assert_slot(m, 0, 4, 3.0)
        assert m.apply([KVOp(2, 1)])[0].slot == 2
        m.check_integrity({0: 4, 1: 1})
    with pytest.raises(ValueError, match="less than one page group"):
        KVManager.from_budget(lay, memory.device, lay.page_group_bytes - 1, DTYPE)


def test_manager_rejects_a_mismatched_dtype_or_page_size(memory):
    lay = make_layout(memory.page_bytes)
    with pytest.raises(ValueError, match="element"):
        KVManager(lay, memory, 2, torch.bfloat16)
    bigger = make_layout(2 * memory.page_bytes)
    with pytest.raises(ValueError, match="page"):
        KVManager(bigger, memory, 2, DTYPE)


def test_close_unmaps_and_releases_everything_and_is_idempotent(memory):
    m = make_manager(memory, groups=3)
    m.apply([KVOp(0, 1), KVOp(2, 2)])
    fill_slot(m, 2, 2, 4.0)
    m.prefetch([KVOp(1, 0)])
    m.close()
    m.close()
    assert m.tensors == [] and m._pool.num_pages == 0
    # Everything went back: a new manager on the same backend gets the full pool again.
    with make_manager(memory, groups=3) as again:
        assert again.free_groups() == 3
        again.check_integrity({})
