"""Bursty load on two replicas, with and without elastic memory (merge into a pipeline), one run.

    python -m vattn_ray.bench elastic --build 32b --ckpt-dir /tmp/q32 --build-only           # once
    python -m vattn_ray.bench elastic --model /tmp/q32 --kv-cache-memory-bytes 4294967296 \\
        --out docs/results/elastic_2xh200.json                                             # 2 GPUs
    python -m vattn_ray.bench elastic --build tiny --duration-s 12 --out /tmp/elastic_smoke.json   # CPU

`vattn_ray/bench/gpu_elastic.sh` runs the GPU tests, the build and this benchmark in one bounded call.

The trace (seeded, identical for both passes): Poisson arrivals at --rate requests/s, multiplied by
--burst-factor inside each burst window (--bursts start seconds, each --burst-s long); prompts and
outputs drawn log-normally around --input-len / --output-len. Both passes run on the same two
replicas (an `ElasticPair`), after a warm-up that compiles every kernel and (unless
--no-warm-up-transitions) merges and splits the pair once: first with the policy disabled (two
independent replicas, requests routed to the one with the most free KV), then enabled (merge at
--merge-usage, split below --split-usage). Every request is greedy with ignore_eos. After the
trace, work in flight is given up to --drain-s to finish; --deadline-s bounds the whole run (each
pass is cut to fit, and the JSON says so).

Per pass: TTFT p50/p99 of requests arriving inside bursts (`*_burst_ms`) and of all requests (a
request with no first token when the pass stopped counts with the time it had waited, a lower
bound, and is counted in `burst_without_first_token`), sent / completed, output tokens/s (output
tokens of completed requests / seconds from the pass start to the last completion), goodput
(requests/s completed with TTFT <= --slo-ttft-s), preemptions, and every merge/split with its
duration, restore time and KV capacity before/after. The JSON is rewritten after every phase, so
a run stopped from outside still leaves what it measured (`complete` is false then).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time

from vattn_ray.bench import elastic_passes as passes

logger = logging.getLogger(__name__)
SHAPE_32B = dict(preset="llama-3-8b", dtype="bfloat16", hidden_size=5120, intermediate_size=27648,
                 num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                 max_position_embeddings=32768, rope_scaling=None)
SHUTDOWN_RESERVE_S = 25.0  # kept at the end of --deadline-s for the integrity check and shutdown
make_trace = passes.make_trace  # the trace is part of this benchmark's interface


def build_checkpoint(kind: str, out_dir: str, num_layers: int | None) -> str:
    """A random checkpoint of the 32B shape (bf16, ~65 GB, drawn on the GPU when there is one) or
    the tiny test shape; reused if present (it is built aside and renamed when complete)."""
    import shutil

    import torch

    from vattn_ray.model.builder import build_random_checkpoint

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    shape = dict(SHAPE_32B) if kind == "32b" else dict(num_hidden_layers=4)
    if num_layers:
        shape["num_hidden_layers"] = num_layers
    on = "cuda" if kind == "32b" and torch.cuda.is_available() else None
    partial = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    build_random_checkpoint(partial, "llama", seed=0, generate_on=on, **shape)
    os.rename(partial, out_dir)
    return out_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vattn_ray.bench elastic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (else --build one into --ckpt-dir)")
    p.add_argument("--build", choices=("tiny", "32b"), default="tiny")
    p.add_argument("--ckpt-dir", default="/tmp/vattn-elastic-ckpt")
    p.add_argument("--num-layers", type=int, help="override the built shape's layer count")
    p.add_argument("--build-only", action="store_true", help="build the checkpoint, run nothing")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=512,
                   help="slots; merged, the head has as many for the whole pair: leave room")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int,
                   help="KV budget per replica (else what --gpu-memory-utilization leaves)")
    p.add_argument("--page-bytes", type=int)
    p.add_argument("--rate", type=float, default=2.0, help="steady arrivals per second")
    p.add_argument("--burst-factor", type=float, default=5.0)
    p.add_argument("--bursts", default="5", help="burst start times, seconds")
    p.add_argument("--burst-s", type=float, default=25.0)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--drain-s", type=float, default=40.0)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--merge-usage", type=float, default=0.95)
    p.add_argument("--split-usage", type=float, default=0.5)
    p.add_argument("--check-interval-s", type=float, default=0.5)
    p.add_argument("--min-state-s", type=float, default=5.0, help="least time merged or split")
    p.add_argument("--no-warm-up-transitions", action="store_true",
                   help="warm up on the split pair only (no merge and split before the passes)")
    p.add_argument("--ray-workers", action="store_true",
                   help="each replica's worker in a Ray actor on CPU too (always so on CUDA)")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="seconds from start by which the run ends, passes cut to fit (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="elastic.json")
    return p


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = _parser().parse_args(argv)
    args.bursts = [float(x) for x in args.bursts.split(",") if x]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    deadline = started + args.deadline_s if args.deadline_s > 0 else float("inf")

    import torch

    from vattn_ray.bench.provenance import device_info, versions
    from vattn_ray.config import EngineArgs, read_hf_config
    from vattn_ray.elastic import ElasticConfig, ElasticPair
    from vattn_ray.elastic import stage as stage_fns

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    ver = versions()
    result = {"benchmark": "elastic", "complete": False, "argv": vars(args), "git_commit": ver["git"]["commit"],
              "device": device_info(torch.device("cuda" if cuda else "cpu")), "versions": ver,
              "timings_s": {}}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)

    def mark(phase: str, since: float) -> float:
        now = time.monotonic()
        result["timings_s"][phase] = now - since
        save()
        return now

    signal.signal(signal.SIGTERM, _interrupt)
    t = time.monotonic()
    model = args.model or build_checkpoint(args.build, args.ckpt_dir, args.num_layers)
    result["model"] = model
    t = mark("build", t)
    if args.build_only:
        print(model)
        return 0
    engine = EngineArgs(model=model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        kv_cache_memory_bytes=args.kv_cache_memory_bytes, page_bytes=args.page_bytes)
    policy = dict(merge_kv_usage=args.merge_usage, split_kv_usage=args.split_usage,
                  check_interval_s=args.check_interval_s, min_merged_s=args.min_state_s,
                  min_split_s=args.min_state_s)
    trace = make_trace(args)
    vocab = int(read_hf_config(model)["vocab_size"])
    prompts = passes.trace_prompts(trace, vocab, args.seed)
    result["requests_in_trace"] = len(trace)
    result["burst_requests_in_trace"] = sum(1 for x in trace if x[3])
    pair = ElasticPair(engine, ElasticConfig(enabled=False, **policy), ray_workers=cuda or args.ray_workers)
    try:
        t = mark("engine_start", t)
        layout = pair.layout
        result["replica"] = {"kv_page_groups": pair.replica_groups, "tokens_per_page_group": layout.tokens_per_group,
                             "kv_tokens": pair.replica_groups * layout.tokens_per_group,
                             "kv_bytes_per_token": layout.token_bytes * layout.num_tensors,
                             "ranks": [r for e in pair.replicas for r in e.executor.run_on_workers(stage_fns.memory)]}
        result["warm_up"] = passes.warm_up(pair, vocab, args.max_model_len, not args.no_warm_up_transitions)
        t = mark("warm_up", t)
        left = deadline - time.monotonic() - SHUTDOWN_RESERVE_S
        result["without_elasticity"] = passes.run_pass(pair, trace, prompts, args, time.monotonic() + left / 2)
        t = mark("without_elasticity", t)
        _stop_if_interrupted(result["without_elasticity"])
        pair.set_policy(ElasticConfig(enabled=True, **policy))
        result["with_elasticity"] = passes.run_pass(pair, trace, prompts, args, deadline - SHUTDOWN_RESERVE_S)
        t = mark("with_elasticity", t)
        _stop_if_interrupted(result["with_elasticity"])
        pair.check_integrity()
        result["integrity_checked"] = True
        t = mark("integrity_check", t)
    finally:
        _conclude(result)
        save()
        pair.shutdown()
    result["complete"] = True
    mark("total", started)
    print(json.dumps({k: result[k] for k in ("ratios", "restore", "done_when")} | {
        side: {k: result[side][k] for k in ("sent", "completed", "ttft_p50_burst_ms", "ttft_p99_burst_ms",
                                             "output_tokens_per_s", "merges", "splits", "restore_s")}
        for side in ("without_elasticity", "with_elasticity")}, indent=2))
    return 0


def _stop_if_interrupted(pass_result: dict) -> None:
    if pass_result["interrupted"]:
        raise KeyboardInterrupt("stopped during a pass")


def _interrupt(signum, frame) -> None:
    """`timeout` stops the run with SIGTERM: unwind, so what was measured is saved and the pair closed."""
    raise KeyboardInterrupt(f"signal {signum}")


def _conclude(result: dict) -> None:
    """Ratios, every restore measured (warm-up and passes), and the three goals checked:
    burst p99 TTFT <= 0.2x, throughput >= 0.95x, restore < 2 s."""
    w, wo = result.get("with_elasticity") or {}, result.get("without_elasticity") or {}

    def ratio(k: str) -> float | None:
        return w[k] / wo[k] if w.get(k) is not None and wo.get(k) else None

    result["ratios"] = {"ttft_p99_burst": ratio("ttft_p99_burst_ms"), "ttft_p50_burst": ratio("ttft_p50_burst_ms"),
                        "output_tokens_per_s": ratio("output_tokens_per_s")}
    splits = [e for e in (result.get("warm_up") or {}).get("events", []) + w.get("events", [])
              if e["event"] == "split"]
    restore = [e["restore_s"] for e in splits]
    moved = [e["restore_bytes"] for e in splits]
    result["restore"] = {"restore_s": restore, "restore_s_max": max(restore, default=None),
                         "restore_bytes": moved,
                         "gb_per_s": [b / max(s, 1e-9) / 1e9 for b, s in zip(moved, restore)]}
    r = result["ratios"]
    result["done_when"] = {
        "ttft_p99_burst_ratio_le_0.2": None if r["ttft_p99_burst"] is None else r["ttft_p99_burst"] <= 0.2,
        "throughput_ratio_ge_0.95": None if r["output_tokens_per_s"] is None else r["output_tokens_per_s"] >= 0.95,
        "restore_lt_2s": None if not restore else max(restore) < 2.0,
    }
