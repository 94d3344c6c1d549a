"""All-reduce sweep: the P2P (symmetric-memory) methods of `vattn_ray.model.comm` against NCCL.

    python -m vattn_ray.bench allreduce --tp 2 [--hidden 4096 --rows 1,8,64,256,1024,8192] --out X.json

For each tensor size `[rows, hidden]` (bf16) and each method that can serve it, `--calls` all-reduces
are captured in one CUDA graph (as they run inside a decode step) and replayed; reported: us per
call, the result's max abs difference from NCCL's, and the method `AllReduce.choose` picks. One
process per GPU (torch.multiprocessing), NCCL for the group.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

METHODS = ("nccl", "one_shot", "two_shot")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vattn_ray.bench allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="ranks (one GPU each)")
    p.add_argument("--hidden", type=int, default=4096, help="columns (the model's hidden size)")
    p.add_argument("--rows", default="1,8,32,64,128,256,512,1024,2048,4096,8192",
                   help="comma list of row counts (tokens in the step)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--calls", type=int, default=64, help="all-reduces per captured graph (a decode step's)")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def sweep(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    """One rank's part: every size and method, correctness against NCCL, then timing."""
    from vattn_ray.model.comm import AllReduce

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)
    dtype = getattr(torch, args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    ar = AllReduce(dist.group.WORLD, device, dtype, max(rows) * args.hidden)
    out = []
    gen = torch.Generator(device=device).manual_seed(rank)
    for n in rows:
        x = torch.randn(n, args.hidden, generator=gen, device=device, dtype=dtype)
        want = x.clone()
        dist.all_reduce(want)
        row = {"rows": n, "bytes": x.numel() * x.element_size(), "chosen": ar.choose(x), "methods": {}}
        for method in METHODS:
            if method != "nccl" and (ar.buffer is None or x.numel() > ar.buffer.numel()):
                continue
            got = _call(ar, method, x.clone())
            diff = (got.float() - want.float()).abs().max().item()
            row["methods"][method] = {"max_abs_diff_vs_nccl": diff, "us_per_call": _time(ar, method, x, args)}
        out.append(row)
    if rank == 0:
        results.put({"tp": world, "symmetric_memory": ar.buffer is not None, "sizes": out})
    dist.barrier()
    dist.destroy_process_group()


def _call(ar, method: str, x: torch.Tensor) -> torch.Tensor:
    if method == "nccl":
        dist.all_reduce(x)
        return x
    return ar(x, method)


def _time(ar, method: str, x: torch.Tensor, args: argparse.Namespace) -> float:
    xs = [x.clone() for _ in range(2)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _call(ar, method, xs[0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(args.calls):
            _call(ar, method, xs[i % 2])
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (args.replays * args.calls)


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    from vattn_ray.bench.provenance import device_info, versions

    args = parse_args(argv)
    if torch.cuda.device_count() < args.tp:
        sys.stderr.write(f"--tp {args.tp} needs {args.tp} GPUs; {torch.cuda.device_count()} visible\n")
        return 2
    for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(key, value)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    t0 = time.perf_counter()
    mp.start_processes(sweep, args=(args.tp, _port(), args, results), nprocs=args.tp, join=True,
                       start_method="spawn")
    report = {"benchmark": "allreduce", "config": vars(args), "versions": versions(),
              "device": device_info(torch.device("cuda", 0)), "seconds": time.perf_counter() - t0,
              **results.get(timeout=60)}
    for row in report["sizes"]:
        cells = "  ".join(f"{m} {v['us_per_call']:7.1f} us (diff {v['max_abs_diff_vs_nccl']:.2g})"
                          for m, v in row["methods"].items())
        print(f"[{row['rows']:5d} x {args.hidden}] {row['bytes'] / 1024:9.0f} KiB  chosen {row['chosen']:8s}  {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0
