"""`KVStats`: what an operator wants to know about one shard's KV memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVStats:
    """A snapshot of one shard's KV pool; cumulative counters count since start-up."""

    groups_total: int
    groups_mapped: int
    groups_free: int
    bytes_mapped: int  # physical bytes mapped into slots
    bytes_live: int | None  # bytes holding live tokens (None when live token counts were not given)
    groups_mapped_total: int  # page groups mapped since start-up
    groups_unmapped_total: int
    map_seconds: float  # host time spent mapping (map + set_access), cumulative
    unmap_seconds: float  # host time spent unmapping, cumulative

    @property
    def fragmentation(self) -> float | None:
        """Internal fragmentation: the share of mapped bytes that hold no live token."""
        if self.bytes_live is None or self.bytes_mapped == 0:
            return None
        return 1.0 - self.bytes_live / self.bytes_mapped
