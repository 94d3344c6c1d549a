"""Decode steps replayed from CUDA graphs. HOT PATH (`run`).

A decode step of an 8B model launches ~800 small kernels; from Python that takes about as long as
the GPU needs to run them, so the GPU idles between launches. A captured graph launches them all
at once. The virtual KV cache makes capture easy: its tensors never move (fixed virtual addresses),
and pages mapped later are seen by the captured kernels like any other memory.

One graph per padded batch size ("bucket"). All step inputs live in one static int64 buffer
(ids, positions, KV rows, sequence lengths, slot starts), filled with a single host->device copy
before replay; the graph itself converts what FlashAttention wants to int32. Padding rows repeat
row 0 exactly (same token, position and slot), so they compute the same K/V bit for bit and write
the same values to the same row; their outputs are dropped.

The graph ends with the logits (the LM head is part of it), and a token id of `PREVIOUS_SAMPLE`
(-1) is replaced inside the graph by the slot's last sampled token, so a step planned before the
previous one finished needs no host round trip. Two pinned host buffers alternate, so filling the
next step's inputs never waits for the copy of the step still queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from vattn_ray.attention.metadata import AttentionMetadata
from vattn_ray.scheduler.plan import SeqChunk

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: fine steps where batches are small, coarser where padding is cheap."""
    sizes = [1, 2, 4, 8] + list(range(16, 128, 16)) + list(range(128, 1025, 32))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    """Captured decode forwards for every bucket up to `max_batch` sequences."""

    def __init__(self, model: torch.nn.Module, kv_views: Callable, max_batch: int,
                 max_tokens_per_slot: int, device: torch.device, last_sampled: torch.Tensor) -> None:
        self.model, self.kv_views, self.device = model, kv_views, device
        self.last_sampled = last_sampled  # [slots] int64, written by the sampler after each step
        self.max_batch, self.max_tokens = max_batch, max_tokens_per_slot
        self.buckets = batch_buckets(max_batch)
        n = max_batch
        # Regions of the static buffer: ids, positions, KV rows, seq lens, slot starts (+1).
        self.offsets = (0, n, 2 * n, 3 * n, 4 * n)
        self.static = torch.zeros(5 * n + 1, dtype=torch.int64, device=device)
        self.hosts = [torch.zeros(5 * n + 1, dtype=torch.int64).pin_memory() for _ in range(2)]
        # A pinned buffer is rewritten two steps later: wait until its last copy out is done.
        self.copied = [torch.cuda.Event(), torch.cuda.Event()]
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _forward(self, b: int) -> torch.Tensor:
        s, (o_ids, o_pos, o_map, o_len, o_cu) = self.static, self.offsets
        slots = s[o_cu:o_cu + b] // self.max_tokens
        ids = s[o_ids:o_ids + b]
        ids = torch.where(ids < 0, self.last_sampled.index_select(0, slots), ids)
        meta = AttentionMetadata(
            num_seqs=b, num_tokens=b, max_tokens_per_slot=self.max_tokens, max_seqlen_q=1,
            # An upper bound: the kernel reads each sequence's own length from seqused_k.
            max_seqlen_k=self.max_tokens, query_lens=(1,) * b, context_lens=(0,) * b,
            input_ids=ids, positions=s[o_pos:o_pos + b],
            slot_mapping=s[o_map:o_map + b], slots=slots,
            seq_lens=s[o_len:o_len + b].to(torch.int32), cu_seqlens_q=torch.arange(
                b + 1, dtype=torch.int32, device=self.device),
            cu_seqlens_k=s[o_cu:o_cu + b + 1].to(torch.int32),
            sample_indices=torch.arange(b, dtype=torch.int64, device=self.device))
        hidden = self.model(meta.input_ids, meta.positions, meta, self.kv_views)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self, fill: Callable[[], None]) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool.

        `fill` puts a valid decode batch in `self.static` (every row must read mapped memory).
        """
        t0 = time.perf_counter()
        fill()
        pool = None
        for b in reversed(self.buckets):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: cuBLAS/FA workspaces before capture
                self._forward(b)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode graphs (batch 1..%d) in %.1f s", len(self.graphs), self.max_batch,
                    time.perf_counter() - t0)

    def fits(self, seqs: Sequence[SeqChunk]) -> bool:
        """A decode-only batch: one token and one sample per row. A one-token prefill chunk that
        does not sample (a token budget <= max_num_seqs makes those) computes like a decode, but
        the graphs return a logits row for it that the sampler has no chunk for."""
        return len(seqs) <= self.max_batch and all(len(s.token_ids) == 1 and s.sample for s in seqs)

    def run(self, seqs: Sequence[SeqChunk]) -> torch.Tensor:
        """float32 logits `[len(seqs), vocab]` of a decode-only batch."""
        n = len(seqs)
        b = next(x for x in self.buckets if x >= n)
        m = self.max_tokens
        o_ids, o_pos, o_map, o_len, o_cu = self.offsets
        rows = [seqs[i] if i < n else seqs[0] for i in range(b)]
        turn = self.turn = 1 - self.turn
        h = self.hosts[turn]
        self.copied[turn].synchronize()
        # One Python pass filling a pinned buffer, then one copy: this runs every step.
        h[o_ids:o_ids + b] = torch.tensor([r.token_ids[0] for r in rows])
        h[o_pos:o_pos + b] = torch.tensor([r.start for r in rows])
        h[o_map:o_map + b] = torch.tensor([r.slot * m + r.start for r in rows])
        h[o_len:o_len + b] = torch.tensor([r.start + 1 for r in rows])
        starts = [r.slot * m for r in rows]
        h[o_cu:o_cu + b + 1] = torch.tensor(starts + [starts[-1] + rows[-1].start + 1])
        self.static.copy_(h, non_blocking=True)
        self.copied[turn].record()
        self.graphs[b].replay()
        return self.outputs[b][:n]

    def fill_for_capture(self, slot: int) -> None:
        """A batch whose every row is token 0 at position 0 of `slot` (which must be mapped)."""
        m, n = self.max_tokens, self.max_batch
        o_ids, o_pos, o_map, o_len, o_cu = self.offsets
        h = self.hosts[0]
        h.zero_()
        h[o_map:o_map + n] = slot * m
        h[o_len:o_len + n] = 1
        h[o_cu:o_cu + n + 1] = slot * m
        h[o_cu + n] = slot * m + 1
        self.static.copy_(h)
