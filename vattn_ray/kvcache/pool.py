"""`PagePool`: every physical page of a shard, created once at start-up, handed out by id.

Hot path: `take`/`give` are list operations; no page is created or released after start-up, so
the cost of `cuMemCreate`/`cuMemRelease` never lands on a step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
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
        check_partition(range(self.num_pages), (("free list", self._free), ("mapped", in_use)))

    def close(self) -> None:
        """Release every page (all must be unmapped)."""
        handles, self.handles, self._free = self.handles, [], []
        for handle in handles:
            self.memory.release(handle)


def check_partition(pages: Collection[int], groups: Iterable[tuple[str, Iterable[int]]],
                    holder: Sequence[str] | None = None) -> None:
    """Every page id of `pages` is listed by exactly one of `groups` ((name, ids) pairs), and no
    other id is; with `holder`, each page's recorded holder is also the name of the group listing
    it. Raise AssertionError saying which page breaks it."""
    seen: dict[int, str] = {}
    for name, ids in groups:
        for pid in ids:
            if pid not in pages:
                raise AssertionError(f"page id {pid} ({name!r}) is not one of the pool's {len(pages)} pages")
            if pid in seen:
                raise AssertionError(f"page {pid} appears in {seen[pid]!r} and again in {name!r}")
            if holder is not None and holder[pid] != name:
                raise AssertionError(f"page {pid} is listed by {name!r} but held by {holder[pid]!r}")
            seen[pid] = name
    if len(seen) != len(pages):
        missing = sorted(set(pages) - seen.keys())
        example = [(p, holder[p]) for p in missing[:4]] if holder is not None else missing[:8]
        raise AssertionError(f"{len(missing)} pages are listed nowhere (leaked), e.g. {example}")
