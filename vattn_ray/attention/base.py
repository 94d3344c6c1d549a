"""The attention-backend seam: write the step's K/V into the virtual cache, then attend. HOT PATH.

Every backend reads the cache as it is: per layer a strided view `[max_slots, max_tokens, H_kv, D]`
of the virtual tensor (with a stride gap between tokens when G > 1 layers share a tensor). Kernels
see it flattened to `[max_slots * max_tokens, H_kv, D]`, which is a view, never a copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from vattn_ray.attention.metadata import AttentionMetadata, ChunkLike, build_metadata


def flat_view(cache: torch.Tensor) -> torch.Tensor:
    """`[slots, tokens, H, D]` -> `[slots * tokens, H, D]` sharing memory (raises if impossible)."""
    slots, tokens, heads, dim = cache.shape
    # .view (not .reshape/.flatten): a silent copy would send the writes to a temporary.
    return cache.view(slots * tokens, heads, dim)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's new K/V `[T, H_kv, D]` into their rows: one indexed copy per tensor."""
    flat_view(k_cache).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_view(v_cache).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class AttentionBackend(ABC):
    """One attention implementation. `prepare` runs once per step, `forward` once per layer."""

    name: str = ""

    def build_metadata(self, seqs: Sequence[ChunkLike], max_tokens_per_slot: int,
                       device: torch.device | str) -> AttentionMetadata:
        """The step's metadata (same for every backend; see `metadata.build_metadata`)."""
        return build_metadata(seqs, max_tokens_per_slot, device)

    def prepare(self, meta: AttentionMetadata) -> Any:
        """Per-step tensors derived from `meta` (shared by all layers); default: nothing."""
        return None

    @abstractmethod
    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, state: Any, scale: float) -> torch.Tensor:
        """Causal attention of `q [T, H_q, D]` over the cached tokens; returns `[T, H_q, D]`."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, state: Any, scale: float) -> torch.Tensor:
        """Store this step's `k`, `v` `[T, H_kv, D]`, then attend (new tokens see themselves)."""
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return self.attend(q, k_cache, v_cache, meta, state, scale)
