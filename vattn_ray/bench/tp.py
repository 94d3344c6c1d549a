"""Tensor-parallel benchmark: head<->worker control overhead, throughput, all-reduce cost.

    python -m vattn_ray.bench tp [--device cuda|cpu] [--model DIR] [--tp 1,2] [--out r.json]

For each worker group (TP=1 in-process; TP>1 over a Ray compiled graph, and over plain actor
calls unless --no-actor-calls), one engine is started and measured three ways:
(a) Control overhead per step: the head times `executor.execute(plan)` round trips of an empty
    plan and of a one-token decode plan while every worker times its own `execute`; overhead =
    round trip - the slowest rank's execute. Everything else a step costs (plan in, output out,
    the graph's channels) is in it.
(b) Throughput: `--num-requests` requests of `--input-len` random tokens, `--output-len` tokens
    each (ignore_eos), all submitted at once; output tokens/s and the decode step time (steps in
    which every sequence computes one token).
(c) All-reduce (TP>1): the 2 per layer a decode step does, timed on the workers as
    `torch.distributed.all_reduce` (NCCL on cuda) of a [decode batch, hidden] tensor of the model's
    dtype; and a sweep over --allreduce-rows decode batch sizes of [rows, hidden], timed eagerly and
    (cuda) as replays of one CUDA graph of a decode step's worth of all-reduces, as the decode graph
    runs them. The sweep times NCCL and the project's own all-reduce (`project_all_reduce`, the one
    hook to point at the entry point the model's layers call) side by side, with the largest
    difference between their results on the same random input.
(d) `decode_step_vs_tp1`: each TP size's decode step p50 over TP=1's (same requests; give
    --num-requests 256 for the batch-256 step).
Defaults on cuda: a Llama-3-8B-shaped bf16 checkpoint (built into /tmp/vattn-llama3-8b if
missing), 128 requests, 512 in, 128 out. On cpu: a tiny random llama and small sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from vattn_ray.config import EngineArgs, read_hf_config
from vattn_ray.engine import LLMEngine
from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.plan import KVOp, NewRequest, SeqChunk, StepPlan
from vattn_ray.bench import fill_device_defaults, pid_alive
from vattn_ray.bench.provenance import device_info, versions

LLAMA8B_DIR = "/tmp/vattn-llama3-8b"
PROBE = "bench-probe"  # the request id of the one-token overhead plans


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vattn_ray.bench tp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", help="checkpoint dir (default: cuda the 8B-shaped one, cpu a tiny llama)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tp", default="1,2", help="comma list of tensor-parallel sizes")
    p.add_argument("--no-actor-calls", action="store_true", help="skip TP>1 over plain actor calls")
    p.add_argument("--overhead-steps", type=int, default=None, help="timed steps per plan (cuda 500, cpu 50)")
    p.add_argument("--num-requests", type=int, default=None, help="cuda 128, cpu 8")
    p.add_argument("--input-len", type=int, default=None, help="cuda 512, cpu 32")
    p.add_argument("--output-len", type=int, default=None, help="cuda 128, cpu 16")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--allreduce-iters", type=int, default=None, help="timed decode steps' worth (cuda 50, cpu 5)")
    p.add_argument("--allreduce-rows", default=None,
                   help="decode batch sizes of the all-reduce sweep (cuda 1,8,32,64,128,256; cpu 1,3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    fill_device_defaults(args, args.device == "cuda", {
        "dtype": ("bfloat16", "float32"), "overhead_steps": (500, 50), "num_requests": (128, 8),
        "input_len": (512, 32), "output_len": (128, 16), "allreduce_iters": (50, 5),
        "allreduce_rows": ("1,8,32,64,128,256", "1,3")})
    args.allreduce_row_list = [int(r) for r in args.allreduce_rows.split(",") if r.strip()]
    args.tps = [int(t) for t in args.tp.split(",")]
    return args


# -- run on the workers (module-level so Ray actors can import them) --------------------------------
def install_step_timer(worker) -> None:
    """Wrap `worker.submit` so each step records its own duration, from launch to output ready
    (on a TP rank the output is taken one command later: the time between is the rank's own);
    clear what was recorded so far."""
    if not hasattr(worker, "bench_step_s"):
        inner, times = worker.submit, []

        class Timed:
            def __init__(self, pending, t0: float) -> None:
                self.pending, self.t0 = pending, t0

            def result(self):
                out = self.pending.result()
                times.append(time.perf_counter() - self.t0)
                return out

        def timed(plan):
            t0 = time.perf_counter()
            return Timed(inner(plan), t0)

        worker.submit = timed
        worker.bench_step_s = times
    worker.bench_step_s.clear()


def take_step_times(worker) -> list[float]:
    times = list(worker.bench_step_s)
    worker.bench_step_s.clear()
    return times


def time_all_reduce(worker, rows: int, cols: int, per_step: int, iters: int) -> float:
    """Seconds for `per_step` all-reduces (torch.distributed) of a [rows, cols] tensor, per step."""
    return _time_calls(worker, lambda x: torch.distributed.all_reduce(x, group=worker.group), rows, cols,
                       per_step, iters)


def project_all_reduce(worker):
    """The all-reduce the model's layers call (vattn_ray/model/comm.py: peer-to-peer for step-sized
    tensors, NCCL above), or None on a single rank. `fn(x) -> reduced tensor` over `worker.group`."""
    return getattr(worker, "all_reduce", None)


def sweep_all_reduce(worker, rows_list: list[int], cols: int, per_step: int, iters: int) -> list[dict]:
    """Per rows: NCCL (torch.distributed) and the project's all-reduce, eager and (cuda) in a CUDA
    graph of `per_step` calls; microseconds per call and the max |difference| of their results."""
    ours = project_all_reduce(worker)

    def nccl(x):
        torch.distributed.all_reduce(x, group=worker.group)
        return x

    out = []
    for rows in rows_list:
        row: dict = {"rows": rows, "shape": [rows, cols], "dtype": str(worker.dtype).replace("torch.", "")}
        for name, fn in (("nccl", nccl), ("project", ours)):
            if fn is None:
                row[f"{name}_us"] = None
                continue
            row[f"{name}_us"] = 1e6 * _time_calls(worker, fn, rows, cols, per_step, iters) / per_step
            if worker.device.type == "cuda":
                try:
                    row[f"{name}_graph_us"] = 1e6 * _time_graph(worker, fn, rows, cols, per_step, iters) / per_step
                except Exception as exc:  # noqa: BLE001 - one mode failing must not lose the rest
                    row[f"{name}_graph_error"] = f"{type(exc).__name__}: {exc}"
        if ours is not None:
            gen = torch.Generator(device=worker.device).manual_seed(1234 + worker.rank)
            x = torch.randn(rows, cols, generator=gen, device=worker.device).to(worker.dtype)
            want = nccl(x.clone())
            got = ours(x.clone())
            row["max_abs_diff_vs_nccl"] = float((got.float() - want.float()).abs().max())
        out.append(row)
    return out


def _sync(worker) -> None:
    if worker.device.type == "cuda":
        torch.cuda.synchronize(worker.device)


def _time_calls(worker, fn, rows: int, cols: int, per_step: int, iters: int) -> float:
    """Seconds for `per_step` eager calls, averaged over `iters` steps."""
    x = torch.zeros(rows, cols, dtype=worker.dtype, device=worker.device)
    for _ in range(5):
        fn(x)
    _sync(worker)
    t0 = time.perf_counter()
    for _ in range(iters * per_step):
        fn(x)
    _sync(worker)
    return (time.perf_counter() - t0) / iters


def _time_graph(worker, fn, rows: int, cols: int, per_step: int, iters: int) -> float:
    """Seconds per replay of one CUDA graph of `per_step` calls (launch costs gone, as in decode)."""
    x = torch.zeros(rows, cols, dtype=worker.dtype, device=worker.device)
    side = torch.cuda.Stream(device=worker.device)
    side.wait_stream(torch.cuda.current_stream(worker.device))
    with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream(worker.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_step):
            fn(x)
    for _ in range(3):
        graph.replay()
    _sync(worker)
    t0 = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    _sync(worker)
    return (time.perf_counter() - t0) / iters


# -- (a) control overhead ----------------------------------------------------------------------------
def bench_overhead(engine: LLMEngine, steps: int) -> list[dict]:
    """Round trips of an empty and of a one-token plan against each rank's own execute time."""
    ex = engine.executor
    ex.run_on_workers(install_step_timer)
    # A probe request of one token in slot 0; the scheduler has not used any slot yet.
    ex.execute(StepPlan(0, kv_now=(KVOp(0, 1),),
                        new_requests=(NewRequest(PROBE, SamplingParams(temperature=0.0)),)))
    plans = {"empty": StepPlan(1),
             "one token": StepPlan(1, seqs=(SeqChunk(PROBE, 0, 0, (7,), sample=True),))}
    rows = []
    for name, plan in plans.items():
        for _ in range(min(20, steps)):  # warm-up: channels, kernels, allocator
            ex.execute(plan)
        ex.run_on_workers(take_step_times)
        head = []
        for _ in range(steps):
            t0 = time.perf_counter()
            ex.execute(plan)
            head.append(time.perf_counter() - t0)
        ranks = ex.run_on_workers(take_step_times)
        worker = [max(r[i] for r in ranks) for i in range(steps)]
        overhead = [h - w for h, w in zip(head, worker)]
        rows.append({"plan": name, "steps": steps, "round_trip_us_p50": _us(_pct(head, 50)),
                     "worker_us_p50": _us(_pct(worker, 50)), "overhead_us_p50": _us(_pct(overhead, 50)),
                     "overhead_us_p90": _us(_pct(overhead, 90)), "overhead_us_mean": _us(statistics.mean(overhead))})
    ex.execute(StepPlan(2, kv_now=(KVOp(0, 0),), finished=(PROBE,)))
    engine.check_integrity()  # the probe left every shard as the scheduler believes it is
    return rows


# -- (b) throughput ---------------------------------------------------------------------------------
def bench_throughput(engine: LLMEngine, args: argparse.Namespace, vocab: int) -> dict:
    _drive(engine, _prompts(2, min(args.input_len, 16), vocab, args.seed + 1), 4)  # warm-up
    prompts = _prompts(args.num_requests, args.input_len, vocab, args.seed)
    t0 = time.perf_counter()
    steps = _drive(engine, prompts, args.output_len)
    elapsed = time.perf_counter() - t0
    engine.check_integrity()
    decode = [(dt, n) for dt, n, tokens in steps if tokens == n]  # every sequence: one token
    out_tokens = args.num_requests * args.output_len
    return {"requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
            "elapsed_s": elapsed, "output_tok_per_s": out_tokens / elapsed,
            "total_tok_per_s": (out_tokens + args.num_requests * args.input_len) / elapsed,
            "steps": len(steps), "decode_steps": len(decode),
            "decode_step_ms_p50": 1e3 * _pct([d for d, _ in decode], 50) if decode else None,
            "decode_step_ms_p90": 1e3 * _pct([d for d, _ in decode], 90) if decode else None,
            "decode_batch_p50": _pct([n for _, n in decode], 50) if decode else None}


def _drive(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[tuple[float, int, int]]:
    """Run `prompts` to the end through the engine's step loop; (seconds since the previous step
    completed, sequences, tokens) of every step."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{engine.num_steps}-{i}", p, params)
    records = []
    engine.step_observers.append(records.append)
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.step_observers.remove(records.append)
    steps, prev = [], start
    for r in records:
        steps.append((r.done_at - prev, r.num_seqs, r.num_tokens))
        prev = r.done_at
    return steps


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


# -- (c) all-reduce ---------------------------------------------------------------------------------
def bench_all_reduce(engine: LLMEngine, rows: int, iters: int, decode_step_ms: float | None) -> dict:
    hf = read_hf_config(engine.config.model.model)
    per_step = 2 * int(hf["num_hidden_layers"])  # attention and MLP outputs of every layer
    secs = max(engine.executor.run_on_workers(time_all_reduce, rows, int(hf["hidden_size"]), per_step, iters))
    return {"shape": [rows, int(hf["hidden_size"])], "dtype": engine.config.model.dtype,
            "per_step": per_step, "us_each": 1e6 * secs / per_step, "ms_per_step": 1e3 * secs,
            "share_of_decode_step": (1e3 * secs / decode_step_ms) if decode_step_ms else None}


def bench_all_reduce_sweep(engine: LLMEngine, rows_list: list[int], iters: int) -> dict:
    hf = read_hf_config(engine.config.model.model)
    per_step = 2 * int(hf["num_hidden_layers"])
    ranks = engine.executor.run_on_workers(sweep_all_reduce, rows_list, int(hf["hidden_size"]), per_step, iters)
    rows = []
    for i, first in enumerate(ranks[0]):  # the slowest rank's time; the largest difference of any rank
        row = dict(first)
        for key in first:
            values = [r[i][key] for r in ranks]
            if key.endswith("_us") or key == "max_abs_diff_vs_nccl":
                row[key] = None if any(v is None for v in values) else max(values)
        rows.append(row)
    return {"per_step": per_step, "project_all_reduce": any(r["project_us"] is not None for r in rows),
            "rows": rows}


def decode_step_vs_tp1(groups: list[dict]) -> list[dict]:
    """Each group's decode step p50 (and throughput) over TP=1's, where TP=1 ran."""
    base = next((g for g in groups if g["tp"] == 1), None)
    if base is None or not base["throughput"]["decode_step_ms_p50"]:
        return []
    b = base["throughput"]
    return [{"tp": g["tp"], "control": g["control"], "decode_batch_p50": g["throughput"]["decode_batch_p50"],
             "decode_step_ms_p50": g["throughput"]["decode_step_ms_p50"],
             "decode_step_over_tp1": (g["throughput"]["decode_step_ms_p50"] or 0) / b["decode_step_ms_p50"],
             "output_tok_per_s_over_tp1": g["throughput"]["output_tok_per_s"] / b["output_tok_per_s"]}
            for g in groups if g["tp"] > 1]


# -- driver -----------------------------------------------------------------------------------------
def _groups(args: argparse.Namespace) -> list[tuple[int, str]]:
    out = []
    for tp in args.tps:
        out += [(1, "in-process")] if tp == 1 else [(tp, "compiled graph")]
        if tp > 1 and not args.no_actor_calls:
            out.append((tp, "actor calls"))
    return out


def _start(args: argparse.Namespace, tp: int, path: str) -> LLMEngine:
    """An engine over `tp` ranks; VATTN_RAY_COMPILED_GRAPH is read when its executor is made."""
    return LLMEngine.from_engine_args(EngineArgs(
        model=path, tensor_parallel_size=tp, device=args.device, dtype=args.dtype,
        max_model_len=args.input_len + args.output_len, max_num_seqs=max(args.num_requests, 2),
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed))


def _stop(engine: LLMEngine) -> None:
    """Shut down and wait until the group's memory is really free for the next one."""
    pids = list(getattr(engine.executor, "pids", []))
    engine.shutdown()
    deadline = time.monotonic() + 60
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_alive(p)]
        time.sleep(0.1)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_group(args: argparse.Namespace, path: str, vocab: int, tp: int, path_kind: str) -> dict:
    old = os.environ.get("VATTN_RAY_COMPILED_GRAPH")
    os.environ["VATTN_RAY_COMPILED_GRAPH"] = "0" if path_kind == "actor calls" else "1"
    try:
        engine = _start(args, tp, path)
    finally:
        if old is None:
            os.environ.pop("VATTN_RAY_COMPILED_GRAPH")
        else:
            os.environ["VATTN_RAY_COMPILED_GRAPH"] = old
    try:
        row = {"tp": tp, "control": path_kind, "overhead": bench_overhead(engine, args.overhead_steps)}
        row["throughput"] = bench_throughput(engine, args, vocab)
        # The record fields the throughput bench's results carry, so one reader reads both.
        row.update(system="vattn", workload=f"fixed {args.num_requests}x{args.input_len}/{args.output_len}",
                   output_tokens_per_s=row["throughput"]["output_tok_per_s"])
        if tp > 1:
            t = row["throughput"]
            batch = int(t["decode_batch_p50"] or args.num_requests)
            row["all_reduce"] = bench_all_reduce(engine, batch, args.allreduce_iters, t["decode_step_ms_p50"])
            row["all_reduce_sweep"] = bench_all_reduce_sweep(engine, args.allreduce_row_list, args.allreduce_iters)
        return row
    finally:
        _stop(engine)


def _model_path(args: argparse.Namespace, scratch: str) -> str:
    from vattn_ray.model.builder import build_random_checkpoint

    if args.model:
        return args.model
    if args.device == "cpu":
        return build_random_checkpoint(os.path.join(scratch, "llama"), "llama", seed=args.seed)
    if not os.path.isfile(os.path.join(LLAMA8B_DIR, "tokenizer.json")):  # written last by the builder
        build_random_checkpoint(LLAMA8B_DIR, "llama", preset="llama-3-8b", dtype="bfloat16", seed=0)
    return LLAMA8B_DIR


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from vattn_ray.ray_executor import WORKER_ENV

    own_ray = max(args.tps) > 1 and not ray.is_initialized()
    if own_ray:
        ray.init(include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
    try:
        with tempfile.TemporaryDirectory(prefix="vattn-bench-tp-") as scratch:
            path = _model_path(args, scratch)
            vocab = int(read_hf_config(path)["vocab_size"])
            rows = [_run_group(args, path, vocab, tp, kind) for tp, kind in _groups(args)]
    finally:
        if own_ray:
            ray.shutdown()
    result = {"device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "device": device_info(torch.device(args.device)), "versions": versions(),
              "model": path if args.model or args.device == "cuda" else "tiny random llama",
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "tps")}, "groups": rows,
              "decode_step_vs_tp1": decode_step_vs_tp1(rows)}
    sys.stdout.write(render(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


# -- report -----------------------------------------------------------------------------------------
def render(result: dict) -> str:
    g = result["groups"]
    lines = [f"TP benchmark on {result['device_name']}, model {result['model']}", "",
             "Control overhead per step (head round trip - slowest rank's own execute):", "",
             "| TP | control path | plan | round trip µs p50 | worker µs p50 | overhead µs p50 | overhead µs p90 |",
             "|---|---|---|---|---|---|---|"]
    for r in g:
        for o in r["overhead"]:
            lines.append(f"| {r['tp']} | {r['control']} | {o['plan']} | {o['round_trip_us_p50']:.0f} "
                         f"| {o['worker_us_p50']:.0f} | {o['overhead_us_p50']:.0f} | {o['overhead_us_p90']:.0f} |")
    lines += ["", "| TP | control path | requests | in / out | s | output tok/s | total tok/s "
              "| decode step ms p50 | p90 | decode batch p50 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in g:
        t = r["throughput"]
        lines.append(f"| {r['tp']} | {r['control']} | {t['requests']} | {t['input_len']} / {t['output_len']} "
                     f"| {t['elapsed_s']:.2f} | {t['output_tok_per_s']:.0f} | {t['total_tok_per_s']:.0f} "
                     f"| {_f(t['decode_step_ms_p50'])} | {_f(t['decode_step_ms_p90'])} | {_f(t['decode_batch_p50'], 0)} |")
    ar = [r for r in g if "all_reduce" in r]
    if ar:
        lines += ["", "| TP | control path | all-reduce shape | dtype | per step | µs each | ms per step "
                  "| share of decode step |", "|---|---|---|---|---|---|---|---|"]
        for r in ar:
            a = r["all_reduce"]
            share = "-" if a["share_of_decode_step"] is None else f"{100 * a['share_of_decode_step']:.1f}%"
            lines.append(f"| {r['tp']} | {r['control']} | {a['shape'][0]}x{a['shape'][1]} | {a['dtype']} "
                         f"| {a['per_step']} | {a['us_each']:.1f} | {a['ms_per_step']:.3f} | {share} |")
    sweeps = [r for r in g if "all_reduce_sweep" in r]
    if sweeps:
        lines += ["", "All-reduce per call, µs (slowest rank; graph = replays of a CUDA graph of a step's calls):", "",
                  "| TP | control path | shape | NCCL | NCCL graph | project | project graph | max abs diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sweeps:
            for a in r["all_reduce_sweep"]["rows"]:
                lines.append(f"| {r['tp']} | {r['control']} | {a['rows']}x{a['shape'][1]} | {_f(a['nccl_us'], 1)} "
                             f"| {_f(a.get('nccl_graph_us'), 1)} | {_f(a['project_us'], 1)} "
                             f"| {_f(a.get('project_graph_us'), 1)} | {_f(a.get('max_abs_diff_vs_nccl'), 4)} |")
    ratios = result.get("decode_step_vs_tp1") or []
    if ratios:
        lines += ["", "| TP | control path | decode batch p50 | decode step ms p50 | step / TP=1 | tok/s / TP=1 |",
                  "|---|---|---|---|---|---|"]
        for q in ratios:
            lines.append(f"| {q['tp']} | {q['control']} | {_f(q['decode_batch_p50'], 0)} | {_f(q['decode_step_ms_p50'])} "
                         f"| {_f(q['decode_step_over_tp1'])} | {_f(q['output_tok_per_s_over_tp1'])} |")
    return "\n".join(lines) + "\n"


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _us(seconds: float) -> float:
    return 1e6 * seconds


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
