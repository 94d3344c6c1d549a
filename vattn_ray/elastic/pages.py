"""`DevicePages`: every physical page of one device, each held by exactly one holder.

Holders are the KV cache ("kv"), one decoder layer's weights ("layer.<i>"), or nobody (free).
Pages never move by copy: a dropped layer's pages are unmapped from its weight range and handed to
the KV cache, which maps them into its own virtual tensors; a restored layer takes pages back.
Pages are created once (`create`) and released only at `close`, as in `PagePool`.

`HeldPool` is the KV cache's share, with the `PagePool` interface `KVManager` draws from.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vattn_ray.kvcache.backend import PhysicalMemory
from vattn_ray.kvcache.pool import PagePool, check_partition

FREE = ""


class DevicePages:
    """The physical pages of one device and who holds each."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        self.handles: list[Any] = []  # page id -> backend handle (shared with every holder)
        self.holder: list[str] = []  # page id -> holder name, FREE if none
        self._free: list[int] = []

    @property
    def num_pages(self) -> int:
        return len(self.handles)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def create(self, n: int) -> None:
        """Add `n` new free pages (start-up only: creating pages is slow on CUDA)."""
        for _ in range(n):
            self.handles.append(self.memory.create())
            self.holder.append(FREE)
            self._free.append(len(self.handles) - 1)

    def assign(self, n: int, holder: str) -> list[int]:
        """Give `n` free pages to `holder`; the caller checked `num_free`."""
        if n > len(self._free):
            raise RuntimeError(f"{holder} asked for {n} pages with {len(self._free)} free")
        ids = self._free[len(self._free) - n:] if n else []
        del self._free[len(self._free) - n:]
        for pid in ids:
            self.holder[pid] = holder
        return ids

    def free(self, ids: Iterable[int], holder: str) -> None:
        """`holder` gives pages back (they must be unmapped)."""
        for pid in ids:
            if self.holder[pid] != holder:
                raise RuntimeError(f"page {pid} is held by {self.holder[pid]!r}, not {holder!r}")
            self.holder[pid] = FREE
            self._free.append(pid)

    def held_by(self, holder: str) -> list[int]:
        return [pid for pid, h in enumerate(self.holder) if h == holder]

    def counts(self) -> dict[str, int]:
        """Pages per holder ("" = free)."""
        out: dict[str, int] = {}
        for h in self.holder:
            out[h] = out.get(h, 0) + 1
        return out

    def check_integrity(self, expected: dict[str, list[int]]) -> None:
        """Each page is held by the one holder that lists it (`expected`) or free; raise if not."""
        check_partition(range(self.num_pages), list(expected.items()) + [(FREE, self._free)], self.holder)

    def close(self) -> None:
        """Release every page (all must be unmapped)."""
        handles, self.handles, self.holder, self._free = self.handles, [], [], []
        for handle in handles:
            self.memory.release(handle)


class HeldPool(PagePool):
    """The KV cache's pages: a `PagePool` over pages of a `DevicePages`; `close` gives them back."""

    def __init__(self, pages: DevicePages, num_pages: int, holder: str = "kv") -> None:
        # No PagePool.__init__: the pages exist already and belong to `pages`.
        self.memory = pages.memory
        self.device_pages, self.holder_name = pages, holder
        self.handles = pages.handles  # indexed by global page id
        self._ids = pages.assign(num_pages, holder)
        self._free = list(self._ids)

    @property
    def num_pages(self) -> int:
        return len(self._ids)

    def check_integrity(self, in_use: Iterable[int]) -> None:
        """Every page of this pool (ids of the device's pages) is free or in `in_use`, exactly once."""
        check_partition(set(self._ids), (("free list", self._free), ("mapped", in_use)))

    def ids(self) -> list[int]:
        return list(self._ids)

    def close(self) -> None:
        """Give every page back to the device's pages (the KV manager unmapped them first)."""
        ids, self._ids, self._free = self._ids, [], []
        self.device_pages.free(ids, self.holder_name)
