"""Split-KV decode attention in Triton over the slot-strided virtual KV cache. HOT PATH, zero copies.

One query token per row b: it attends to tokens `[0, seq_lens[b])` of slot `slots[b]` of the
per-layer view `[max_slots, max_tokens, H_kv, D]` (token stride G*H_kv*D when G layers share
a tensor). Three things shape the kernel:

- **Bandwidth.** Decode reads every cached byte once and does little math, so the only goal is
  to keep HBM busy. One program handles one (row, KV head, split) and *all* query heads of that
  KV head's group, so each K/V byte is read once; the group is padded to 16 rows for `tl.dot`.
  K/V tiles are pipelined (`num_stages`), so each program keeps a couple of tiles in flight.
  A short batch has too few (row, head) pairs to fill the GPU, so each row's context is cut into
  `num_splits` pieces read in parallel, and a second small kernel merges the partial results with
  the log-sum-exp trick (flash-decoding).
- **CUDA graphs.** The grid depends only on (rows, KV heads, num_splits), and `num_splits` only on
  (rows, KV heads, SM count): never on lengths, which live on the device and change between
  replays. Each program derives its token range from `seq_lens[b]` itself; no host sync anywhere.
- **Unmapped pages.** Pages past a row's length may be unmapped (an illegal address on the GPU),
  so every K/V load is masked to `[0, seq_lens[b])`; masked lanes are never dereferenced. The
  virtual tensor has more than 2^31 elements: slot and row offsets are int64.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vattn_ray.triton_util import address, as_pointer, tl_dtype

MAX_SPLITS = 64
# Programs resident at once per SM with the default tiles (~70 KiB of shared memory each on
# H100/H200). Splitting aims at one full resident wave: all programs of a uniform batch then
# stream together and finish together, with no tail wave. Tens of resident programs with two
# tiles in flight each already cover HBM's bandwidth-delay product, so fewer is fine too.
PROGRAMS_PER_SM = 3


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (tile of BLOCK_N tokens, pipelined `num_stages` deep)."""

    block_n: int
    num_warps: int
    num_stages: int


def default_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Tiles for H100/H200: K+V of one stage is 2 * BLOCK_N * D * itemsize bytes of shared memory
    (32 KiB at D=128 bf16, BLOCK_N=64); three stages keep ~100 KiB of loads in flight per program,
    two programs per SM."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if itemsize >= 4:  # float32: twice the bytes a token, half the tokens a tile
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return DecodeConfig(block_n=64, num_warps=4, num_stages=4)
    return DecodeConfig(block_n=64, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: read once, never inside a capture)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_rows: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per row: the most that keep rows * heads * splits within one resident wave
    (PROGRAMS_PER_SM * SMs), at least 1 and at most MAX_SPLITS.

    Depends on shapes only, so a CUDA graph captured for a batch size stays valid for any lengths.
    """
    pairs = max(1, num_rows * num_kv_heads)
    return max(1, min(MAX_SPLITS, PROGRAMS_PER_SM * num_sms // pairs))


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Head sizes the kernel tiles exactly (a power of two, >= 16 for `tl.dot`) and its dtypes."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and dtype in (
        torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _split_len(seq_len, num_splits, BLOCK_N: tl.constexpr):
    # Tokens per split, whole tiles: the same formula in both kernels, so the merge knows which
    # splits did any work without reading a flag. At least one tile, so a zero length divides safely.
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N), 1) * BLOCK_N


# Counts are not specialized on (Triton would compile a variant for 1 and for multiples of 16):
# fewer variants, less compile time at engine start.
@triton.jit(do_not_specialize=["num_q_heads", "num_splits"])
def _decode_split_kernel(
    q_ptr, k_addr, v_addr, out_ptr, part_out_ptr, part_lse_ptr,
    slots_ptr, seq_lens_ptr, rows_ptr,
    stride_qt, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_ot, stride_oh,
    num_q_heads, num_splits, scale_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROWS: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, KV_DTYPE: tl.constexpr,
):
    k_ptr = as_pointer(k_addr, KV_DTYPE)  # the virtual KV cache: see vattn_ray/triton_util.py
    v_ptr = as_pointer(v_addr, KV_DTYPE)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    row = tl.load(rows_ptr + b).to(tl.int64) if HAS_ROWS else b
    split_len = _split_len(seq_len, num_splits, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # the query heads of this KV head
    g_ok = offs_g < GROUP

    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)

    # int64 base of this slot's first token of the split; offsets inside a tile fit in int32.
    k_tile = (k_ptr + slot * stride_ks + start.to(tl.int64) * stride_kt + kv_head * stride_kh
              + offs_n[:, None] * stride_kt + offs_d[None, :])
    v_tile = (v_ptr + slot * stride_vs + start.to(tl.int64) * stride_vt + kv_head * stride_vh
              + offs_n[:, None] * stride_vt + offs_d[None, :])
    k_step = BLOCK_N * stride_kt.to(tl.int64)
    v_step = BLOCK_N * stride_vt.to(tl.int64)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    num_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
    for i in range(0, num_tiles):
        n_ok = start + i * BLOCK_N + offs_n < end  # never touch a row at or past the length
        k = tl.load(k_tile, mask=n_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid first token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_tile, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_tile += k_step
        v_tile += v_step

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # an empty split (short row) writes nothing anyway
    o = acc / l_safe[:, None]
    # Store the group's real heads, and nothing at all from a split that starts past the length.
    keep = offs_g < tl.where(start < seq_len, GROUP, 0)
    if DIRECT:  # one split: this is the final result
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=keep[:, None])
    else:
        part = (b * num_q_heads + heads) * num_splits + split  # [rows, H_q, splits] row-major
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=keep[:, None])
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=keep)


@triton.jit(do_not_specialize=["num_q_heads", "num_splits"])
def _decode_merge_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr, rows_ptr,
    stride_ot, stride_oh, num_q_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    # SPLITS_PAD is always MAX_SPLITS: one compiled variant for every split count.
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    row = tl.load(rows_ptr + b).to(tl.int64) if HAS_ROWS else b
    # Only splits that started below the length wrote a partial; the others hold garbage.
    active = tl.cdiv(seq_len, _split_len(seq_len, num_splits, BLOCK_N))
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < active
    part = (b * num_q_heads + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(s_ok, tl.exp2(lse - m), 0.0)
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    den = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, out: torch.Tensor, rows: torch.Tensor | None = None,
                     num_splits: int | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """Decode attention of `len(slots)` rows into `out`.

    q, out: `[T, H_q, D]`; row b reads and writes token row `rows[b]` (b itself when `rows` is None).
    k_cache, v_cache: `[max_slots, max_tokens, H_kv, D]`, any strides with a unit last stride.
    slots: `[B]` int64 slot of each row; seq_lens: `[B]` int32 tokens to attend (>= 1).
    `num_splits` and `config` override the shape-based choices (benchmarks, tests).
    """
    nrows = slots.shape[0]
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not divide into {kv_heads} KV heads")
    if not supports(dim, q.dtype):
        raise ValueError(f"decode kernel needs a power-of-two head_dim >= 16 and a float dtype; "
                         f"got head_dim={dim}, {q.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride in its last dimension")
    if nrows == 0:
        return out
    group = heads // kv_heads
    cfg = config or default_config(dim, q.dtype)
    if num_splits is None:
        # The CPU interpreter (tests) runs one program at a time: count it as 4 SMs, for a few splits.
        sms = sm_count(q.device.index or 0) if q.is_cuda else 4
        num_splits = choose_num_splits(nrows, kv_heads, sms)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(nrows, heads, num_splits, dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(nrows, heads, num_splits, dtype=torch.float32, device=q.device)
    has_rows = rows is not None
    rows_arg = rows if has_rows else slots  # never read when HAS_ROWS is False
    # float32 products in full precision (tf32 would cost accuracy); 16-bit operands ignore this.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(nrows, kv_heads, num_splits)](
        q, address(k_cache), address(v_cache), out, part_out, part_lse, slots, seq_lens, rows_arg,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        heads, num_splits, scale * math.log2(math.e),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_N=cfg.block_n,
        HAS_ROWS=has_rows, DIRECT=direct, PRECISION=precision, KV_DTYPE=tl_dtype(k_cache),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not direct:
        _decode_merge_kernel[(nrows, heads)](
            out, part_out, part_lse, seq_lens, rows_arg, out.stride(0), out.stride(1), heads, num_splits,
            HEAD_DIM=dim, BLOCK_N=cfg.block_n, SPLITS_PAD=triton.next_power_of_2(max(num_splits, MAX_SPLITS)),
            HAS_ROWS=has_rows, num_warps=4 if dim >= 128 else 2)
    return out
