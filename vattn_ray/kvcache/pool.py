"""`PagePool`: every physical page of a shard, created once at start-up, handed out by id.

Hot path: `take`/`give` are list operations; no page is created or released after start-up, so
the cost of `cuMemCreate`/`cuMemRelease` never lands on a step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vattn_ray.kvcache.backend import PhysicalMemory


class PagePool:
    """`num_pages` physical pages of `memory`; a page is named by its index (its page id)."""

    def __init__(self, memory: PhysicalMemory, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.memory = memory
        self.handles: list[Any] = []
        try:
            for _ in range(num_pages):
                self.handles.append(memory.create())
        except BaseException:
            self.close()
            raise
        # Popped from the end: the most recently returned page is reused first (warm in caches).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_pages(self) -> int:
        return len(self.handles)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        """Remove `n` free page ids from the pool; the caller checked `num_free` first."""
        if n > len(self._free):
            raise RuntimeError(f"page pool asked for {n} pages with {len(self._free)} free")
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return taken

    def give(self, page_ids: Iterable[int]) -> None:
        """Return page ids to the pool."""
        self._free.extend(page_ids)

    def check_integrity(self, in_use: Iterable[int]) -> None:
        """Every page is either free or in `in_use`, exactly once; raise AssertionError if not."""
        free = self._free
        used = list(in_use)
        seen: dict[int, str] = {}
        for where, ids in (("free list", free), ("mapped", used)):
            for pid in ids:
                if not 0 <= pid < self.num_pages:
                    raise AssertionError(f"page id {pid} ({where}) is outside the pool of {self.num_pages}")
                if pid in seen:
                    raise AssertionError(f"page {pid} appears in {seen[pid]} and again in {where}")
                seen[pid] = where
        if len(seen) != self.num_pages:
            missing = sorted(set(range(self.num_pages)) - seen.keys())
            raise AssertionError(f"{len(missing)} pages are neither free nor mapped (leaked), "
                                 f"e.g. {missing[:8]}")

    def close(self) -> None:
        """Release every page (all must be unmapped)."""
        handles, self.handles, self._free = self.handles, [], []
        for handle in handles:
            self.memory.release(handle)
