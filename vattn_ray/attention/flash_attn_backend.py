"""The flash-attn package (`flash_attn_with_kvcache`) reading the virtual cache in place. GPU only.

flash-attn 2's varlen entry point cannot skip the gap between slots (no `seqused_k`), but
`flash_attn_with_kvcache` takes the per-sequence cache rows directly (`cache_batch_idx` = slot,
`cache_seqlens` = length). It wants one query length per call, so a step runs as at most two calls:
the decode sequences (one query each), and the prefill chunks left-padded to the longest chunk.
Left padding keeps FlashAttention's bottom-right causal alignment right for every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn_ray.attention.base import AttentionBackend
from vattn_ray.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class _Group:
    seqs: torch.Tensor  # [b] int64 batch indices of the group
    slots: torch.Tensor  # [b] int32 cache_batch_idx
    seq_lens: torch.Tensor  # [b] int32 cache_seqlens
    q_len: int  # padded query length
    token_idx: torch.Tensor  # [t] flat token indices of the group's new tokens
    padded_idx: torch.Tensor  # [t] where each of them sits in the [b * q_len] padded queries


def _import_kernel():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        raise RuntimeError("attention backend 'flash_attn' needs the flash-attn package "
                           "(pip install flash-attn); use 'torch' instead") from e
    return flash_attn_with_kvcache


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(self) -> None:
        self._kernel = _import_kernel()

    def prepare(self, meta: AttentionMetadata) -> list[_Group]:
        device = meta.seq_lens.device
        decode = [b for b, n in enumerate(meta.query_lens) if n == 1]
        prefill = [b for b, n in enumerate(meta.query_lens) if n > 1]
        starts = [0]
        for n in meta.query_lens:
            starts.append(starts[-1] + n)
        groups = []
        for members in (decode, prefill):
            if not members:
                continue
            q_len = max(meta.query_lens[b] for b in members)
            token_idx, padded_idx = [], []
            for j, b in enumerate(members):
                n = meta.query_lens[b]
                token_idx.extend(range(starts[b], starts[b] + n))
                pad = j * q_len + q_len - n  # left padding: the chunk ends at the last row
                padded_idx.extend(range(pad, pad + n))
            idx = torch.tensor(members, device=device)
            groups.append(_Group(idx, meta.slots[idx].to(torch.int32), meta.seq_lens[idx], q_len,
                                 torch.tensor(token_idx, device=device),
                                 torch.tensor(padded_idx, device=device)))
        return groups

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, state: list[_Group], scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        heads, dim = q.shape[1], q.shape[2]
        for g in state:
            b = g.seqs.numel()
            qp = q.new_zeros(b * g.q_len, heads, dim)
            qp[g.padded_idx] = q[g.token_idx]
            o = self._kernel(qp.view(b, g.q_len, heads, dim), k_cache, v_cache,
                             cache_seqlens=g.seq_lens, cache_batch_idx=g.slots,
                             softmax_scale=scale, causal=True)
            out[g.token_idx] = o.reshape(b * g.q_len, heads, dim)[g.padded_idx]
        return out
