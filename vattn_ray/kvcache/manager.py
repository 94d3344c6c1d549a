"""`KVManager`: one shard's virtual KV tensors, backed by pooled physical pages as ops say.

HOT PATH: `apply`, `prefetch` and `wait_prefetch` run every step. Keep them to list operations and
backend calls: no allocation of pages (the pool is filled at start-up), no logging per page, one
`set_access` per tensor per grown run (the CUDA call costs the same for 1 or 2000 pages).

Page group `j` of slot `s` is page `j` of slot `s` in every virtual tensor. The manager decides
nothing: which slot grows or shrinks, and when, is the scheduler's call; an op the pool cannot
serve comes back as a `KVFailure` with nothing mapped.

Prefix sharing: an op with `share_from` maps another slot's pages at this slot's range too (the
same physical page at two virtual addresses, `cuMemMap` of one handle twice on CUDA, two `mmap`s
of one memfd offset on the host). Each page counts its mappings and goes back to the pool when the
last one is unmapped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vattn_ray.kvcache.backend import PhysicalMemory
from vattn_ray.kvcache.pool import PagePool
from vattn_ray.kvcache.stats import KVStats
from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.plan import KVFailure, KVOp

logger = logging.getLogger(__name__)


class _RankLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):  # type: ignore[override]
        return f"[rank {self.extra['rank']}] {msg}", kwargs


class KVManager:
    """Virtual K/V tensors of one shard whose pages are mapped and unmapped by `KVOp`s."""

    def __init__(self, layout: KVLayout, memory: PhysicalMemory, num_page_groups: int,
                 dtype: torch.dtype, rank: int = 0, pool: PagePool | None = None) -> None:
        """`pool`: pages shared with other users of the device's memory (weights that may be lent
        to the cache, `vattn_ray/elastic/`), exactly `num_page_groups` groups of them; None: a
        pool of its own."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        if itemsize != layout.itemsize:
            raise ValueError(f"dtype {dtype} has {itemsize}-byte elements but the layout says "
                             f"{layout.itemsize}")
        if memory.page_bytes != layout.page_bytes:
            raise ValueError(f"backend pages are {memory.page_bytes} bytes but the layout's are "
                             f"{layout.page_bytes}")
        if num_page_groups < 1:
            raise ValueError(f"num_page_groups must be >= 1, got {num_page_groups}")
        self.layout = layout
        self.memory = memory
        self.num_page_groups = num_page_groups
        self.dtype = dtype
        self.rank = rank
        self._log = _RankLog(logger, {"rank": rank})
        self._owns_memory = False
        self._closed = False
        self._bases: list[int] = []
        self._slots: list[list[list[int]]] = [[] for _ in range(layout.max_slots)]
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._prefetch_failures: list[KVFailure] = []
        self._groups_mapped = self._groups_unmapped = 0
        self._map_s = self._unmap_s = 0.0
        if pool is not None and pool.num_pages != num_page_groups * layout.num_tensors:
            raise ValueError(f"a pool of {pool.num_pages} pages is not {num_page_groups} page groups "
                             f"of {layout.num_tensors} pages")
        self._pool = pool if pool is not None else PagePool(memory, num_page_groups * layout.num_tensors)
        # page id -> slots mapping it; ids index the pool's handles (a shared pool numbers them
        # across the device, see vattn_ray/elastic/pages.py)
        self._refs = [0] * len(self._pool.handles)
        try:
            for _ in range(layout.num_tensors):
                self._bases.append(memory.reserve(layout.tensor_bytes))
            self.tensors: list[torch.Tensor] = [self._wrap_tensor(t) for t in range(layout.num_tensors)]
        except BaseException:
            self.close()
            raise
        self._layer_views = [self._views_of_layer(i) for i in range(layout.num_layers)]
        self._log.info(
            "KV cache on %s: %d page groups (%.3f GiB) = %d tensors x %d-byte pages each, G=%d, "
            "%d slots x %d tokens, %.1f tokens a page group", memory.device, num_page_groups,
            num_page_groups * layout.page_group_bytes / 2**30, layout.num_tensors, layout.page_bytes,
            layout.layers_per_tensor, layout.max_slots, layout.max_tokens_per_slot,
            layout.tokens_per_group)

    @classmethod
    def from_budget(cls, layout: KVLayout, device: str | torch.device, budget_bytes: int,
                    dtype: torch.dtype, rank: int = 0) -> "KVManager":
        """As many page groups as `budget_bytes` holds, on CudaVMM (cuda) or HostVMM (cpu)."""
        groups = budget_bytes // layout.page_group_bytes
        if groups < 1:
            raise ValueError(
                f"KV budget of {budget_bytes} bytes is less than one page group ({layout.page_group_bytes}"
                f" bytes = {layout.num_tensors} tensors x {layout.page_bytes}-byte pages); raise the "
                "budget or kv_layers_per_tensor")
        device = torch.device(device)
        if device.type == "cuda":
            from vattn_ray.kvcache.cuda import CudaVMM

            memory: PhysicalMemory = CudaVMM(device, page_bytes=layout.page_bytes)
        elif device.type == "cpu":
            from vattn_ray.kvcache.host import HostVMM

            memory = HostVMM(page_bytes=layout.page_bytes)
        else:
            raise ValueError(f"no KV memory backend for device {device}; use cuda or cpu")
        try:
            manager = cls(layout, memory, groups, dtype, rank)
        except BaseException:
            memory.close()
            raise
        manager._owns_memory = True
        return manager

    # -- tensors --------------------------------------------------------------------------------
    def _wrap_tensor(self, t: int) -> torch.Tensor:
        """Wrap virtual tensor `t`, with a pool page lent to its first page while torch looks."""
        lay = self.layout
        g, h, d = lay.layers_per_tensor, lay.num_kv_heads, lay.head_dim
        shape = (lay.max_slots, lay.max_tokens_per_slot, g, h, d)
        strides = (lay.max_tokens_per_slot * g * h * d, g * h * d, h * d, d, 1)
        (page,) = self._pool.take(1)
        va = self._bases[t]
        self.memory.map(va, self._pool.handles[page])
        try:
            self.memory.set_access(va, lay.page_bytes)
            return self.memory.wrap(va, shape, strides, self.dtype)
        finally:
            self.memory.unmap(va, lay.page_bytes)
            self._pool.give([page])

    def _views_of_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        tk, gk = self.layout.tensor_index(layer, "k")
        tv, gv = self.layout.tensor_index(layer, "v")
        return self.tensors[tk][:, :, gk], self.tensors[tv][:, :, gv]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer`: [max_slots, max_tokens_per_slot, num_kv_heads, head_dim] views."""
        return self._layer_views[layer]

    # -- ops (hot path) -------------------------------------------------------------------------
    def apply(self, ops: Sequence[KVOp]) -> list[KVFailure]:
        """Apply `ops` in order, now; a pending prefetch is joined first (its failures are kept
        for `wait_prefetch`). Returns the ops the pool could not serve."""
        self._validate(ops)
        self._join()
        return self._apply_ops(ops)

    def prefetch(self, ops: Sequence[KVOp]) -> None:
        """Start applying `ops` on the background thread (mapping overlaps the running step)."""
        self._validate(ops)
        self._join()
        if not ops:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"kv-prefetch-{self.rank}",
                                                initializer=self.memory.bind_thread)
        self._pending = self._executor.submit(self._apply_ops, tuple(ops))

    def wait_prefetch(self) -> list[KVFailure]:
        """Join the background prefetch; return the failures of prefetches not yet reported."""
        self._join()
        failures, self._prefetch_failures = self._prefetch_failures, []
        return failures

    def join_prefetch(self) -> None:
        """Wait for a pending prefetch without taking its failures (the next step still reports them)."""
        self._join()

    def _join(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._prefetch_failures.extend(pending.result())

    def _validate(self, ops: Sequence[KVOp]) -> None:
        limit = self.layout.pages_per_slot
        for op in ops:
            if (not 0 <= op.slot < self.layout.max_slots or not 0 <= op.num_groups <= limit
                    or not -1 <= op.share_from < self.layout.max_slots or op.share_from == op.slot):
                raise ValueError(f"invalid {op}: slot must be in [0, {self.layout.max_slots}), "
                                 f"num_groups in [0, {limit}] and share_from -1 or another slot")

    def _apply_ops(self, ops: Sequence[KVOp]) -> list[KVFailure]:
        failures: list[KVFailure] = []
        synced = False
        for op in ops:
            with self._lock:
                have = len(self._slots[op.slot])
                if op.share_from >= 0:
                    if not synced and have:
                        self.memory.synchronize()  # as below: it may unmap pages kernels still read
                        synced = True
                    failure = self._share(op)
                    if failure is not None:
                        failures.append(failure)
                elif op.num_groups > have:
                    failure = self._grow(op, have)
                    if failure is not None:
                        failures.append(failure)
                elif op.num_groups < have:
                    if not synced:
                        # Kernels queued before this op may still read the pages going away.
                        self.memory.synchronize()
                        synced = True
                    self._shrink(op.slot, have, op.num_groups)
        return failures

    def _slot_va(self, t: int, slot: int, group: int) -> int:
        lay = self.layout
        return self._bases[t] + slot * lay.slot_bytes + group * lay.page_bytes

    def _grow(self, op: KVOp, have: int) -> KVFailure | None:
        n, num_t = op.num_groups - have, self.layout.num_tensors
        if self._pool.num_free < n * num_t:
            reason = (f"out of pages: slot {op.slot} needs {n} more page groups, "
                      f"{self._pool.num_free // num_t} free")
            self._log.info("KV op failed: %s", reason)
            return KVFailure(self.rank, op.slot, op.num_groups, reason)
        start = time.perf_counter()
        ids = self._pool.take(n * num_t)
        for pid in ids:
            self._refs[pid] = 1
        handles, page, mapped = self._pool.handles, self.layout.page_bytes, []
        try:
            for t in range(num_t):
                va0 = self._slot_va(t, op.slot, have)
                for j in range(n):
                    self.memory.map(va0 + j * page, handles[ids[j * num_t + t]])
                    mapped.append(va0 + j * page)
                self.memory.set_access(va0, n * page)
        except BaseException:
            for va in mapped:  # leave the slot as it was, then report the backend error
                self.memory.unmap(va, page)
            for pid in ids:
                self._refs[pid] = 0
            self._pool.give(ids)
            raise
        self._slots[op.slot].extend(ids[j * num_t:(j + 1) * num_t] for j in range(n))
        self._groups_mapped += n
        self._map_s += time.perf_counter() - start
        return None

    def _shrink(self, slot: int, have: int, want: int) -> None:
        start = time.perf_counter()
        n = have - want
        for t in range(self.layout.num_tensors):
            self.memory.unmap(self._slot_va(t, slot, want), n * self.layout.page_bytes)
        groups, refs = self._slots[slot], self._refs
        for group in groups[want:]:
            for pid in group:
                refs[pid] -= 1
                if not refs[pid]:
                    self._pool.give((pid,))
        del groups[want:]
        self._groups_unmapped += n
        self._unmap_s += time.perf_counter() - start

    def _share(self, op: KVOp) -> KVFailure | None:
        """Make `op.slot` hold exactly the first `op.num_groups` page groups of `op.share_from`."""
        mine, theirs = self._slots[op.slot], self._slots[op.share_from]
        if len(theirs) < op.num_groups:
            reason = (f"slot {op.share_from} holds {len(theirs)} page groups, {op.num_groups} were to be "
                      f"shared with slot {op.slot}")
            self._log.info("KV op failed: %s", reason)
            return KVFailure(self.rank, op.slot, op.num_groups, reason)
        common = 0
        while common < min(len(mine), op.num_groups) and mine[common] == theirs[common]:
            common += 1
        if common < len(mine):
            self._shrink(op.slot, len(mine), common)
        n = op.num_groups - common
        if n <= 0:
            return None
        start = time.perf_counter()
        handles, page, num_t = self._pool.handles, self.layout.page_bytes, self.layout.num_tensors
        mapped = []
        try:
            for t in range(num_t):
                va0 = self._slot_va(t, op.slot, common)
                for j in range(n):
                    self.memory.map(va0 + j * page, handles[theirs[common + j][t]])
                    mapped.append(va0 + j * page)
                self.memory.set_access(va0, n * page)
        except BaseException:
            for va in mapped:
                self.memory.unmap(va, page)
            raise
        for group in theirs[common:op.num_groups]:
            for pid in group:
                self._refs[pid] += 1
            mine.append(group)  # the same list of page ids: groups are never changed in place
        self._groups_mapped += n
        self._map_s += time.perf_counter() - start
        return None

    def is_shared(self, slot: int, group: int) -> bool:
        """Whether page group `group` of `slot` is mapped in another slot too."""
        with self._lock:
            groups = self._slots[slot]
            return group < len(groups) and self._refs[groups[group][0]] > 1

    def shares_pages(self, slot: int, other: int, group: int) -> bool:
        """Whether page group `group` of two slots is the same physical memory."""
        with self._lock:
            a, b = self._slots[slot], self._slots[other]
            return group < len(a) and group < len(b) and a[group] == b[group]

    # -- accounting -----------------------------------------------------------------------------
    def free_groups(self) -> int:
        """Page groups this shard can still map."""
        with self._lock:
            return self._pool.num_free // self.layout.num_tensors

    def mapped_groups(self, slot: int) -> int:
        """Page groups backing `slot` now."""
        with self._lock:
            return len(self._slots[slot])

    def check_integrity(self, expected: Mapping[int, int | Sequence[int]] | None = None) -> None:
        """Raise AssertionError unless pool, mappings, reference counts and `expected` agree.

        `expected` maps a slot to its number of page groups, or to the scheduler's ids of them:
        then slots must share a physical page group exactly where the scheduler's ids are equal.
        """
        self._join()
        num_t, lay = self.layout.num_tensors, self.layout
        with self._lock:
            counts: dict[int, int] = {}
            for slot, groups in enumerate(self._slots):
                if len(groups) > lay.pages_per_slot:
                    raise AssertionError(f"slot {slot} has {len(groups)} page groups, more than "
                                         f"the {lay.pages_per_slot} a slot holds")
                for group in groups:
                    if len(group) != num_t:
                        raise AssertionError(f"slot {slot} has a page group of {len(group)} pages, "
                                             f"not {num_t}")
                    for pid in group:
                        counts[pid] = counts.get(pid, 0) + 1
            for pid, refs in enumerate(self._refs):
                if refs != counts.get(pid, 0):
                    raise AssertionError(f"page {pid} counts {refs} mappings but {counts.get(pid, 0)} "
                                         "slots map it")
            in_use = list(counts)
            self._pool.check_integrity(in_use)
            mapped = len(in_use) // num_t
            if len(in_use) % num_t or self._pool.num_free % num_t or mapped + self._pool.num_free // num_t != self.num_page_groups:
                raise AssertionError(f"{mapped} mapped + {self._pool.num_free} free pages / {num_t} "
                                     f"!= {self.num_page_groups} page groups")
            if expected is not None:
                for slot in expected:
                    if not 0 <= slot < lay.max_slots:
                        raise AssertionError(f"expected names slot {slot}, outside [0, {lay.max_slots})")
                ids: dict[object, tuple[int, ...]] = {}  # scheduler id -> page group, one to one
                for slot, groups in enumerate(self._slots):
                    want = expected.get(slot, 0)
                    gids = None if isinstance(want, int) else tuple(want)
                    n = len(gids) if gids is not None else want
                    if len(groups) != n:
                        raise AssertionError(f"slot {slot} has {len(groups)} page groups mapped, "
                                             f"the scheduler expects {n}")
                    for j, gid in enumerate(gids or ()):
                        group = tuple(groups[j])
                        if ids.setdefault(gid, group) != group:
                            raise AssertionError(f"group {j} of slot {slot} is not the page group the "
                                                 f"scheduler shares as id {gid}")
                if len(set(ids.values())) != len(ids):
                    raise AssertionError("two page groups the scheduler keeps apart are one on this shard")

    def stats(self, live_tokens: Mapping[int, int] | None = None) -> KVStats:
        """Pool occupancy and mapping counters; `live_tokens` (slot -> tokens) adds live bytes."""
        lay = self.layout
        with self._lock:
            free = self._pool.num_free // lay.num_tensors
            mapped = self.num_page_groups - free  # distinct groups: a shared one counts once
            live = None
            if live_tokens is not None:
                live = sum(live_tokens.values()) * lay.token_bytes * lay.num_tensors
            return KVStats(self.num_page_groups, mapped, free, mapped * lay.page_group_bytes, live,
                           self._groups_mapped, self._groups_unmapped, self._map_s, self._unmap_s)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every slot, release every page and reservation; the tensors must not be used after."""
        if self._closed:
            return
        self._closed = True
        try:
            self._join()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
        self.tensors, self._layer_views = [], []
        self.memory.synchronize()
        for slot, groups in enumerate(self._slots):
            if groups:
                self._shrink(slot, len(groups), 0)
        self._pool.close()
        for va in self._bases:
            self.memory.free_range(va, self.layout.tensor_bytes)
        self._bases = []
        if self._owns_memory:
            self.memory.close()
        self._log.info("KV cache closed: %d page groups mapped and %d unmapped in its lifetime",
                       self._groups_mapped, self._groups_unmapped)

    def __enter__(self) -> "KVManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown or a half-built manager: nothing left to save
            pass
