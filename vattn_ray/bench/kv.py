"""KV memory benchmark: mapping throughput, and what on-demand mapping costs a decode loop.

    python -m vattn_ray.bench kv [--device cuda|cpu] [--layers-per-tensor 1,8,32] [--out r.json]

(a) Map (+ set_access) and unmap throughput of `KVManager.apply`, for ops that map a whole run
    at once ("bulk") and ops that add one page group each (what decode does).
(b) A simulated decode loop: each step runs a compute kernel sized to `--step-ms` and writes one
    token of K/V per slot into every virtual tensor. Pages come either all pre-mapped, mapped on
    demand before the step (`apply`), or mapped for the NEXT step in the background while this one
    computes (`prefetch`, vAttention's overlap). The prefetch/pre-mapped ratio should be ~1.
Defaults: a Llama-3-8B cache (32 layers, 8 KV heads, head_dim 128, bf16, 2 MiB pages).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from vattn_ray.kvcache.manager import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.plan import KVOp
from vattn_ray.bench import fill_device_defaults

MIB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vattn_ray.bench kv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--page-bytes", type=int, default=2 * MIB)
    p.add_argument("--layers-per-tensor", default=None, help="comma list of G (default 1,8,32; cpu 1,32)")
    p.add_argument("--map-mib", type=int, default=None, help="bytes mapped in (a) (cuda 8192, cpu 512)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="decode slots (cuda 32, cpu 4)")
    p.add_argument("--context", type=int, default=None, help="tokens per slot at the start (cuda 1024, cpu 64)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed (cuda 256, cpu 48)")
    p.add_argument("--step-ms", type=float, default=None, help="compute per step (cuda 4, cpu 3)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--plot", help="draw the results into this file (matplotlib)")
    args = p.parse_args(argv)
    fill_device_defaults(args, args.device == "cuda", {
        "layers_per_tensor": ("1,8,32", "1,32"), "map_mib": (8192, 512), "batch": (32, 4),
        "context": (1024, 64), "steps": (256, 48), "step_ms": (4.0, 3.0)})
    args.gs = [int(g) for g in str(args.layers_per_tensor).split(",")]
    return args


def make_layout(args: argparse.Namespace, g: int, max_slots: int, max_model_len: int) -> KVLayout:
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return KVLayout.build(num_layers=args.num_layers, layers_per_tensor=g, num_kv_heads=args.kv_heads,
                          head_dim=args.head_dim, itemsize=itemsize, page_bytes=args.page_bytes,
                          max_slots=max_slots, max_model_len=max_model_len)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def manager_for(args: argparse.Namespace, layout: KVLayout, groups: int) -> KVManager:
    return KVManager.from_budget(layout, args.device, groups * layout.page_group_bytes,
                                 getattr(torch, args.dtype))


# -- (a) throughput ---------------------------------------------------------------------------------
def bench_throughput(args: argparse.Namespace, g: int) -> list[dict]:
    probe = make_layout(args, g, 1, 1)
    total = max(1, args.map_mib * MIB // probe.page_group_bytes)
    slots = min(8, total)
    per_slot = total // slots
    layout = make_layout(args, g, slots, int(per_slot * probe.tokens_per_group))
    rows = []
    with manager_for(args, layout, slots * per_slot) as m:
        for mode in ("bulk", "1-group ops"):
            grow, shrink = _throughput_ops(slots, per_slot, bulk=mode == "bulk")
            map_s, unmap_s = [], []
            for _ in range(args.reps):
                map_s.append(_timed(args.device, m, grow))
                unmap_s.append(_timed(args.device, m, shrink))
                m.check_integrity({})
            groups = slots * per_slot
            for op, secs in (("map+access", statistics.median(map_s)), ("unmap", statistics.median(unmap_s))):
                rows.append({"G": g, "mode": mode, "op": op, "page_groups": groups,
                             "page_group_bytes": layout.page_group_bytes, "seconds": secs,
                             "GB_per_s": groups * layout.page_group_bytes / secs / 1e9,
                             "groups_per_s": groups / secs, "us_per_group": secs / groups * 1e6})
    return rows


def _throughput_ops(slots: int, per_slot: int, bulk: bool) -> tuple[list[list[KVOp]], list[list[KVOp]]]:
    if bulk:
        return [[KVOp(s, per_slot) for s in range(slots)]], [[KVOp(s, 0) for s in range(slots)]]
    grow = [[KVOp(s, j)] for j in range(1, per_slot + 1) for s in range(slots)]
    shrink = [[KVOp(s, j)] for j in range(per_slot - 1, -1, -1) for s in range(slots)]
    return grow, shrink


def _timed(device: str, m: KVManager, batches: list[list[KVOp]]) -> float:
    sync(device)
    start = time.perf_counter()
    for ops in batches:
        failures = m.apply(ops)
        if failures:
            raise RuntimeError(f"benchmark pool too small: {failures[0]}")
    sync(device)
    return time.perf_counter() - start


# -- (b) decode loop --------------------------------------------------------------------------------
class Compute:
    """A stand-in for a decode step's kernels: a chain of matmuls sized to take `ms`."""

    def __init__(self, device: str, ms: float) -> None:
        n, dtype = (4096, torch.bfloat16) if device == "cuda" else (256, torch.float32)
        self.device = device
        self.a = torch.randn(n, n, device=device, dtype=dtype) / n**0.5
        self.out = torch.empty_like(self.a)
        self.run(10)  # warm-up (library handles, thread pools, clocks)
        per_iter = min(self._time(10) for _ in range(3)) / 10  # min: the machine may be shared
        self.iters = max(1, round(ms / 1e3 / per_iter))

    def _time(self, iters: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.run(iters)
        sync(self.device)
        return time.perf_counter() - start

    def run(self, iters: int | None = None) -> None:
        for _ in range(self.iters if iters is None else iters):
            torch.matmul(self.a, self.a, out=self.out)


def bench_decode(args: argparse.Namespace, g: int, compute: Compute) -> dict:
    b, ctx, steps = args.batch, args.context, args.steps
    per_group = int(make_layout(args, g, 1, 1).tokens_per_group)
    # Stagger the slots' lengths so that page-group boundaries spread over the steps.
    lengths = [ctx + (s * per_group) // b for s in range(b)]
    layout = make_layout(args, g, b, max(lengths) + steps + 1)
    need = [[layout.groups_for_tokens(n + i + 1) for n in lengths] for i in range(steps)]
    step_ops = [[KVOp(s, need[i][s]) for s in range(b) if i == 0 or need[i][s] > need[i - 1][s]]
                for i in range(steps)]
    full = [KVOp(s, need[-1][s]) for s in range(b)]
    dtype = getattr(torch, args.dtype)
    with manager_for(args, layout, sum(need[-1][s] for s in range(b))) as m:
        slots = torch.arange(b, device=args.device)
        base = torch.tensor(lengths, device=args.device)
        token = torch.randn(b, g, args.kv_heads, args.head_dim, device=args.device).to(dtype)

        def step(i: int) -> None:
            compute.run()
            pos = base + i
            for t in m.tensors:  # one new token of K/V per slot in every virtual tensor
                t.index_put_((slots, pos), token)

        times = {"premapped": [], "on_demand": [], "prefetch": []}
        for _ in range(args.reps):
            for mode in times:
                m.apply([KVOp(s, 0) for s in range(b)])
                times[mode].append(_decode_loop(args.device, m, mode, step, step_ops, full))
                m.check_integrity({s: need[-1][s] for s in range(b)})
    mean = {k: statistics.mean(x for rep in v for x in rep) * 1e3 for k, v in times.items()}
    grows = sum(len(ops) for ops in step_ops[1:])
    return {"G": g, "batch": b, "steps": steps, "tokens_per_group": layout.tokens_per_group,
            "grows_per_step": grows / max(1, steps - 1), "compute_iters": compute.iters,
            "premapped_ms": mean["premapped"], "on_demand_ms": mean["on_demand"],
            "prefetch_ms": mean["prefetch"], "prefetch_ratio": mean["prefetch"] / mean["premapped"],
            "on_demand_ratio": mean["on_demand"] / mean["premapped"]}


def _decode_loop(device: str, m: KVManager, mode: str, step, step_ops, full) -> list[float]:
    m.apply(full if mode == "premapped" else step_ops[0])
    sync(device)
    out = []
    for i in range(len(step_ops)):
        start = time.perf_counter()
        if mode == "on_demand" and i > 0:
            _expect_none(m.apply(step_ops[i]))
        if mode == "prefetch":
            _expect_none(m.wait_prefetch())
        step(i)
        if mode == "prefetch" and i + 1 < len(step_ops):
            m.prefetch(step_ops[i + 1])  # maps the next step's pages while this one computes
        sync(device)  # a decode step ends when its tokens are sampled
        out.append(time.perf_counter() - start)
    _expect_none(m.wait_prefetch())
    return out[1:]  # the first step pays one-off costs in every mode


def _expect_none(failures: list) -> None:
    if failures:
        raise RuntimeError(f"benchmark pool too small: {failures[0]}")


# -- report ---------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")


def render(result: dict) -> str:
    lines = [f"KV benchmark on {result['device_name']} ({result['config']['device']}), "
             f"{result['config']['page_bytes'] // 1024} KiB pages", "",
             "| G | mode | op | page groups | GB/s | groups/s | µs/group |",
             "|---|---|---|---|---|---|---|"]
    for r in result["throughput"]:
        lines.append(f"| {r['G']} | {r['mode']} | {r['op']} | {r['page_groups']} | {r['GB_per_s']:.2f} "
                     f"| {r['groups_per_s']:.0f} | {r['us_per_group']:.1f} |")
    lines += ["", "| G | batch | tokens/group | grows/step | pre-mapped ms | on-demand ms | prefetch ms "
              "| prefetch / pre-mapped | on-demand / pre-mapped |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['G']} | {r['batch']} | {r['tokens_per_group']:.0f} | {r['grows_per_step']:.2f} "
                     f"| {r['premapped_ms']:.3f} | {r['on_demand_ms']:.3f} | {r['prefetch_ms']:.3f} "
                     f"| {r['prefetch_ratio']:.4f} | {r['on_demand_ratio']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.device == "cpu":
        # One core plays the GPU; the others stay free for the prefetch thread, as on a GPU host.
        torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    compute = Compute(args.device, args.step_ms)
    result = {"device_name": device_name(args.device),
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
              "throughput": [row for g in args.gs for row in bench_throughput(args, g)],
              "decode": [bench_decode(args, g, compute) for g in args.gs]}
    sys.stdout.write(render(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        from vattn_ray.bench.plots import plot_kv

        plot_kv(result, args.plot)
    return 0
