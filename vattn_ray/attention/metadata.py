"""Per-step attention metadata, built once per step and shared by every layer. HOT PATH.

All integer vectors are packed into one host tensor and moved with a single host->device copy;
the int32 copies FlashAttention wants are made on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from vattn_ray.transfer import host_to_device


class ChunkLike(Protocol):
    """What metadata needs of a `SeqChunk`: where its new tokens go in which slot."""

    slot: int
    start: int
    token_ids: Sequence[int]
    sample: bool


@dataclass(frozen=True)
class AttentionMetadata:
    """The batch of one step: B sequences, T new tokens in total, in chunk order.

    Sequence b owns slot `slots[b]`; its new tokens sit at positions `start_b .. seq_lens[b]-1`
    and attend to the slot's tokens `[0, seq_lens[b])` causally.
    """

    num_seqs: int
    num_tokens: int
    max_tokens_per_slot: int
    max_seqlen_q: int
    max_seqlen_k: int
    query_lens: tuple[int, ...]  # host copies, for backends that group sequences by shape
    context_lens: tuple[int, ...]  # tokens already cached before this step (= start)
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: slot * max_tokens_per_slot + position (flat KV row)
    slots: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int32: tokens attended after this step
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    cu_seqlens_k: torch.Tensor  # [B+1] int32: slot starts in the flat KV view (with seqused_k)
    sample_indices: torch.Tensor  # [S] int64: rows of the hidden states whose logits are sampled


def build_metadata(seqs: Sequence[ChunkLike], max_tokens_per_slot: int,
                   device: torch.device | str) -> AttentionMetadata:
    """Metadata of a step from its chunks, with one host->device copy."""
    if not seqs:
        raise ValueError("build_metadata needs at least one sequence")
    m = max_tokens_per_slot
    ids: list[int] = []
    positions: list[int] = []
    mapping: list[int] = []
    cu_q = [0]
    seq_lens: list[int] = []
    sample_rows: list[int] = []
    for s in seqs:
        n = len(s.token_ids)
        end = s.start + n
        if n == 0 or end > m:
            raise ValueError(f"chunk of slot {s.slot} covers positions [{s.start}, {end}); "
                             f"needs 1..{m} positions")
        ids.extend(s.token_ids)
        positions.extend(range(s.start, end))
        base = s.slot * m
        mapping.extend(range(base + s.start, base + end))
        cu_q.append(cu_q[-1] + n)
        seq_lens.append(end)
        if s.sample:
            sample_rows.append(cu_q[-1] - 1)
    slots = [s.slot for s in seqs]
    # cu_seqlens_k[b] is where slot b starts in the flat [slots * m, H, D] view; seqused_k gives the
    # length, so the last entry is only a bound.
    cu_k = [slot * m for slot in slots] + [slots[-1] * m + seq_lens[-1]]
    b, t = len(seqs), cu_q[-1]
    host = torch.tensor(ids + positions + mapping + slots + seq_lens + cu_q + cu_k + sample_rows,
                        dtype=torch.int64)
    packed = host_to_device(host, device)
    parts = packed.split([t, t, t, b, b, b + 1, b + 1, len(sample_rows)])
    query_lens = tuple(cu_q[i + 1] - cu_q[i] for i in range(b))
    return AttentionMetadata(
        num_seqs=b, num_tokens=t, max_tokens_per_slot=m,
        max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
        query_lens=query_lens, context_lens=tuple(s.start for s in seqs),
        input_ids=parts[0], positions=parts[1], slot_mapping=parts[2], slots=parts[3],
        seq_lens=parts[4].to(torch.int32), cu_seqlens_q=parts[5].to(torch.int32),
        cu_seqlens_k=parts[6].to(torch.int32), sample_indices=parts[7],
    )
