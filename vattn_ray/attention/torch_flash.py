"""PyTorch's built-in FlashAttention-2 (varlen) reading the virtual cache in place. HOT PATH, GPU only.

`cum_seq_k[b] = slot_b * max_tokens` points the kernel at the slot's first row of the flat view and
`seqused_k` gives its length, so one call serves a mixed prefill/decode batch with no copies.
FlashAttention aligns the causal mask to the bottom right, which is exactly chunked prefill:
query i of a chunk starting at `start` sees keys `<= start + i`.
"""

from __future__ import annotations

from typing import Any

import torch

from vattn_ray.attention.base import AttentionBackend, flat_view
from vattn_ray.attention.metadata import AttentionMetadata


class TorchFlashBackend(AttentionBackend):
    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> Any:
        if meta.seq_lens.device.type != "cuda":
            raise RuntimeError("attention backend 'torch' (FlashAttention-2) needs CUDA; use 'sdpa' on CPU")
        return None

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, state: Any, scale: float) -> torch.Tensor:
        out = torch.ops.aten._flash_attention_forward(
            q, flat_view(k_cache), flat_view(v_cache), meta.cu_seqlens_q, meta.cu_seqlens_k,
            meta.max_seqlen_q, meta.max_seqlen_k, 0.0, True, False,
            scale=scale, seqused_k=meta.seq_lens)
        return out[0]
