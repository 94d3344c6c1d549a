"""KV policy of the head scheduler: which slot a request gets, what it shares, what is reclaimed,
and the `KVOp`s that bring every shard in line with the books. Pure Python.

The books (`books.py`) say what every shard holds once all emitted ops are applied; this module
decides how they change and turns the changes of one step into ops, in an order every shard can
apply: first the *structural* ops of newly placed requests (a slot truncated to what it keeps, or
aliased to another slot's first groups), in the order they were decided, so an alias reads its
source before any later op of the step changes it; then the other slots' final group counts,
shrinks before grows, so pages return to a shard's pool before others take them. Structural ops
only unmap or add mappings of pages in use: they never take a page from the pool.

Prefix sharing (`enable_prefix_caching`) needs whole tokens in a page group (page bytes a multiple
of token bytes); otherwise a group boundary would cut a token in two and sharing is off. Shared
groups are full groups of computed tokens, so they are never written again: a request writes only
from its first uncomputed token on, always in a group of its own. The last, partial group of a
prompt is never shared (it is recomputed), and at least one token is always computed, because the
step that computes the last prompt token also samples the first output token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.books import PageGroupBooks
from vattn_ray.scheduler.capacity import CapacityProbe
from vattn_ray.scheduler.plan import KVOp, SeqChunk
from vattn_ray.scheduler.prefix import chain_hashes
from vattn_ray.scheduler.request import Request

logger = logging.getLogger(__name__)


class KVStep:
    """The page-group changes of the plan being built."""

    __slots__ = ("touched", "structural", "base")

    def __init__(self) -> None:
        self.touched: dict[int, int] = {}  # slot -> groups on the shards before this plan (upper bound)
        self.structural: list[KVOp] = []  # in decision order
        self.base: dict[int, int] = {}  # slot -> its groups right after its structural op


class KVPolicy:
    """Page-group decisions over `PageGroupBooks`, with the prefix cache when enabled."""

    def __init__(self, layout: KVLayout, num_slots: int, capacity: int, enable_prefix_caching: bool) -> None:
        self.books = PageGroupBooks(num_slots, capacity)
        self.probe = CapacityProbe(capacity)  # lowered estimates are raised again later
        self._tb, self._pb = layout.token_bytes, layout.page_bytes
        whole = layout.page_bytes % layout.token_bytes == 0
        self.tokens_per_group = layout.page_bytes // layout.token_bytes if whole else 0
        self.caching = enable_prefix_caching and whole
        if enable_prefix_caching and not whole:
            logger.warning("prefix caching is off: a %d-byte page holds %.2f tokens of %d bytes (not a whole "
                           "number); choose kv_layers_per_tensor so that it does", layout.page_bytes,
                           layout.page_bytes / layout.token_bytes, layout.token_bytes)
        self.reassert: dict[int, int] = {}  # slot -> most groups its shards may hold
        self.queries = 0  # prompt tokens looked up in the cache (vLLM's prefix_cache_queries)
        self.hits = 0  # ... of which were served from it (prefix_cache_hits)

    def groups(self, num_tokens: int) -> int:
        return -(-num_tokens * self._tb // self._pb) if num_tokens > 0 else 0

    # ---------------------------------------------------------------- changing the books

    def set_groups(self, st: KVStep | None, slot: int, num_groups: int) -> None:
        """Change a slot's groups; outside a step (st None) the next plan re-asserts it."""
        books = self.books
        if st is not None:
            st.touched.setdefault(slot, books.mapped[slot])
        else:
            self.reassert[slot] = max(self.reassert.get(slot, 0), books.mapped[slot])
        books.set_groups(slot, num_groups)

    def reclaim(self, st: KVStep | None) -> bool:
        """Give back some idle groups; False when no unowned slot holds any.

        With the cache on, the least recently used idle slot loses its last group (the deepest part
        of a prefix is the least shared); without it, the idle slot with the most groups goes whole.
        """
        books = self.books
        if self.caching:
            slot = books.lru_idle()
            if slot is None:
                return False
            self.set_groups(st, slot, books.mapped[slot] - 1)
        else:
            slot = books.largest_idle()
            if slot is None:
                return False
            self.set_groups(st, slot, 0)
        return True

    def reserve(self, st: KVStep, slot: int, num_tokens: int, preempt: Callable[[], bool] | None) -> bool:
        """Back tokens [0, num_tokens) of `slot`: reclaim idle groups, then call `preempt` (which
        frees a running request and says whether to go on) until the pool has room."""
        books = self.books
        need = self.groups(num_tokens)
        extra = need - books.mapped[slot]
        if extra <= 0:
            return True
        while books.free_groups < extra:
            if self.reclaim(st):
                continue
            if preempt is None or not preempt():
                return False
        self.set_groups(st, slot, need)
        return True

    # ---------------------------------------------------------------- the prefix cache

    def lookup(self, req: Request) -> tuple[int, int | None]:
        """(groups, slot): how many leading groups of `req`'s tokens are cached, and a slot holding them."""
        if not self.caching or req.params.needs_token_history:
            # Penalties read every earlier token on the worker, which only sees computed chunks.
            return 0, None
        t = self.tokens_per_group
        full = (req.num_tokens - 1) // t
        hashes = chain_hashes(req.block_hashes, req.tokens, t, full)
        return self.books.lookup(hashes[:full])

    def computing_elsewhere(self, req: Request, cached: int, running: Callable[[], list[Request]]) -> bool:
        """Whether a running request will compute `req`'s first uncached group (same tokens before
        it): `req` then waits for it instead of computing it again (`n > 1` siblings, a prompt
        sent twice at once)."""
        if not self.caching or req.params.needs_token_history:
            return False
        t = self.tokens_per_group
        hashes = req.block_hashes
        if cached >= (req.num_tokens - 1) // t or cached >= len(hashes):
            return False
        key, end = hashes[cached], (cached + 1) * t
        for other in running():
            theirs = other.block_hashes
            if len(theirs) > cached and theirs[cached] == key and other.num_computed < end <= other.num_tokens:
                return True
        return False

    def register(self, req: Request, start: int, end: int) -> None:
        """Tokens [start, end) of `req` are computed: its newly full groups join the cache."""
        if not self.caching:
            return
        t = self.tokens_per_group
        first, last = start // t, end // t
        if last > first:
            hashes = chain_hashes(req.block_hashes, req.tokens, t, last)
            self.books.register(req.slot, first, hashes[first:last])

    def place(self, st: KVStep, req: Request, cached: int, src: int | None, num_tokens: int) -> int | None:
        """Give waiting `req` a slot whose first `cached` groups hold its tokens (taken from slot
        `src`) and back its tokens up to `num_tokens`; None if the pool cannot (no preemption for
        admissions). The caller owns the request's state; the slot is assigned to it here."""
        books = self.books
        need = self.groups(num_tokens)
        if need - cached > books.free_groups + books.idle_groups:
            return None  # even reclaiming every idle group would not do
        if src is not None and books.owner[src] is None:
            slot = src  # its own groups are the prefix: nothing to alias
        elif self.caching:
            slot = books.empty_unowned()  # keep the idle slots' cached groups
            if slot is None:
                slot = books.best_fit(need)
        else:
            slot = books.best_fit(need)
        assert slot is not None, "place() needs an unowned slot"
        before = st.touched.get(slot, books.mapped[slot])
        books.assign(slot, req.req_id)
        if src is None or slot == src:
            # Its groups past the prefix are scratch to overwrite, up to the first one another
            # slot also holds (never written): drop from there.
            books.forget_from(slot, cached)
            keep = books.first_shared(slot, cached)
            if keep < books.mapped[slot]:
                self.set_groups(st, slot, keep)
            if keep != before:
                # Said apart from the final count: the slot may have lost groups earlier in this
                # step (reclaimed) that it now gets back as other page groups.
                st.structural.append(KVOp(slot, keep))
                st.base[slot] = keep
        else:
            st.touched.setdefault(slot, books.mapped[slot])
            books.alias(slot, src, cached)
            st.structural.append(KVOp(slot, cached, share_from=src))
            st.base[slot] = cached
        if src is not None:
            books.touch(src)
        if not self.reserve(st, slot, num_tokens, None):
            books.release(slot)  # what it keeps is still a valid cache entry
            return None
        return slot

    # ---------------------------------------------------------------- ops

    def ops_now(self, st: KVStep, reassert: dict[int, int]) -> tuple[list[KVOp], dict[int, int]]:
        """The `kv_now` ops of the step, and the most groups each touched slot may hold meanwhile."""
        mapped = self.books.mapped
        touched, base = st.touched, st.base
        counts = [KVOp(s, mapped[s]) for s, before in touched.items()
                  if mapped[s] != base.get(s, before) or s in reassert]
        counts.sort(key=lambda op: op.num_groups >= base.get(op.slot, touched[op.slot]))
        upper = {s: max(before, mapped[s]) for s, before in touched.items()}
        return st.structural + counts, upper

    def prefetch(self, seqs: list[tuple[Request, SeqChunk]], upper: dict[int, int]) -> list[KVOp]:
        """Grow slots for the next step from free groups only (never reclaiming or preempting)."""
        books = self.books
        ops: list[KVOp] = []
        if books.free_groups <= 0:
            return ops
        tb, pb, mapped = self._tb, self._pb, books.mapped
        for req, chunk in seqs:
            n = len(chunk.token_ids)
            if chunk.sample:
                nxt = chunk.start + n + 1  # next step decodes the token sampled now
                if nxt > req.max_kv_tokens:
                    continue  # it finishes by length with this token
            else:
                nxt = min(req.num_tokens, chunk.start + 2 * n)
            need = -(-nxt * tb // pb)
            extra = need - mapped[chunk.slot]
            if 0 < extra <= books.capacity - books.total_mapped:
                books.set_groups(chunk.slot, need)
                upper[chunk.slot] = max(upper.get(chunk.slot, 0), need)
                ops.append(KVOp(chunk.slot, need))
        return ops
