"""Attention on the virtual KV layout: FlashAttention-2 varlen against the Triton kernels.

    python -m vattn_ray.bench attention --out attention.json [--sweep]
    python -m vattn_ray.bench attention --prefill 1x8192,8x1024,4x512@3072 [--sweep]

For each case `BxC[:G]` (B rows of C context tokens each, G layers per virtual tensor) K and V are
one layer's strided view of `[B, C + 256, G, 8, 128]` bf16 tensors, as the KV manager lays them
out, and three kernels read them in place: FA2 varlen (the `torch` backend), FA2 with the query
heads of a KV head packed as rows, and the Triton decode kernel (the `triton` backend). Each is
timed as CUDA-graph replays of back-to-back calls (what the engine's decode graphs run), so the
time is the GPU's, not Python's launch overhead. Reported: µs per call, KV bytes read / time, and
that as a share of the measured copy bandwidth ((read + write) / time of a 4 GiB device copy).
`--sweep` also times the Triton kernel over tile sizes, warps, pipeline stages and split counts.

`--prefill BxQ[@C][:G]` cases (B rows of Q new tokens after C cached ones, causal; the decode
cases then run only if `--cases` is given too) time FA2 varlen against the Triton prefill kernel
on the same layout, in TFLOP/s of the visible (query, key) pairs (`triton_prefill.causal_flops`:
4 * D * H_q * sum over rows of Q * (C + (Q + 1) / 2)). `--sweep` then times its tiles too.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
from typing import Callable

import torch

from vattn_ray.attention import build_metadata, get_backend
from vattn_ray.attention.base import flat_view
from vattn_ray.attention.metadata import AttentionMetadata
from vattn_ray.bench.provenance import device_info, versions
from vattn_ray.scheduler.plan import SeqChunk

DEFAULT_CASES = "32x1024,128x1024,256x1024,8x15360:4,8x16384:4"
HEADS, KV_HEADS, DIM = 32, 8, 128


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


def time_us(fn: Callable[[], object], calls: int = 20, replays: int = 5) -> float:
    """µs per call: `calls` back-to-back calls captured in one CUDA graph, replayed `replays` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, allocate workspaces
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays) * 1e3


def copy_bandwidth() -> float:
    """TB/s of a device-to-device copy, counting the bytes read and the bytes written: the same
    measurement as the throughput benchmark's (a copy captured in a graph becomes a DMA memcpy
    node, which is slower than the kernel an eager copy runs)."""
    from vattn_ray.bench.throughput import measure_copy_bandwidth

    return measure_copy_bandwidth(torch.device("cuda")) / 1e12


def kv_views(batch: int, tokens: int, layers: int) -> tuple[torch.Tensor, ...]:
    """Random bf16 K/V tensors `[batch, tokens, G, H_kv, D]` as the KV manager lays them out, and
    one layer's strided views of them (token stride G*H*D): (k_full, v_full, k_cache, v_cache)."""
    k_full = torch.empty(batch, tokens, layers, KV_HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    v_full = torch.empty_like(k_full)
    k_full.normal_()
    v_full.normal_()
    layer = min(5, layers - 1)
    return k_full, v_full, k_full[:, :, layer], v_full[:, :, layer]


def sweep_point(rec: dict, make: Callable[[], Callable[[], object]], calls: int, replays: int,
                rate: str, work: float) -> dict:
    """`rec` with the µs per call of `make()`'s function and `rate` = work / time (`work` per µs
    scaled to tera-units), or the error of a configuration that cannot run (e.g. a tile that needs
    more shared memory than the SM has): a sweep records failures instead of stopping."""
    try:
        us = time_us(make(), calls=calls, replays=replays)
        rec.update({"us": us, rate: work / us / 1e6})
    except Exception as e:  # noqa: BLE001 - recorded in the sweep's output
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch.cuda.synchronize()
    return rec


class Case:
    """The K/V views and metadata of one `BxC[:G]` decode batch (all rows at context C)."""

    def __init__(self, spec: str, default_g: int) -> None:
        shape, _, g = spec.partition(":")
        self.batch, self.context = (int(x) for x in shape.split("x"))
        self.layers = int(g) if g else default_g
        dev = torch.device("cuda")
        tokens = self.context + 256
        self.k_full, self.v_full, self.k_cache, self.v_cache = kv_views(self.batch, tokens, self.layers)
        # each row's one new token is the last of its context: it attends to all C tokens
        seqs = [SeqChunk(f"r{i}", i, self.context - 1, (1,), True) for i in range(self.batch)]
        self.meta = build_metadata(seqs, tokens, dev)
        self.q = torch.randn(self.batch, HEADS, DIM, dtype=torch.bfloat16, device=dev)
        self.scale = DIM ** -0.5
        self.kv_bytes = 2 * self.batch * self.context * KV_HEADS * DIM * 2

    def row(self, copy_tbps: float) -> dict:
        fa2 = get_backend("torch")
        tri = get_backend("triton")
        tri_state = tri.prepare(self.meta)
        packed_state: dict = {}
        group = HEADS // KV_HEADS
        runs = {
            "fa2": lambda: fa2.attend(self.q, self.k_cache, self.v_cache, self.meta, None, self.scale),
            "fa2_packed": lambda: decode_packed(self.q, self.k_cache, self.v_cache, self.meta, packed_state,
                                                self.scale, group),
            "triton": lambda: tri.attend(self.q, self.k_cache, self.v_cache, self.meta, tri_state, self.scale),
        }
        out = {"batch": self.batch, "context": self.context, "G": self.layers, "kv_bytes": self.kv_bytes}
        for name, fn in runs.items():
            us = time_us(fn)
            out[f"{name}_us"] = us
            out[f"{name}_TBps"] = self.kv_bytes / us / 1e6
            out[f"{name}_of_copy"] = out[f"{name}_TBps"] / copy_tbps
        ref = runs["fa2"]().float()
        out["triton_max_abs_diff_vs_fa2"] = (runs["triton"]().float() - ref).abs().max().item()
        out["fa2_packed_max_abs_diff_vs_fa2"] = (runs["fa2_packed"]().float() - ref).abs().max().item()
        from vattn_ray.attention import triton_decode as td

        out["triton_num_splits"] = td.choose_num_splits(self.batch, KV_HEADS, td.sm_count(torch.cuda.current_device()))
        out["triton_config"] = dataclasses.asdict(td.default_config(DIM, torch.bfloat16))
        return out

    def sweep(self) -> list[dict]:
        """The Triton kernel over launch configurations and split counts (failures recorded, not fatal)."""
        from vattn_ray.attention import triton_decode as td

        auto = td.choose_num_splits(self.batch, KV_HEADS, td.sm_count(torch.cuda.current_device()))
        splits = sorted({auto} | {s for s in (1, 2, 4, 8, 16, 32, 64) if s <= td.MAX_SPLITS})
        out_t = torch.empty_like(self.q)
        rows = []
        for bn, warps, stages, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), splits):
            fn = functools.partial(td.decode_attention, self.q, self.k_cache, self.v_cache, self.meta.slots,
                                   self.meta.seq_lens, self.scale, out_t, num_splits=s,
                                   config=td.DecodeConfig(bn, warps, stages))
            rec = {"batch": self.batch, "context": self.context, "G": self.layers, "block_n": bn,
                   "num_warps": warps, "num_stages": stages, "num_splits": s}
            rows.append(sweep_point(rec, lambda: fn, 10, 3, "TBps", self.kv_bytes))
        return rows


class PrefillCase:
    """The K/V views and metadata of one `BxQ[@C][:G]` prefill batch (B rows, Q new tokens after C)."""

    def __init__(self, spec: str, default_g: int) -> None:
        shape, _, g = spec.partition(":")
        shape, _, ctx = shape.partition("@")
        self.batch, self.query = (int(x) for x in shape.split("x"))
        self.context = int(ctx) if ctx else 0
        self.layers = int(g) if g else default_g
        dev = torch.device("cuda")
        tokens = self.context + self.query
        self.k_full, self.v_full, self.k_cache, self.v_cache = kv_views(self.batch, tokens, self.layers)
        seqs = [SeqChunk(f"r{i}", i, self.context, (1,) * self.query, True) for i in range(self.batch)]
        self.meta = build_metadata(seqs, tokens, dev)
        self.q = torch.randn(self.meta.num_tokens, HEADS, DIM, dtype=torch.bfloat16, device=dev)
        self.scale = DIM ** -0.5
        from vattn_ray.attention.triton_prefill import causal_flops

        self.flops = causal_flops(self.meta.query_lens, self.meta.context_lens, HEADS, DIM)

    def _fields(self) -> dict:
        return {"batch": self.batch, "query": self.query, "context": self.context, "G": self.layers}

    def row(self) -> dict:
        from vattn_ray.attention import triton_prefill as tp

        fa2, tri = get_backend("torch"), get_backend("triton")
        tri_state = tri.prepare(self.meta)
        runs = {"fa2": lambda: fa2.attend(self.q, self.k_cache, self.v_cache, self.meta, None, self.scale),
                "triton": lambda: tri.attend(self.q, self.k_cache, self.v_cache, self.meta, tri_state, self.scale)}
        out = dict(self._fields(), flops=self.flops)
        for name, fn in runs.items():
            us = time_us(fn, calls=5, replays=3)
            out[f"{name}_us"] = us
            out[f"{name}_TFLOPs"] = self.flops / us / 1e6
        out["triton_vs_fa2"] = out["fa2_us"] / out["triton_us"]
        out["triton_max_abs_diff_vs_fa2"] = (runs["triton"]().float() - runs["fa2"]().float()).abs().max().item()
        out["triton_config"] = dataclasses.asdict(tp.default_config(DIM, torch.bfloat16))
        return out

    def sweep(self) -> list[dict]:
        """The Triton prefill kernel over tile shapes, warps and stages (failures recorded, not fatal)."""
        from vattn_ray.attention import triton_prefill as tp

        out_t = torch.empty_like(self.q)
        rows = []
        for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            cfg = tp.PrefillConfig(bm, bn, warps, stages)
            rec = dict(self._fields(), **dataclasses.asdict(cfg))

            def launch(bm=bm, cfg=cfg):
                return functools.partial(tp.prefill_attention, self.q, self.k_cache, self.v_cache, self.meta,
                                         self.scale, out_t, plan=tp.plan_prefill(self.meta, bm), config=cfg)
            rows.append(sweep_point(rec, launch, 3, 2, "TFLOPs", self.flops))
        return rows


def run_prefill(specs: str, default_g: int, sweep: bool) -> tuple[list[dict], list[dict]]:
    """Rows (and sweep records) of the prefill cases, with their table printed."""
    rows, sweep_rows = [], []
    for spec in specs.split(","):
        case = PrefillCase(spec, default_g)
        rows.append(case.row())
        if sweep:
            sweep_rows.extend(case.sweep())
        del case
        torch.cuda.empty_cache()
    print(f"prefill, causal, H={HEADS}/{KV_HEADS} D={DIM} bf16; TFLOP/s of visible (query, key) pairs")
    print("| rows x new tokens @ cached (G) | FA2 varlen µs | TFLOP/s | Triton µs | TFLOP/s | Triton / FA2 speed "
          "| max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} x {r['query']} @ {r['context']} ({r['G']}) | {r['fa2_us']:.0f} | "
              f"{r['fa2_TFLOPs']:.0f} | {r['triton_us']:.0f} | {r['triton_TFLOPs']:.0f} | "
              f"{r['triton_vs_fa2']:.2f}x | {r['triton_max_abs_diff_vs_fa2']:.1e} |")
    if sweep_rows:
        print("best Triton prefill configuration per case (from --sweep):")
        key = lambda r: (r["batch"], r["query"], r["context"], r["G"])  # noqa: E731
        for k, group in itertools.groupby(sweep_rows, key=key):
            ok = [r for r in group if "TFLOPs" in r]
            if ok:
                best = max(ok, key=lambda r: r["TFLOPs"])
                print(f"  {k[0]} x {k[1]} @ {k[2]} (G={k[3]}): {best['TFLOPs']:.0f} TFLOP/s with "
                      f"block_m={best['block_m']} block_n={best['block_n']} num_warps={best['num_warps']} "
                      f"num_stages={best['num_stages']}")
    return rows, sweep_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated decode cases BxC[:G] (default {DEFAULT_CASES}, unless --prefill)")
    ap.add_argument("--prefill", default=None, help="comma-separated prefill cases BxQ[@C][:G], e.g. 1x8192,8x1024")
    ap.add_argument("--layers-per-tensor", type=int, default=32, help="G of cases that do not name one")
    ap.add_argument("--sweep", action="store_true", help="also time Triton launch configurations")
    ap.add_argument("--out", default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    import triton

    cases = args.cases if args.cases is not None else (None if args.prefill else DEFAULT_CASES)
    prefill_rows, prefill_sweep = (run_prefill(args.prefill, args.layers_per_tensor, args.sweep)
                                   if args.prefill else ([], []))
    copy_tbps = copy_bandwidth()
    print(f"copy bandwidth: {copy_tbps:.2f} TB/s ((read + write) / time, 4 GiB)")
    rows, sweep = [], []
    for spec in cases.split(",") if cases else []:
        case = Case(spec, args.layers_per_tensor)
        rows.append(case.row(copy_tbps))
        if args.sweep:
            sweep.extend(case.sweep())
        del case
        torch.cuda.empty_cache()
    if rows:
        print("| batch x context (G) | FA2 varlen µs | TB/s | FA2 packed-GQA TB/s | Triton split-KV µs | TB/s "
              "| of copy | splits | max abs diff Triton vs FA2 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} x {r['context']} ({r['G']}) | {r['fa2_us']:.1f} | {r['fa2_TBps']:.2f} | "
              f"{r['fa2_packed_TBps']:.2f} | {r['triton_us']:.1f} | {r['triton_TBps']:.2f} | "
              f"{100 * r['triton_of_copy']:.0f}% | {r['triton_num_splits']} | {r['triton_max_abs_diff_vs_fa2']:.1e} |")
    if sweep:
        print("best Triton configuration per case (from --sweep):")
        for (b, c, g), group in itertools.groupby(sweep, key=lambda r: (r["batch"], r["context"], r["G"])):
            ok = [r for r in group if "TBps" in r]
            if not ok:
                print(f"  {b} x {c} (G={g}): every configuration failed")
                continue
            best = max(ok, key=lambda r: r["TBps"])
            print(f"  {b} x {c} (G={g}): {best['TBps']:.2f} TB/s with block_n={best['block_n']} "
                  f"num_warps={best['num_warps']} num_stages={best['num_stages']} num_splits={best['num_splits']}")
    if args.out:
        report = {"command": " ".join(["python -m vattn_ray.bench attention", *argv]),
                  "versions": dict(versions(), triton=triton.__version__),
                  "device": device_info(torch.device("cuda", torch.cuda.current_device())),
                  "copy_TBps": copy_tbps, "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM,
                                                    "dtype": "bfloat16"}, "rows": rows, "sweep": sweep,
                  "prefill_rows": prefill_rows, "prefill_sweep": prefill_sweep}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0
