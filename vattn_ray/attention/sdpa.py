"""Reference backend (CPU and tests): gather each sequence's K/V, pad, and call SDPA.

Gather indices are clamped to the sequence length: on CPU the virtual cache is PROT_NONE beyond the
mapped pages, and reading a row past a sequence's end could fault the process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vattn_ray.attention.base import AttentionBackend, flat_view
from vattn_ray.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class SdpaState:
    kv_rows: torch.Tensor  # [B, max_k] flat cache rows to gather (clamped to each length)
    mask: torch.Tensor  # [B, 1, max_q, max_k] bool, True = attend
    token_seq: torch.Tensor  # [T] batch index of each new token
    token_row: torch.Tensor  # [T] row of each new token in the padded query batch


class SdpaBackend(AttentionBackend):
    name = "sdpa"

    def prepare(self, meta: AttentionMetadata) -> SdpaState:
        device = meta.seq_lens.device
        lens = meta.seq_lens.long()
        qlens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).long()
        k_pos = torch.arange(meta.max_seqlen_k, device=device)
        kv_rows = meta.slots[:, None] * meta.max_tokens_per_slot + torch.minimum(k_pos[None], lens[:, None] - 1)
        q_pos = (lens - qlens)[:, None] + torch.arange(meta.max_seqlen_q, device=device)[None]  # [B, max_q]
        # Query at position p sees keys <= p (chunked prefill: p starts at the chunk's start).
        mask = (k_pos[None, None] <= q_pos[:, :, None]) & (k_pos[None, None] < lens[:, None, None])
        token_seq = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), qlens,
                                            output_size=meta.num_tokens)
        token_row = torch.arange(meta.num_tokens, device=device) - meta.cu_seqlens_q[:-1].long()[token_seq]
        return SdpaState(kv_rows, mask[:, None], token_seq, token_row)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, state: SdpaState, scale: float) -> torch.Tensor:
        heads, dim = q.shape[1], q.shape[2]
        qp = q.new_zeros(meta.num_seqs, meta.max_seqlen_q, heads, dim)
        qp[state.token_seq, state.token_row] = q
        k = flat_view(k_cache)[state.kv_rows].to(q.dtype)  # [B, max_k, H_kv, D]
        v = flat_view(v_cache)[state.kv_rows].to(q.dtype)
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=state.mask,
            scale=scale, enable_gqa=heads != k.shape[2])
        return out.transpose(1, 2)[state.token_seq, state.token_row]
