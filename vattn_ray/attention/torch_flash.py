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
        # Decode-only steps take the packed-GQA path; its per-step tensors are cached here.
        return {} if meta.max_seqlen_q == 1 else None

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, state: Any, scale: float) -> torch.Tensor:
        group = q.shape[1] // k_cache.shape[2]
        if state is not None and group > 1:
            return self._decode_packed(q, k_cache, v_cache, meta, state, scale, group)
        out = torch.ops.aten._flash_attention_forward(
            q, flat_view(k_cache), flat_view(v_cache), meta.cu_seqlens_q, meta.cu_seqlens_k,
            meta.max_seqlen_q, meta.max_seqlen_k, 0.0, True, False,
            scale=scale, seqused_k=meta.seq_lens)
        return out[0]

    @staticmethod
    def _decode_packed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata, state: dict, scale: float, group: int) -> torch.Tensor:
        """Decode with GQA: the `group` query heads sharing a KV head become `group` query rows.

        The varlen kernel otherwise runs one block per query head and reads each KV head `group`
        times; packed, each KV head is read once. All rows sit at the same (last) position and see
        the whole context, so the call is non-causal. Exact: only the order of work changes.
        """
        b, hq, d = q.shape
        hkv = hq // group
        cu_q = state.get(group)
        if cu_q is None:
            cu_q = state[group] = torch.arange(0, (b + 1) * group, group, dtype=torch.int32, device=q.device)
        packed = q.view(b, hkv, group, d).transpose(1, 2).reshape(b * group, hkv, d)
        out = torch.ops.aten._flash_attention_forward(
            packed, flat_view(k_cache), flat_view(v_cache), cu_q, meta.cu_seqlens_k,
            group, meta.max_seqlen_k, 0.0, False, False, scale=scale, seqused_k=meta.seq_lens)[0]
        return out.view(b, group, hkv, d).transpose(1, 2).reshape(b, hq, d)
