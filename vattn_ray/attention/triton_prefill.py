"""Causal varlen prefill attention in Triton over the slot-strided virtual KV cache. HOT PATH, zero copies.

Row b of a step has `query_lens[b]` new tokens, the last ones of slot `slots[b]`: they attend to
the slot's tokens `[0, seq_lens[b])`, causally aligned to the bottom right (query i of a chunk
starting at `start = seq_len - query_len` sees keys `<= start + i`), which is chunked prefill.
The per-layer view is `[max_slots, max_tokens, H_kv, D]` with a token stride of G*H_kv*D.

- **Compute.** Prefill is matrix work: one program computes a BLOCK_M x D output tile of one query
  head with tensor-core products, streaming K/V tiles through shared memory (`num_stages` deep),
  with the online softmax in base 2 and the scale folded into one multiply.
- **Causality in two parts.** Keys below the block's first query position are seen by every
  query of the block: those tiles run without any mask. Only the last few tiles (the diagonal,
  about BLOCK_M / BLOCK_N + 1 of them) compute the causal and length masks.
- **Grid from the host.** Prefill steps are not captured in CUDA graphs, so the grid comes from
  the host copies of the lengths (`meta.query_lens`, `meta.context_lens`): one program per (query
  head, query block of a row), no host sync. Blocks are listed heaviest first (most keys to read),
  so long blocks start early and the short ones fill the tail. Consecutive programs are the heads
  of one block: they read the same keys, which then come from L2.
- **Unmapped pages.** Pages past a row's length may be unmapped, so the diagonal tiles' loads are
  masked to `[0, seq_lens[b])`; the unmasked tiles lie wholly below the block's first query
  position, hence below the length. Slot and token offsets are int64 (the virtual tensor has
  more than 2^31 elements); K/V are passed by address (see vattn_ray/triton_util.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vattn_ray.attention.metadata import AttentionMetadata
from vattn_ray.transfer import host_to_device
from vattn_ray.triton_util import address, as_pointer, tl_dtype

HEAD_DIMS = (64, 128)
# Queries a program: the same for every default config, so a backend plans the grid per step
# before it knows a layer's dtype.
BLOCK_M = 128


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters: BLOCK_M queries x BLOCK_N keys a tile, `num_stages` K/V tiles in flight."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Tiles for H100/H200 (Triton's fused-attention tutorial shape). Shared memory at D=128 in
    16 bits: Q 32 KiB + 3 stages of K+V tiles (32 KiB each at BLOCK_N=64) = 128 KiB. Eight warps
    are two warpgroups, each owning 64 query rows of the 128 x D float32 accumulator."""
    if torch.empty((), dtype=dtype).element_size() >= 4:  # float32: twice the bytes a tile
        return PrefillConfig(block_m=BLOCK_M, block_n=32, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return PrefillConfig(block_m=BLOCK_M, block_n=128, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=BLOCK_M, block_n=64, num_warps=8, num_stages=3)


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Shapes the kernel is built and tuned for; the backend sends anything else to its fallback."""
    return head_dim in HEAD_DIMS and dtype in (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class PrefillPlan:
    """The grid of one step: query block i is block `starts[i] // block_m` of row `rows[i]`."""

    block_m: int
    rows: torch.Tensor  # [NB] int32
    starts: torch.Tensor  # [NB] int32: first query (within the row's chunk) of the block

    @property
    def num_blocks(self) -> int:
        return self.rows.shape[0]


def plan_prefill(meta: AttentionMetadata, block_m: int) -> PrefillPlan:
    """Query blocks of every row, heaviest first, from the host copies of the lengths; one
    host->device copy (pinned, asynchronous), shared by every layer of the step."""
    blocks = []
    for b, (n, start) in enumerate(zip(meta.query_lens, meta.context_lens)):
        for m in range(0, n, block_m):
            blocks.append((start + min(m + block_m, n), b, m))  # keys the block reads
    blocks.sort(key=lambda x: -x[0])
    host = torch.tensor([[b for _, b, _ in blocks], [m for _, _, m in blocks]], dtype=torch.int32)
    device = meta.seq_lens.device
    table = host_to_device(host, device)
    return PrefillPlan(block_m, table[0], table[1])


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_tile, v_tile, k_step, v_step, lo, hi, q_pos, seq_len, scale_log2,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    # Keys [lo, hi) in tiles of BLOCK_N; k_tile/v_tile point at key `lo`. MASKED: the diagonal
    # tiles, where keys past a query's position or the row's length are cut; elsewhere no mask.
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASKED:
            n = start_n + offs_n
            n_ok = n < seq_len  # never touch a row at or past the length: its page may be unmapped
            k = tl.load(k_tile, mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s * scale_log2, float("-inf"))
            v = tl.load(v_tile, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_tile)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            v = tl.load(v_tile)
        # Finite: every query row sees key 0, so a row's first tile (unmasked part, or the first
        # diagonal tile when there is none) has a visible key, and m_i never stays -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_tile += k_step
        v_tile += v_step
    return acc, l_i, m_i


# Counts are not specialized on (fewer compiled variants, less compile time at engine start).
@triton.jit(do_not_specialize=["num_blocks"])
def _prefill_kernel(
    q_ptr, k_addr, v_addr, out_ptr,
    slots_ptr, seq_lens_ptr, cu_q_ptr, block_rows_ptr, block_starts_ptr,
    stride_qt, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_ot, stride_oh,
    num_blocks, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, KV_DTYPE: tl.constexpr,
):
    k_ptr = as_pointer(k_addr, KV_DTYPE)  # the virtual KV cache: see vattn_ray/triton_util.py
    v_ptr = as_pointer(v_addr, KV_DTYPE)
    head = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.load(block_rows_ptr + blk)
    m_start = tl.load(block_starts_ptr + blk)
    q_first = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_first
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    ctx = seq_len - q_len  # keys cached before this chunk
    kv_head = head // GROUP

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = m_start + offs_m < q_len
    q_pos = ctx + m_start + offs_m  # each query's position in its slot
    # int64 bases; offsets inside a tile fit in int32.
    q_row = (q_first + m_start).to(tl.int64)
    q = tl.load(q_ptr + q_row * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    k_step = BLOCK_N * stride_kt.to(tl.int64)
    v_step = BLOCK_N * stride_vt.to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Whole tiles of keys <= the block's first position: every query of the block sees them.
    full = (ctx + m_start + 1) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, k_step, v_step, 0, full, q_pos, seq_len,
                                  scale_log2, BLOCK_N, False, PRECISION)
    # The diagonal: up to the block's last query position (or the row's last key).
    end = ctx + tl.minimum(m_start + BLOCK_M, q_len)
    skip = (full // BLOCK_N).to(tl.int64)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base + skip * k_step, v_base + skip * v_step,
                                  k_step, v_step, full, end, q_pos, seq_len, scale_log2, BLOCK_N, True, PRECISION)
    o = acc / l_i[:, None]
    tl.store(out_ptr + q_row * stride_ot + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, out: torch.Tensor, plan: PrefillPlan | None = None,
                      config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal attention of every row of `meta` into `out`.

    q, out: `[T, H_q, D]`, row b's queries at token rows `[cu_seqlens_q[b], cu_seqlens_q[b+1])`.
    k_cache, v_cache: `[max_slots, max_tokens, H_kv, D]`, any strides with a unit last stride; row b
    reads tokens `[0, seq_lens[b])` of slot `slots[b]`. `plan` (from `plan_prefill` with the
    config's block_m) is built here when None; a backend builds it once per step. `config`
    overrides the shape-based tiles (benchmarks, tests).
    """
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    if not supports(dim, q.dtype):
        raise ValueError(f"prefill kernel needs head_dim in {HEAD_DIMS} and a float dtype; "
                         f"got head_dim={dim}, {q.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride in its last dimension")
    cfg = config or default_config(dim, q.dtype)
    if plan is None:
        plan = plan_prefill(meta, cfg.block_m)
    if plan.block_m != cfg.block_m:
        raise ValueError(f"plan made for block_m={plan.block_m}, config has block_m={cfg.block_m}")
    if plan.num_blocks == 0:
        return out
    # float32 products in full precision (tf32 would cost accuracy); 16-bit operands ignore this.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _prefill_kernel[(heads, plan.num_blocks)](
        q, address(k_cache), address(v_cache), out,
        meta.slots, meta.seq_lens, meta.cu_seqlens_q, plan.rows, plan.starts,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        plan.num_blocks, scale * math.log2(math.e),
        GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PRECISION=precision, KV_DTYPE=tl_dtype(k_cache),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def causal_flops(query_lens: tuple[int, ...], context_lens: tuple[int, ...], heads: int, head_dim: int) -> float:
    """FLOPs of causal attention actually computed on visible (query, key) pairs: query i of a chunk
    after `start` cached tokens sees `start + i + 1` keys, so a row has
    `q * start + q * (q + 1) / 2 = q * (start + (q + 1) / 2)` pairs; each costs two products
    (QK^T and PV) of 2 * D FLOPs per head: `4 * D * H_q * sum_b q_b * (start_b + (q_b + 1) / 2)`."""
    pairs = sum(q * (s + (q + 1) / 2) for q, s in zip(query_lens, context_lens))
    return 4.0 * head_dim * heads * pairs
