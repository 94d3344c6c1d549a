"""Bursty load on two replicas, with and without elastic memory (merge into a pipeline), one run.

    python -m vattn_ray.bench elastic --build 32b --ckpt-dir /tmp/q32 --build-only           # once
    python -m vattn_ray.bench elastic --model /tmp/q32 --out docs/results/elastic_2xh200.json
    python -m vattn_ray.bench elastic --build tiny --duration-s 12 --out /tmp/elastic_smoke.json   # CPU

The trace (seeded, identical for both passes): Poisson arrivals at --rate requests/s, multiplied by
--burst-factor inside each burst window (--bursts start seconds, each --burst-s long); prompts and
outputs drawn log-normally around --input-len / --output-len. Both passes run on the same two
replicas (an `ElasticPair`): first with the policy disabled (two independent replicas, requests
routed to the one with the most free KV), then enabled (merge at --merge-usage, split below
--split-usage). Every request is greedy with ignore_eos. After the trace, work in flight is given
up to --drain-s to finish.

Per pass: TTFT p50/p99 of requests arriving inside bursts (`*_burst_ms`) and of all requests,
sent / completed, output tokens/s (output tokens of completed requests / seconds from the first
arrival to the last completion), goodput (requests/s completed with TTFT <= --slo-ttft-s),
preemptions, and every merge/split with its duration, restore time and KV capacity before/after.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time

from vattn_ray.bench.workloads import percentile

logger = logging.getLogger(__name__)
SHAPE_32B = dict(preset="llama-3-8b", dtype="bfloat16", hidden_size=5120, intermediate_size=27648,
                 num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                 max_position_embeddings=32768, rope_scaling=None)


def build_checkpoint(kind: str, out_dir: str, num_layers: int | None) -> str:
    """A random checkpoint of the 32B shape (bf16, ~65 GB) or the tiny test shape; reused if present."""
    from vattn_ray.model.builder import build_random_checkpoint

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    shape = dict(SHAPE_32B) if kind == "32b" else dict(num_hidden_layers=4)
    if num_layers:
        shape["num_hidden_layers"] = num_layers
    return build_random_checkpoint(out_dir, "llama", seed=0, **shape)


def make_trace(args) -> list[tuple[float, int, int, bool]]:
    """(arrival s, prompt len, output len, inside a burst) for every request, seeded."""
    rng = random.Random(args.seed)
    windows = [(s, s + args.burst_s) for s in args.bursts]
    out, t = [], 0.0
    while True:
        in_burst = any(a <= t < b for a, b in windows)
        t += rng.expovariate(args.rate * (args.burst_factor if in_burst else 1.0))
        if t >= args.duration_s:
            return out
        in_burst = any(a <= t < b for a, b in windows)
        prompt = _lognormal(rng, args.input_len, args.max_model_len // 2)
        output = _lognormal(rng, args.output_len, args.max_model_len - prompt)
        out.append((t, prompt, output, in_burst))


def _lognormal(rng: random.Random, median: int, hi: int) -> int:
    return max(4, min(hi, int(median * math.exp(rng.gauss(0.0, 0.5)))))


def run_pass(pair, trace, args, vocab: int) -> dict:
    from vattn_ray import SamplingParams

    rng = random.Random(args.seed + 1)
    prompts = [[rng.randrange(3, vocab) for _ in range(p)] for _, p, _, _ in trace]
    events_before = len(pair.events)
    preempt_before = pair.preemptions()
    arrival: dict[str, tuple[float, bool, int]] = {}
    ttft: dict[str, float] = {}
    done_at: dict[str, float] = {}
    out_tokens = 0
    start = time.monotonic()
    nxt = 0
    deadline = start + args.duration_s + args.drain_s
    while nxt < len(trace) or pair.has_work():
        now = time.monotonic()
        if now > deadline:
            break
        while nxt < len(trace) and trace[nxt][0] <= now - start:
            at, _, out_len, burst = trace[nxt]
            rid = f"q{nxt}"
            pair.add_request(rid, prompts[nxt], SamplingParams(max_tokens=out_len, temperature=0.0,
                                                               ignore_eos=True))
            arrival[rid] = (start + at, burst, out_len)
            nxt += 1
        if not pair.has_work():
            time.sleep(max(0.0, min(0.05, start + trace[nxt][0] - time.monotonic())) if nxt < len(trace) else 0)
            continue
        for req in pair.step():
            rid = req.request_id
            if rid not in ttft and req.first_token_time is not None:
                ttft[rid] = req.first_token_time - arrival[rid][0]
            if req.finished:
                done_at[rid] = time.monotonic()
                out_tokens += len(req.token_ids)
    for rid in list(pair.requests):
        pair.abort_request(rid)  # cut by --drain-s: counted as sent, not completed
    while pair.has_work():
        pair.step()
    end = max(done_at.values(), default=time.monotonic())
    burst_ttft = [v for k, v in ttft.items() if arrival[k][1]]
    slo = sum(1 for k in done_at if ttft.get(k, math.inf) <= args.slo_ttft_s)
    span = max(end - start, 1e-9)
    events = pair.events[events_before:]
    merges = [e for e in events if e["event"] == "merge"]
    splits = [e for e in events if e["event"] == "split"]
    result = {
        "sent": len(arrival), "completed": len(done_at),
        "ttft_p50_burst_ms": 1000 * percentile(burst_ttft, 50) if burst_ttft else None,
        "ttft_p99_burst_ms": 1000 * percentile(burst_ttft, 99) if burst_ttft else None,
        "ttft_p50_ms": 1000 * percentile(list(ttft.values()), 50) if ttft else None,
        "ttft_p99_ms": 1000 * percentile(list(ttft.values()), 99) if ttft else None,
        "burst_requests": sum(1 for a in arrival.values() if a[1]),
        "output_tokens": out_tokens, "seconds": span, "output_tokens_per_s": out_tokens / span,
        "goodput_req_per_s": slo / span, "preemptions": pair.preemptions() - preempt_before,
        "merges": len(merges), "splits": len(splits),
        "merge_s": [e["duration_s"] for e in merges], "split_s": [e["duration_s"] for e in splits],
        "restore_s": [e["restore_s"] for e in splits],
        "kv_tokens_before_merge": [sum(e["kv_groups_before"]) * e["tokens_per_group_before"] for e in merges],
        "kv_tokens_merged": [e["kv_groups_after"] * e["tokens_per_group_after"] for e in merges],
        "events": [{k: v for k, v in e.items() if k != "monotonic"} | {"t_s": e["monotonic"] - start}
                   for e in events],
    }
    return result


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int, help="KV budget per replica (CPU smoke tests)")
    p.add_argument("--page-bytes", type=int)
    p.add_argument("--rate", type=float, default=8.0, help="steady arrivals per second")
    p.add_argument("--burst-factor", type=float, default=5.0)
    p.add_argument("--bursts", default="20,75", help="burst start times, seconds")
    p.add_argument("--burst-s", type=float, default=25.0)
    p.add_argument("--duration-s", type=float, default=120.0)
    p.add_argument("--drain-s", type=float, default=60.0)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--merge-usage", type=float, default=0.95)
    p.add_argument("--split-usage", type=float, default=0.5)
    p.add_argument("--check-interval-s", type=float, default=0.5)
    p.add_argument("--min-state-s", type=float, default=5.0, help="least time merged or split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="elastic.json")
    args = p.parse_args(argv)
    args.bursts = [float(x) for x in args.bursts.split(",") if x]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from vattn_ray.bench.provenance import device_info, versions
    from vattn_ray.config import EngineArgs, read_hf_config
    from vattn_ray.elastic import ElasticConfig, ElasticPair

    model = args.model or build_checkpoint(args.build, args.ckpt_dir, args.num_layers)
    if args.build_only:
        print(model)
        return 0
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    engine = EngineArgs(model=model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        kv_cache_memory_bytes=args.kv_cache_memory_bytes, page_bytes=args.page_bytes)
    policy = dict(merge_kv_usage=args.merge_usage, split_kv_usage=args.split_usage,
                  check_interval_s=args.check_interval_s, min_merged_s=args.min_state_s,
                  min_split_s=args.min_state_s)
    trace = make_trace(args)
    vocab = int(read_hf_config(model)["vocab_size"])
    started = time.perf_counter()
    pair = ElasticPair(engine, ElasticConfig(enabled=False, **policy), ray_workers=cuda)
    start_s = time.perf_counter() - started
    try:
        run_pass(pair, trace[: max(1, len(trace) // 50)], argparse.Namespace(**{**vars(args), "drain_s": 60.0}),
                 vocab)  # warm-up: kernels, allocator
        without = run_pass(pair, trace, args, vocab)
        pair.set_policy(ElasticConfig(enabled=True, **policy))
        with_e = run_pass(pair, trace, args, vocab)
        pair.check_integrity()
    finally:
        pair.shutdown()
    ratio = lambda k: (with_e[k] / without[k]) if with_e.get(k) and without.get(k) else None  # noqa: E731
    result = {
        "benchmark": "elastic", "argv": vars(args), "model": model, "engine_start_s": start_s,
        "requests_in_trace": len(trace), "device": device_info(torch.device("cuda" if cuda else "cpu")), "versions": versions(),
        "without_elasticity": without, "with_elasticity": with_e,
        "ratios": {"ttft_p99_burst": ratio("ttft_p99_burst_ms"), "ttft_p50_burst": ratio("ttft_p50_burst_ms"),
                   "output_tokens_per_s": ratio("output_tokens_per_s")},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: result[k] for k in ("ratios",)} | {
        side: {k: result[side][k] for k in ("sent", "completed", "ttft_p50_burst_ms", "ttft_p99_burst_ms",
                                             "output_tokens_per_s", "merges", "splits", "restore_s")}
        for side in ("without_elasticity", "with_elasticity")}, indent=2))
    return 0
