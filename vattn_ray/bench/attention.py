"""Decode attention on the virtual KV layout: FlashAttention-2 varlen, plain vs packed GQA.

    python -m vattn_ray.bench attention --out attention.json

For each (batch, context) the same K/V (a `[slots, tokens, G, H_kv, D]` tensor viewed per layer,
as the KV manager lays it out) is read by: the plain varlen call (one block per query head) and
the packed-GQA call (the query heads of one KV head as rows of one block). Reports µs per call
and effective bandwidth (KV bytes read / time).
"""

from __future__ import annotations

import argparse
import json

import torch

from vattn_ray.attention import build_metadata, get_backend
from vattn_ray.attention.base import flat_view
from vattn_ray.attention.metadata import AttentionMetadata
from vattn_ray.scheduler.plan import SeqChunk


def decode_packed(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
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


def _time(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # µs


def measure(batch: int, context: int, layers_per_tensor: int, heads: int, kv_heads: int, dim: int) -> dict:
    dev = torch.device("cuda")
    cache = torch.randn(batch, context + 1, layers_per_tensor, kv_heads, dim, dtype=torch.bfloat16, device=dev)
    k_cache = cache[:, :, 0]
    v_cache = cache[:, :, layers_per_tensor - 1]
    seqs = [SeqChunk(f"r{i}", i, context, (1,), True) for i in range(batch)]
    meta = build_metadata(seqs, context + 1, dev)
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=dev)
    backend = get_backend("torch")
    scale = dim ** -0.5
    state: dict = {}
    group = heads // kv_heads
    plain = _time(lambda: backend.attend(q, k_cache, v_cache, meta, None, scale))
    packed = _time(lambda: decode_packed(q, k_cache, v_cache, meta, state, scale, group))
    a = backend.attend(q, k_cache, v_cache, meta, None, scale)
    b = decode_packed(q, k_cache, v_cache, meta, state, scale, group)
    kv_bytes = 2 * batch * (context + 1) * kv_heads * dim * 2
    return {"batch": batch, "context": context, "G": layers_per_tensor, "plain_us": plain, "packed_us": packed,
            "plain_TBps": kv_bytes / plain / 1e6, "packed_TBps": kv_bytes / packed / 1e6,
            "max_abs_diff": (a.float() - b.float()).abs().max().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench attention", description=__doc__)
    ap.add_argument("--cases", default="32x4096,256x1152,64x8192,8x16384")
    ap.add_argument("--layers-per-tensor", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for case in args.cases.split(","):
        b, c = (int(x) for x in case.split("x"))
        rows.append(measure(b, c, args.layers_per_tensor, 32, 8, 128))
    print("| batch | context | plain µs | plain TB/s | packed-GQA µs | packed TB/s | max |diff| |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['plain_us']:.1f} | {r['plain_TBps']:.2f} | "
              f"{r['packed_us']:.1f} | {r['packed_TBps']:.2f} | {r['max_abs_diff']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0
