"""The bursty trace of the elastic benchmark, its warm-up, and one timed pass over an `ElasticPair`.

Split out of `elastic.py` (which parses arguments and writes the JSON) so each file reads in one go.
"""

from __future__ import annotations

import math
import random
import time

from vattn_ray.bench.workloads import percentile

# Warm-up prompt lengths: short, page-unaligned, and longer than one step's token budget, so the
# prefill and decode kernels of every shape the trace meets are compiled before anything is timed.
WARM_UP_LENGTHS = (17, 64, 250, 511, 1024, 1500, 2047)


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


def trace_prompts(trace, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    return [[rng.randrange(3, vocab) for _ in range(p)] for _, p, _, _ in trace]


def _serve(pair, prompts: list[list[int]], max_tokens: int, tag: str, limit_s: float) -> int:
    """Run `prompts` to the end (or `limit_s`); returns how many finished."""
    from vattn_ray import SamplingParams

    for i, p in enumerate(prompts):
        pair.add_request(f"{tag}-{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    finished, deadline = 0, time.monotonic() + limit_s
    while pair.has_work() and time.monotonic() < deadline:
        finished += sum(1 for r in pair.step() if r.finished)
    for rid in list(pair.requests):
        pair.abort_request(rid)
    while pair.has_work():
        pair.step()
    return finished


def warm_up(pair, vocab: int, max_model_len: int, transitions: bool, limit_s: float = 60.0) -> dict:
    """Short requests of every shape on the split pair, then (with `transitions`) merged and split
    again: kernels compile, the pair's NCCL links open and the decode graphs are captured before
    any timed pass. Its merge and split are reported, restore time included."""
    rng = random.Random(7)
    lengths = [n for n in WARM_UP_LENGTHS if n < max_model_len - 16] or [max(1, max_model_len // 4)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths for _ in range(2)]
    start = time.perf_counter()
    before = len(pair.events)
    served = _serve(pair, prompts, 8, "warm-split", limit_s)
    if transitions:
        pair.merge("warm-up")
        served += _serve(pair, prompts, 8, "warm-merged", limit_s)
        pair.split("warm-up")
        served += _serve(pair, prompts[:4], 8, "warm-after", limit_s)
    return {"seconds": time.perf_counter() - start, "requests_served": served,
            "events": [_public(e) for e in pair.events[before:]]}


def _public(event: dict, t0: float | None = None) -> dict:
    out = {k: v for k, v in event.items() if k != "monotonic"}
    if t0 is not None:
        out["t_s"] = event["monotonic"] - t0
    return out


def run_pass(pair, trace, prompts, args, hard_end: float) -> dict:
    """Replay `trace` in real time until every request finished, `args.drain_s` after the last
    arrival, or `hard_end` (time.monotonic()), whichever comes first."""
    from vattn_ray import SamplingParams

    events_before = len(pair.events)
    preempt_before = pair.preemptions()
    arrival: dict[str, tuple[float, bool]] = {}
    ttft: dict[str, float] = {}
    done_at: dict[str, float] = {}
    tokens: dict[str, int] = {}
    start = time.monotonic()
    end = min(start + args.duration_s + args.drain_s, hard_end)
    nxt = 0
    interrupted = False
    try:
        while (nxt < len(trace) or pair.has_work()) and time.monotonic() < end:
            now = time.monotonic()
            while nxt < len(trace) and trace[nxt][0] <= now - start:
                at, _, out_len, burst = trace[nxt]
                rid = f"q{nxt}"
                pair.add_request(rid, prompts[nxt], SamplingParams(max_tokens=out_len, temperature=0.0,
                                                                   ignore_eos=True))
                arrival[rid] = (start + at, burst)
                nxt += 1
            if not pair.has_work():
                time.sleep(max(0.0, min(0.05, start + trace[nxt][0] - time.monotonic())) if nxt < len(trace) else 0)
                continue
            for req in pair.step():
                rid = req.request_id
                if rid not in ttft and req.first_token_time is not None:
                    ttft[rid] = req.first_token_time - arrival[rid][0]
                tokens[rid] = len(req.token_ids)
                if req.finished:
                    done_at[rid] = time.monotonic()
    except KeyboardInterrupt:  # stopped from outside: report what was measured
        interrupted = True
    stopped = time.monotonic()
    events = pair.events[events_before:]
    if not interrupted:
        for rid in list(pair.requests):
            pair.abort_request(rid)  # cut by the drain limit: counted as sent, not completed
        while pair.has_work():
            pair.step()
        events = pair.events[events_before:]
        if pair.merged:  # the pass ended merged: split now, so the next phase starts whole (restore timed)
            events.append(pair.split("end of pass"))
    out = _summary(args, start, stopped, nxt, len(trace), arrival, ttft, done_at, tokens,
                   pair.preemptions() - preempt_before, events)
    out["interrupted"] = interrupted
    return out


def _summary(args, start, stopped, sent, in_trace, arrival, ttft, done_at, tokens, preemptions,
             events) -> dict:
    # A request that got no first token before the pass stopped enters the percentiles with the
    # time it had waited by then: a lower bound of its TTFT (counted in *_without_first_token).
    waited = {rid: ttft.get(rid, stopped - at) for rid, (at, _) in arrival.items()}
    burst = [v for rid, v in waited.items() if arrival[rid][1]]
    end = max(done_at.values(), default=stopped)
    span = max(end - start, 1e-9)
    out_tokens = sum(tokens[rid] for rid in done_at)
    slo = sum(1 for rid in done_at if ttft.get(rid, math.inf) <= args.slo_ttft_s)
    merges = [e for e in events if e["event"] == "merge"]
    splits = [e for e in events if e["event"] == "split"]

    def ms(xs: list[float], q: float) -> float | None:
        return 1000 * percentile(xs, q) if xs else None

    return {
        "sent": sent, "completed": len(done_at), "trace_cut": sent < in_trace,
        "burst_requests": len(burst),
        "ttft_p50_burst_ms": ms(burst, 50), "ttft_p99_burst_ms": ms(burst, 99),
        "ttft_p50_ms": ms(list(waited.values()), 50), "ttft_p99_ms": ms(list(waited.values()), 99),
        "burst_without_first_token": sum(1 for rid, (_, b) in arrival.items() if b and rid not in ttft),
        "without_first_token": sum(1 for rid in arrival if rid not in ttft),
        "output_tokens": out_tokens, "seconds": span, "output_tokens_per_s": out_tokens / span,
        "output_tokens_all": sum(tokens.values()),  # unfinished requests' tokens too
        "goodput_req_per_s": slo / span, "preemptions": preemptions,
        "merges": len(merges), "splits": len(splits),
        "merge_s": [e["duration_s"] for e in merges], "split_s": [e["duration_s"] for e in splits],
        "restore_s": [e["restore_s"] for e in splits],
        "restore_bytes": [e["restore_bytes"] for e in splits],
        "kv_tokens_before_merge": [sum(e["kv_groups_before"]) * e["tokens_per_group_before"] for e in merges],
        "kv_tokens_merged": [e["kv_groups_after"] * e["tokens_per_group_after"] for e in merges],
        "events": [_public(e, start) for e in events],
    }
