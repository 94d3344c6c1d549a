"""The page-group books: which request owns each KV slot and which page groups back it. Pure Python.

The workers' KV managers hold the real mappings and converge to these books by applying the
scheduler's KV ops. A page group is named here by a *group id* (gid), a label only the head uses: a
slot is backed by a list of gids, group `j` of the slot being gid `groups[slot][j]`. A gid may back
the same position `j` of several slots (prefix sharing: every shard maps one physical page group at
several virtual ranges), so each gid counts its holders, and the pool holds one page group per gid in
use whatever its holder count.

A slot without an owner keeps its groups (an *idle* slot, vAttention's deferred reclamation): the next
request placed there maps nothing, and the groups whose contents are known (registered under the hash
of their tokens) are the prefix cache. A group is *idle* when no owned slot holds it: reclaiming it is
free of cost to running requests.
"""

from __future__ import annotations

import bisect


class PageGroupBooks:
    """Owners and page groups of `num_slots` slots sharing a pool of `capacity` page groups."""

    def __init__(self, num_slots: int, capacity: int) -> None:
        self.num_slots = num_slots
        self.capacity = capacity
        self.groups: list[list[int]] = [[] for _ in range(num_slots)]
        self.mapped = [0] * num_slots  # len(groups[s]), read on the hot path
        self.owner: list[str | None] = [None] * num_slots
        self.holders: dict[int, set[int]] = {}  # gid in use -> slots mapping it
        self._owned_holders: dict[int, int] = {}  # gid in use -> owned slots among its holders
        self.total_mapped = 0  # gids in use: what the pool holds
        self.idle_groups = 0  # gids in use held by unowned slots only
        self.num_owned = 0
        # Page groups every shard was told to map / unmap since start-up (rates for operators).
        self.groups_mapped_total = 0
        self.groups_unmapped_total = 0
        self._next_gid = 0
        self._free_gids: list[int] = []
        # Unowned slots as sorted (groups, slot): best fit and largest first in O(log n).
        self._unowned: list[tuple[int, int]] = [(0, s) for s in range(num_slots)]
        # Unowned slots, least recently used first (dicts keep insertion order).
        self._lru: dict[int, None] = dict.fromkeys(range(num_slots))
        # The prefix cache: the hash of a group's tokens (and of all before it) -> the gid holding
        # them, and back. Only gids in use are registered.
        self.cached: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def free_groups(self) -> int:
        """Groups neither mapped to a slot nor promised to one (may be < 0 after capacity shrinks)."""
        return self.capacity - self.total_mapped

    def has_unowned(self) -> bool:
        return self.num_owned < self.num_slots

    # ------------------------------------------------------------------ mapping

    def set_groups(self, slot: int, num_groups: int) -> None:
        """Back `slot` by exactly `num_groups` groups: drop its last ones, or append fresh ones."""
        old = self.mapped[slot]
        if num_groups < old:
            self._drop(slot, num_groups)
        elif num_groups > old:
            owned = self.owner[slot] is not None
            gids = self.groups[slot]
            for _ in range(num_groups - old):
                gid = self._free_gids.pop() if self._free_gids else self._new_gid()
                gids.append(gid)
                self._hold(gid, slot, owned)
            self._resize(slot, old, num_groups)
            self.groups_mapped_total += num_groups - old

    def alias(self, slot: int, src: int, num_groups: int) -> None:
        """Back `slot` by exactly the first `num_groups` groups of `src` (the same page groups)."""
        assert slot != src and self.mapped[src] >= num_groups, f"slot {src} does not hold {num_groups} groups"
        mine, theirs = self.groups[slot], self.groups[src]
        common = 0
        limit = min(len(mine), num_groups)
        while common < limit and mine[common] == theirs[common]:
            common += 1
        self._drop(slot, common)
        owned = self.owner[slot] is not None
        for gid in theirs[common:num_groups]:
            mine.append(gid)
            self._hold(gid, slot, owned)
        self._resize(slot, common, num_groups)
        self.groups_mapped_total += num_groups - common

    def _new_gid(self) -> int:
        self._next_gid += 1
        return self._next_gid - 1

    def _hold(self, gid: int, slot: int, owned: bool) -> None:
        holders = self.holders.get(gid)
        if holders is None:
            self.holders[gid] = {slot}
            self._owned_holders[gid] = 0
            self.total_mapped += 1
            self.idle_groups += 1
        else:
            holders.add(slot)
        if owned:
            self._own(gid, 1)

    def _drop(self, slot: int, keep: int) -> None:
        gids = self.groups[slot]
        old = len(gids)
        if keep >= old:
            return
        owned = self.owner[slot] is not None
        for gid in gids[keep:]:
            if owned:
                self._own(gid, -1)
            holders = self.holders[gid]
            holders.discard(slot)
            if not holders:  # the last mapping is gone: the page group returns to the pool
                del self.holders[gid], self._owned_holders[gid]
                self.total_mapped -= 1
                self.idle_groups -= 1
                self._free_gids.append(gid)
                h = self.hash_of.pop(gid, None)
                if h is not None:
                    del self.cached[h]
        del gids[keep:]
        self._resize(slot, old, keep)
        self.groups_unmapped_total += old - keep

    def _own(self, gid: int, delta: int) -> None:
        n = self._owned_holders[gid]
        self._owned_holders[gid] = n + delta
        if n == 0 and delta > 0:
            self.idle_groups -= 1
        elif n + delta == 0:
            self.idle_groups += 1

    def _resize(self, slot: int, old: int, new: int) -> None:
        self.mapped[slot] = new
        if self.owner[slot] is None:
            self._unowned.remove((old, slot))
            bisect.insort(self._unowned, (new, slot))

    # ------------------------------------------------------------------ owners

    def assign(self, slot: int, req_id: str) -> None:
        assert self.owner[slot] is None, f"slot {slot} already owned by {self.owner[slot]}"
        self._unowned.remove((self.mapped[slot], slot))
        del self._lru[slot]
        self.owner[slot] = req_id
        self.num_owned += 1
        for gid in self.groups[slot]:
            self._own(gid, 1)

    def release(self, slot: int) -> None:
        """The owner is gone; the slot keeps its groups until they are reclaimed."""
        assert self.owner[slot] is not None, f"slot {slot} is not owned"
        self.owner[slot] = None
        self.num_owned -= 1
        bisect.insort(self._unowned, (self.mapped[slot], slot))
        self._lru[slot] = None  # most recently used
        for gid in self.groups[slot]:
            self._own(gid, -1)

    def touch(self, slot: int) -> None:
        """`slot`'s groups were just reused: evict them last."""
        if slot in self._lru:
            del self._lru[slot]
            self._lru[slot] = None

    # ------------------------------------------------------------------ choosing slots

    def best_fit(self, need: int) -> int | None:
        """The unowned slot to give a request needing `need` groups now.

        The one with the fewest groups that still covers `need`; if none covers it, the one with
        the most groups (least new mapping). None when every slot is owned.
        """
        if not self._unowned:
            return None
        i = bisect.bisect_left(self._unowned, (need, -1))
        return self._unowned[i][1] if i < len(self._unowned) else self._unowned[-1][1]

    def empty_unowned(self) -> int | None:
        """An unowned slot holding no group (taking it destroys no cached group), if any."""
        if self._unowned and self._unowned[0][0] == 0:
            return self._unowned[0][1]
        return None

    def largest_idle(self) -> int | None:
        """The unowned slot holding the most groups (reclaimed first: fewest unmaps per group)."""
        if self._unowned and self._unowned[-1][0] > 0:
            return self._unowned[-1][1]
        return None

    def lru_idle(self) -> int | None:
        """The least recently used unowned slot that holds groups."""
        mapped = self.mapped
        for slot in self._lru:
            if mapped[slot]:
                return slot
        return None

    def first_shared(self, slot: int, start: int) -> int:
        """The first position >= `start` of `slot` whose group another slot also holds (else its count)."""
        gids, holders = self.groups[slot], self.holders
        for j in range(start, len(gids)):
            if len(holders[gids[j]]) > 1:
                return j
        return len(gids)

    # ------------------------------------------------------------------ the prefix cache

    def register(self, slot: int, start: int, hashes: list[bytes]) -> None:
        """Groups `start, start+1, ...` of `slot` hold the tokens hashed `hashes` (now computed)."""
        gids = self.groups[slot]
        for j, h in enumerate(hashes, start):
            gid = gids[j]
            if h not in self.cached and gid not in self.hash_of:
                self.cached[h] = gid
                self.hash_of[gid] = h

    def forget_from(self, slot: int, start: int) -> None:
        """Groups from `start` on of `slot` are about to be overwritten: they cache nothing any more."""
        for gid in self.groups[slot][start:]:
            h = self.hash_of.pop(gid, None)
            if h is not None:
                del self.cached[h]

    def lookup(self, hashes: list[bytes]) -> tuple[int, int | None]:
        """(m, slot): the first `m` groups of `hashes` are cached, all in `slot` (None if m == 0).

        A slot holding the cached group at position m-1 holds the whole chain before it: a group's
        hash covers every token before it, and slots are backed from position 0 up.
        """
        cached = self.cached
        m = 0
        for h in hashes:
            if h not in cached:
                break
            m += 1
        if m == 0:
            return 0, None
        holders = self.holders[cached[hashes[m - 1]]]
        unowned = [s for s in holders if self.owner[s] is None]
        return m, min(unowned) if unowned else min(holders)

    # ------------------------------------------------------------------ checks

    def check_integrity(self) -> None:
        """Raise AssertionError if the books contradict themselves."""
        assert len(self.mapped) == len(self.owner) == len(self.groups) == self.num_slots
        assert self.mapped == [len(g) for g in self.groups], "group counts out of sync with the group lists"
        holders: dict[int, set[int]] = {}
        for slot, gids in enumerate(self.groups):
            assert len(set(gids)) == len(gids), f"slot {slot} holds one group twice"
            for j, gid in enumerate(gids):
                holders.setdefault(gid, set()).add(slot)
        assert holders == self.holders, "group holders (reference counts) out of sync with the slots"
        for gid, slots in holders.items():
            positions = {self.groups[s].index(gid) for s in slots}
            assert len(positions) == 1, f"group {gid} backs different positions {positions}"
            owned = sum(1 for s in slots if self.owner[s] is not None)
            assert self._owned_holders[gid] == owned, f"group {gid}: owned holder count out of sync"
        assert self.total_mapped == len(holders), (
            f"total_mapped={self.total_mapped} but the slots hold {len(holders)} distinct groups")
        assert self.total_mapped <= self.capacity, (
            f"{self.total_mapped} groups mapped exceed capacity {self.capacity}")
        idle = sum(1 for gid in holders if self._owned_holders[gid] == 0)
        assert self.idle_groups == idle, f"idle group count {self.idle_groups} != {idle}"
        assert not set(self._free_gids) & holders.keys(), "a free group id is in use"
        expected = sorted((self.mapped[s], s) for s in range(self.num_slots) if self.owner[s] is None)
        assert self._unowned == expected, "unowned-slot index out of sync with the owners"
        assert set(self._lru) == {s for _, s in expected}, "LRU order out of sync with the owners"
        owned = [o for o in self.owner if o is not None]
        assert len(owned) == self.num_owned == len(set(owned)), "a request owns two slots"
        assert len(self.cached) == len(self.hash_of), "prefix index out of sync"
        for h, gid in self.cached.items():
            assert self.hash_of.get(gid) == h and gid in holders, f"cached group {gid} is not in use"
