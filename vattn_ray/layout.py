"""Geometry of the virtual KV cache, shared by the head scheduler and the workers.

Pure Python (no torch): the scheduler counts page groups with it, the worker's KV manager
reserves and maps virtual tensors with it, and both must agree to the byte.

A *virtual tensor* holds `G` layers of K (or of V) for every slot:
`[max_slots, max_tokens_per_slot, G, num_kv_heads, head_dim]`. There are `2 * num_layers / G`
of them (all K tensors first, then all V tensors). A *page group* is one physical page in every
virtual tensor covering the same byte range of the same slot; it is the unit the scheduler counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV cache of one shard (one TP rank); identical on every shard."""

    num_layers: int
    layers_per_tensor: int  # G
    num_kv_heads: int  # heads held by this shard
    head_dim: int
    itemsize: int  # bytes per element of the KV dtype
    page_bytes: int  # physical page size (2 MiB on CUDA)
    max_slots: int  # = max_num_seqs
    max_tokens_per_slot: int  # >= max_model_len, rounded so that a slot is page aligned

    def __post_init__(self) -> None:
        for name in ("num_layers", "layers_per_tensor", "num_kv_heads", "head_dim", "itemsize",
                     "page_bytes", "max_slots", "max_tokens_per_slot"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.num_layers % self.layers_per_tensor:
            raise ValueError(
                f"kv_layers_per_tensor={self.layers_per_tensor} must divide num_layers={self.num_layers}")
        if self.slot_bytes % self.page_bytes:
            raise ValueError("max_tokens_per_slot does not make a slot page aligned; use KVLayout.build")

    @classmethod
    def build(cls, *, num_layers: int, layers_per_tensor: int, num_kv_heads: int, head_dim: int,
              itemsize: int, page_bytes: int, max_slots: int, max_model_len: int) -> "KVLayout":
        """Round `max_model_len` up to the smallest slot length whose bytes fill whole pages."""
        token_bytes = layers_per_tensor * num_kv_heads * head_dim * itemsize
        # Tokens per "alignment unit": the least token count whose bytes are a multiple of a page.
        unit = page_bytes // math.gcd(page_bytes, token_bytes)
        tokens = -(-max_model_len // unit) * unit
        return cls(num_layers, layers_per_tensor, num_kv_heads, head_dim, itemsize, page_bytes,
                   max_slots, tokens)

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies in one virtual tensor (G layers of one of K or V)."""
        return self.layers_per_tensor * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def num_tensors(self) -> int:
        """Virtual tensors in the cache: K and V for every group of G layers."""
        return 2 * self.num_layers // self.layers_per_tensor

    @property
    def slot_bytes(self) -> int:
        return self.max_tokens_per_slot * self.token_bytes

    @property
    def pages_per_slot(self) -> int:
        return self.slot_bytes // self.page_bytes

    @property
    def tensor_bytes(self) -> int:
        """Virtual size of one tensor (all slots)."""
        return self.max_slots * self.slot_bytes

    @property
    def page_group_bytes(self) -> int:
        """Physical bytes of one page group (one page in every virtual tensor)."""
        return self.num_tensors * self.page_bytes

    @property
    def tokens_per_group(self) -> float:
        """Average tokens covered by one page group (exact when token_bytes divides page_bytes)."""
        return self.page_bytes / self.token_bytes

    def groups_for_tokens(self, num_tokens: int) -> int:
        """Page groups a slot needs so that tokens [0, num_tokens) are backed by memory."""
        if num_tokens <= 0:
            return 0
        return -(-num_tokens * self.token_bytes // self.page_bytes)

    def tensor_index(self, layer: int, kind: str) -> tuple[int, int]:
        """(virtual tensor index, position inside its G axis) holding `kind` ('k'|'v') of `layer`."""
        t, g = divmod(layer, self.layers_per_tensor)
        return (t if kind == "k" else t + self.num_layers // self.layers_per_tensor), g
