"""Triton attention: split-KV decode for one-token rows, a causal prefill kernel for the rest. HOT PATH.

A row with one query token attends to its whole context (causal alignment puts it last), which is
exactly what the decode kernel computes, whether it is a decode step or a one-token prompt. Rows
with more query tokens go to the Triton prefill kernel (`triton_prefill.py`) when it is built for
the shape, else to the fallback backend (FlashAttention-2): `_attend_prefill` is the one place that
chooses. `prepare` splits the batch once per step:

- all rows one token (every decode step, and every CUDA-graph replay): views of the metadata, no
  host->device traffic, one kernel (two with split-KV) per layer;
- no row one token: the prefill path gets the step unchanged;
- mixed: the decode rows are found by index and the others get a metadata of their own. The
  scheduler puts decode rows first, so the prefill tokens are usually one contiguous range and
  their queries and outputs are used in place; any other order is gathered.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from vattn_ray.attention.base import AttentionBackend
from vattn_ray.attention.metadata import AttentionMetadata
from vattn_ray.transfer import host_to_device


@dataclass(frozen=True)
class TritonState:
    decode_slots: torch.Tensor | None  # [Bd] int64 slot of each one-token row (None: no such row)
    decode_lens: torch.Tensor | None  # [Bd] int32 tokens each attends to
    decode_rows: torch.Tensor | None  # [Bd] int64 token row of each in q/out; None: rows 0..Bd-1
    prefill_meta: AttentionMetadata | None  # the other rows as a batch of their own
    prefill_plan: Any  # triton_prefill.PrefillPlan of those rows (the Triton kernel's grid)
    prefill_state: Any  # the fallback backend's state for them
    prefill_tokens: slice | torch.Tensor | None  # their token rows: a range, or an index


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1): tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, prefill: AttentionBackend) -> None:
        """`prefill`: the backend for multi-token rows whose shape the Triton prefill kernel is not
        built for (see `_attend_prefill`)."""
        # imports triton: fails here if it is missing
        from vattn_ray.attention import triton_decode, triton_prefill

        self._kernel = triton_decode
        self._prefill_kernel = triton_prefill
        self.prefill = prefill

    def prepare(self, meta: AttentionMetadata) -> TritonState:
        if meta.seq_lens.device.type != "cuda" and not interpreting():
            raise RuntimeError("attention backend 'triton' needs CUDA; use 'sdpa' on CPU")
        lens = meta.query_lens
        decode = [b for b, n in enumerate(lens) if n == 1]
        if len(decode) == meta.num_seqs:
            return TritonState(meta.slots, meta.seq_lens, None, None, None, None, None)
        if not decode:
            return TritonState(None, None, None, meta, *self._prepare_prefill(meta), slice(None))
        return self._split(meta, decode)

    def _prepare_prefill(self, meta: AttentionMetadata) -> tuple[Any, Any]:
        """Both prefill paths' per-step state: the layer's dtype and head size, which choose the
        path, are known only in `attend`. Each is small (a block table; nothing for FA2)."""
        kernel = self._prefill_kernel
        return kernel.plan_prefill(meta, kernel.BLOCK_M), self.prefill.prepare(meta)

    def _split(self, meta: AttentionMetadata, decode: list[int]) -> TritonState:
        """A mixed batch: index the one-token rows, and give the others a metadata of their own."""
        device = meta.seq_lens.device
        starts = _starts(meta.query_lens)
        rest = [b for b in range(meta.num_seqs) if meta.query_lens[b] > 1]
        rest_tokens = [t for b in rest for t in range(starts[b], starts[b + 1])]
        contiguous = rest_tokens == list(range(rest_tokens[0], rest_tokens[-1] + 1))
        cu_q = _starts([meta.query_lens[b] for b in rest])
        # One host->device copy carries every index of the split.
        host = torch.tensor(decode + [starts[b] for b in decode] + rest + cu_q
                            + ([] if contiguous else rest_tokens), dtype=torch.int64)
        parts = host_to_device(host, device).split(
            [len(decode), len(decode), len(rest), len(rest) + 1] + ([] if contiguous else [len(rest_tokens)]))
        dec_idx, dec_rows, rest_idx, rest_cu_q = parts[:4]
        tokens: slice | torch.Tensor = (slice(rest_tokens[0], rest_tokens[-1] + 1) if contiguous else parts[4])
        m = meta.max_tokens_per_slot
        slots = meta.slots[rest_idx]
        seq_lens = meta.seq_lens[rest_idx]
        cu_k = slots * m
        sub = dataclasses.replace(
            meta, num_seqs=len(rest), num_tokens=len(rest_tokens),
            max_seqlen_q=max(meta.query_lens[b] for b in rest),
            max_seqlen_k=max(meta.context_lens[b] + meta.query_lens[b] for b in rest),
            query_lens=tuple(meta.query_lens[b] for b in rest),
            context_lens=tuple(meta.context_lens[b] for b in rest),
            input_ids=meta.input_ids[tokens], positions=meta.positions[tokens],
            slot_mapping=meta.slot_mapping[tokens], slots=slots, seq_lens=seq_lens,
            cu_seqlens_q=rest_cu_q.to(torch.int32),
            # slot starts, then a bound past the last one (the kernels read lengths from seq_lens)
            cu_seqlens_k=torch.cat([cu_k, cu_k[-1:] + seq_lens[-1:]]).to(torch.int32),
            sample_indices=meta.sample_indices[:0])
        if decode == list(range(len(decode))):  # decode rows first (the scheduler's order): views
            n = len(decode)
            return TritonState(meta.slots[:n], meta.seq_lens[:n], None, sub, *self._prepare_prefill(sub), tokens)
        return TritonState(meta.slots[dec_idx], meta.seq_lens[dec_idx], dec_rows, sub,
                           *self._prepare_prefill(sub), tokens)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, state: TritonState, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        if state.decode_slots is not None:
            self._kernel.decode_attention(q, k_cache, v_cache, state.decode_slots, state.decode_lens, scale,
                                          out, rows=state.decode_rows)
        if state.prefill_meta is not None:
            self._attend_prefill(q, k_cache, v_cache, state, scale, out)
        return out

    def _attend_prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        state: TritonState, scale: float, out: torch.Tensor) -> None:
        """Rows of more than one query token into their rows of `out`. The one place the prefill
        path is chosen, by shape alone: the Triton kernel wherever `triton_prefill.supports` the
        head size and dtype (head_dim 64 or 128; fp16, bf16, fp32), the fallback backend elsewhere."""
        tokens, meta = state.prefill_tokens, state.prefill_meta
        kernel = self._prefill_kernel
        if kernel.supports(q.shape[-1], q.dtype):
            if isinstance(tokens, slice):  # views: the kernel reads and writes the rows in place
                kernel.prefill_attention(q[tokens], k_cache, v_cache, meta, scale, out[tokens],
                                         plan=state.prefill_plan)
            else:
                q_rows = q[tokens]
                out[tokens] = kernel.prefill_attention(q_rows, k_cache, v_cache, meta, scale,
                                                       torch.empty_like(q_rows), plan=state.prefill_plan)
            return
        out[tokens] = self.prefill.attend(q[tokens], k_cache, v_cache, meta, state.prefill_state, scale)


def _starts(lengths) -> list[int]:
    """Prefix sums with a leading 0: `[0, l0, l0 + l1, ...]`."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out
