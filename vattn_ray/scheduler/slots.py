"""The slot table: which request owns each KV slot and how many page groups back it.

Pure Python accounting; the workers' KV managers hold the real mappings and converge to this table
by applying the scheduler's KV ops. A slot without an owner may still keep its page groups (an
*idle* slot, vAttention's deferred reclamation) so that the next request placed there maps nothing.
"""

from __future__ import annotations

import bisect


class SlotTable:
    """Owners and mapped page groups of `num_slots` slots sharing a pool of `capacity` groups."""

    def __init__(self, num_slots: int, capacity: int) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        self.mapped = [0] * num_slots
        self.owner: list[str | None] = [None] * num_slots
        self.total_mapped = 0
        self.idle_groups = 0  # groups held by unowned slots
        self.num_owned = 0
        # Page groups every shard was told to map / unmap since start-up (rates for operators).
        self.groups_mapped_total = 0
        self.groups_unmapped_total = 0
        # Unowned slots as sorted (mapped groups, slot): best fit and reclaim order in O(log n).
        self._unowned: list[tuple[int, int]] = [(0, s) for s in range(num_slots)]

    @property
    def free_groups(self) -> int:
        """Groups neither mapped to a slot nor promised to one (may be < 0 after capacity shrinks)."""
        return self.capacity - self.total_mapped

    def has_unowned(self) -> bool:
        return self.num_owned < self.num_slots

    def set_groups(self, slot: int, num_groups: int) -> None:
        """Account `slot` as backed by exactly `num_groups` groups."""
        old = self.mapped[slot]
        if old == num_groups:
            return
        if self.owner[slot] is None:
            self._unowned.remove((old, slot))
            bisect.insort(self._unowned, (num_groups, slot))
            self.idle_groups += num_groups - old
        self.mapped[slot] = num_groups
        self.total_mapped += num_groups - old
        if num_groups > old:
            self.groups_mapped_total += num_groups - old
        else:
            self.groups_unmapped_total += old - num_groups

    def best_fit(self, need: int) -> int | None:
        """The unowned slot to give a request needing `need` groups now.

        The one with the fewest groups that still covers `need`; if none covers it, the one with
        the most groups (least new mapping). None when every slot is owned.
        """
        if not self._unowned:
            return None
        i = bisect.bisect_left(self._unowned, (need, -1))
        return self._unowned[i][1] if i < len(self._unowned) else self._unowned[-1][1]

    def assign(self, slot: int, req_id: str) -> None:
        assert self.owner[slot] is None, f"slot {slot} already owned by {self.owner[slot]}"
        self._unowned.remove((self.mapped[slot], slot))
        self.idle_groups -= self.mapped[slot]
        self.owner[slot] = req_id
        self.num_owned += 1

    def release(self, slot: int) -> None:
        """The owner is gone; the slot keeps its groups until they are reclaimed."""
        assert self.owner[slot] is not None, f"slot {slot} is not owned"
        self.owner[slot] = None
        self.num_owned -= 1
        bisect.insort(self._unowned, (self.mapped[slot], slot))
        self.idle_groups += self.mapped[slot]

    def largest_idle(self, exclude: int | None = None) -> int | None:
        """The unowned slot holding the most groups (reclaimed first: fewest unmaps per group)."""
        for groups, slot in reversed(self._unowned):
            if groups == 0:
                return None
            if slot != exclude:
                return slot
        return None

    def check_integrity(self) -> None:
        """Raise AssertionError if the table contradicts itself."""
        assert len(self.mapped) == len(self.owner) == self.num_slots
        assert all(0 <= m for m in self.mapped), "negative group count"
        assert self.total_mapped == sum(self.mapped), (
            f"total_mapped={self.total_mapped} but slots sum to {sum(self.mapped)}")
        assert self.total_mapped <= self.capacity, (
            f"{self.total_mapped} groups mapped exceed capacity {self.capacity}")
        expected = sorted((self.mapped[s], s) for s in range(self.num_slots) if self.owner[s] is None)
        assert self._unowned == expected, "unowned-slot index out of sync with the slot table"
        assert self.idle_groups == sum(m for m, _ in expected), "idle group count out of sync"
        owned = [o for o in self.owner if o is not None]
        assert len(owned) == self.num_owned == len(set(owned)), "a request owns two slots"
