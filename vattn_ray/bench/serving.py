"""Online serving benchmark: open-loop Poisson load on the OpenAI-compatible HTTP API.

    python -m vattn_ray.bench serving --url http://127.0.0.1:8000 --model llama-3-8b-instruct \\
        --model-path /models/Meta-Llama-3-8B-Instruct --rates 2,4,8,16 --duration 30 \\
        --input-len 512 --output-len 128 --out results/serving.json

For each request rate (req/s), requests arrive as a Poisson process for --duration seconds (or
--num-requests arrivals); every request is a streaming `POST /v1/completions` whose prompt is a
list of --input-len random token ids, greedy (temperature 0), `max_tokens = --output-len` and
`ignore_eos: true`, so every request generates exactly --output-len tokens unless the server stops
it early (the token counts come from the stream's `usage` and are reported). Arrivals do not wait
for earlier responses (open loop). After the last arrival of a rate, its in-flight requests are
awaited (at most --timeout seconds; the rest are cancelled and counted as failed) before the next
rate starts. One warm-up request goes first (given at least 60 s).

The random ids are drawn from the model's vocabulary (`vocab_size` of the checkpoint's
config.json, given by --model-path, or --vocab-size), skipping the tokenizer's added (special)
tokens when --model-path has them. The seed fixes the prompts and the arrival times.

Reported per rate: requests sent / completed / failed, the achieved request rate and output
tokens/s (over the time from the first arrival to the last completion), TTFT, inter-token latency
(ITL: the gaps between consecutive streamed chunks, over all requests), time per output token
(TPOT: per request, (last chunk - first chunk) / (tokens - 1)) and end-to-end latency, as p50/p99
(and mean) in milliseconds. A chunk normally holds one token; `tokens_per_chunk` says whether the
server coalesced tokens (then ITL is per chunk, not per token, and TPOT is the per-token figure).
While a rate runs, the server's `GET /stats` is sampled every --stats-interval seconds (KV page
groups, running and waiting requests: `kv_timeline`; skipped when the server has no /stats).

The SLO (`slo` in the report): a rate meets it when none of its requests failed, its p99 TTFT is
at most --slo-ttft-ms (default 1000) and its p99 ITL at most --slo-itl-ms (default 100). The
report's `highest_rate_meeting_slo` is the highest offered rate that meets it with every lower
measured rate meeting it too, so one lucky rate above a failing one does not count.
--stop-when-saturated skips the remaining (higher) rates once a rate misses the SLO and completes
requests (first to last completion) under 90% as fast as they arrived: past that point the server
only queues.
The same load drives any OpenAI-compatible server: this project's app or vLLM's
(`python -m vllm.entrypoints.openai.api_server`), which both take token-id prompts, `ignore_eos`
and `stream_options.include_usage`; `vattn_ray/bench/serving_compare.py` runs both in one go.
Only the standard library and aiohttp are needed on the client; --plot also needs matplotlib.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)


# ---- workload ---------------------------------------------------------------------------------
def poisson_arrivals(rate: float, rng: random.Random, *, duration_s: float | None = None,
                     num_requests: int | None = None) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process of `rate` requests/s.

    Either all arrivals before `duration_s`, or exactly `num_requests` of them. `rate = inf`
    sends `num_requests` at once (offset 0).
    """
    if (duration_s is None) == (num_requests is None):
        raise ValueError("give exactly one of duration_s and num_requests")
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if math.isinf(rate):
        if num_requests is None:
            raise ValueError("rate inf needs num_requests (a duration would be an unbounded number)")
        return [0.0] * num_requests
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if duration_s is not None and t >= duration_s:
            return out
        out.append(t)
        if num_requests is not None and len(out) == num_requests:
            return out


class PromptSampler:
    """Random token-id prompts drawn uniformly from `[0, vocab_size)` minus `excluded` ids."""

    def __init__(self, vocab_size: int, excluded: set[int] | frozenset[int] = frozenset()) -> None:
        if vocab_size - len([i for i in excluded if 0 <= i < vocab_size]) < 2:
            raise ValueError(f"vocab_size={vocab_size} leaves no ids to sample")
        self.vocab_size = vocab_size
        self.excluded = frozenset(excluded)

    def sample(self, rng: random.Random, length: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < length:
            i = rng.randrange(self.vocab_size)
            if i not in self.excluded:
                ids.append(i)
        return ids


def read_vocab(model_path: str) -> tuple[int, set[int]]:
    """`vocab_size` of a checkpoint directory and the ids of its tokenizer's added tokens.

    `builtin:<name>` resolves to the built-in model's cache directory (built if missing).
    """
    if model_path.startswith("builtin:"):
        from vattn_ray.config import resolve_model_path

        model_path = resolve_model_path(model_path)
    config_path = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {model_path!r}: pass the checkpoint directory the "
                                "server loads (or --vocab-size)")
    with open(config_path) as f:
        vocab_size = int(json.load(f)["vocab_size"])
    added: set[int] = set()
    tok_json = os.path.join(model_path, "tokenizer.json")
    tok_config = os.path.join(model_path, "tokenizer_config.json")
    if os.path.isfile(tok_json):
        with open(tok_json) as f:
            added.update(int(t["id"]) for t in json.load(f).get("added_tokens", []))
    if os.path.isfile(tok_config):
        with open(tok_config) as f:
            added.update(int(k) for k in json.load(f).get("added_tokens_decoder", {}))
    return vocab_size, added


# ---- one request --------------------------------------------------------------------------------
@dataclass
class RequestResult:
    """What the client saw of one streaming request (times are `time.perf_counter()` seconds)."""

    send_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # every chunk carrying a choice
    end_time: float | None = None
    output_tokens: int | None = None  # from the stream's usage
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_time is not None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.send_time

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tokens(self) -> int:
        """Output tokens: the server's usage, else the number of chunks."""
        return self.output_tokens if self.output_tokens is not None else len(self.chunk_times)

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or len(self.chunk_times) < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    body = await resp.text()
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:300]
    return f"HTTP {resp.status}: {message}"


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                            result: RequestResult) -> None:
    """POST a streaming completion and fill `result` as the server-sent events arrive.

    Never raises for a failed request (the error goes to `result.error`), except cancellation.
    """
    result.send_time = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                result.error = await _error_text(resp)
                return
            done = False
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, ": comments", other fields
                now = time.perf_counter()
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    err = event["error"]
                    result.error = f"in-stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return
                choices = event.get("choices")
                if choices:
                    result.chunk_times.append(now)
                    reason = choices[0].get("finish_reason")
                    if reason:
                        result.finish_reason = reason
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage["completion_tokens"])
                    result.prompt_tokens = int(usage["prompt_tokens"])
            if not done:
                result.error = "stream ended without data: [DONE]"
                return
            if not result.chunk_times:
                result.error = "stream finished without any output chunk"
                return
            result.end_time = time.perf_counter()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"


# ---- statistics ---------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation (numpy's default); None if empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ms_stats(values: list[float]) -> dict[str, float | None]:
    """mean / p50 / p99 of seconds, in milliseconds."""
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": 1e3 * sum(values) / len(values), "p50": 1e3 * percentile(values, 50),
            "p99": 1e3 * percentile(values, 99)}


def summarize(rate: float, start: float, arrivals: list[float], results: list[RequestResult],
              output_len: int, peak_in_flight: int) -> dict[str, Any]:
    """One rate's figures from its requests (`start`: perf_counter of offset 0)."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    end = max((r.end_time for r in ok), default=start)
    first_end = min((r.end_time for r in ok), default=end)
    duration = end - start
    out_tokens = sum(r.tokens for r in ok)
    chunks = sum(len(r.chunk_times) for r in ok)
    itls = [g for r in ok for g in r.itls]
    span = arrivals[-1] if len(arrivals) > 1 else 0.0
    return {
        "rate": rate,
        "sent": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(Counter(r.error for r in failed).most_common(5)),
        "offered_rate": (len(arrivals) - 1) / span if span > 0 else None,
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        # Completions per second between the first and the last: a server that keeps up finishes
        # them as fast as they arrive, whatever each one's latency (request_throughput counts the
        # drain of the last requests too, so it lags the offered rate at long latencies).
        "completion_rate": (len(ok) - 1) / (end - first_end) if end > first_end else None,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration if duration > 0 else None,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "tokens_per_chunk": out_tokens / chunks if chunks else None,
        "output_len_short": sum(1 for r in ok if r.tokens != output_len),
        "peak_in_flight": peak_in_flight,
        "ttft_ms": _ms_stats([r.ttft for r in ok]),
        "itl_ms": _ms_stats(itls),
        "tpot_ms": _ms_stats([t for r in ok if (t := r.tpot) is not None]),
        "e2e_ms": _ms_stats([r.e2e for r in ok]),
        "itl_s": [round(g, 6) for g in itls],  # every gap, for CDFs
        "requests": [
            {"arrival_s": a, "sent_s": r.send_time - start if r.send_time else None, "ttft_s": r.ttft,
             "e2e_s": r.e2e, "output_tokens": r.output_tokens, "chunks": len(r.chunk_times),
             "prompt_tokens": r.prompt_tokens, "finish_reason": r.finish_reason, "error": r.error}
            for a, r in zip(arrivals, results)
        ],
    }


def meets_slo(result: dict[str, Any], ttft_p99_ms: float, itl_p99_ms: float) -> bool:
    """Whether one rate's figures meet the SLO: no failed request, p99 TTFT and p99 ITL in bounds.

    A failed request counts against the SLO (it is missing from the percentiles, so a server that
    drops work would otherwise look fast). A rate with nothing completed does not meet it.
    """
    ttft, itl = result["ttft_ms"]["p99"], result["itl_ms"]["p99"]
    return (result["completed"] > 0 and result["failed"] == 0 and ttft is not None and ttft <= ttft_p99_ms
            and (itl is None or itl <= itl_p99_ms))  # no ITL at all: every output was one chunk


def slo_summary(results: list[dict[str, Any]], ttft_p99_ms: float, itl_p99_ms: float) -> dict[str, Any]:
    """The SLO verdict of every rate and the highest rate meeting it (with every lower rate too)."""
    by_rate = sorted(results, key=lambda r: r["rate"])
    verdicts = [{"rate": r["rate"], "meets": meets_slo(r, ttft_p99_ms, itl_p99_ms),
                 "ttft_p99_ms": r["ttft_ms"]["p99"], "itl_p99_ms": r["itl_ms"]["p99"], "failed": r["failed"],
                 "request_throughput": r["request_throughput"], "output_tokens_per_s": r["output_tokens_per_s"]}
                for r in by_rate]
    best = None
    for v in verdicts:
        if not v["meets"]:
            break
        best = v
    return {"ttft_p99_ms_max": ttft_p99_ms, "itl_p99_ms_max": itl_p99_ms, "rates": verdicts,
            "highest_rate_meeting_slo": best["rate"] if best else None,
            "request_throughput_at_that_rate": best["request_throughput"] if best else None,
            "output_tokens_per_s_at_that_rate": best["output_tokens_per_s"] if best else None}


def saturated(result: dict[str, Any], ttft_p99_ms: float, itl_p99_ms: float) -> bool:
    """The server misses the SLO and completes requests under 90% as fast as they arrive: higher
    rates only queue."""
    offered = result["offered_rate"] or result["rate"]
    achieved = result.get("completion_rate") or 0.0
    return not meets_slo(result, ttft_p99_ms, itl_p99_ms) and achieved < 0.9 * offered


def render(report: dict[str, Any]) -> str:
    """The per-rate results as a markdown table (latencies in ms)."""
    cfg = report["config"]
    head = (f"serving: {cfg['model']} at {cfg['url']}, input {cfg['input_len']} tokens, output "
            f"{cfg['output_len']} tokens, " + (f"{cfg['num_requests']} requests per rate"
                                               if cfg["num_requests"] else f"{cfg['duration']} s per rate"))
    cols = ["rate", "sent", "ok", "failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50",
            "ITL p99", "TPOT p50", "E2E p50", "E2E p99"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(x: float | None, nd: int = 1) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    for r in report["results"]:
        lines.append("| " + " | ".join([
            f"{r['rate']:g}", str(r["sent"]), str(r["completed"]), str(r["failed"]),
            f(r["request_throughput"], 2), f(r["output_tokens_per_s"]),
            f(r["ttft_ms"]["p50"]), f(r["ttft_ms"]["p99"]), f(r["itl_ms"]["p50"]), f(r["itl_ms"]["p99"]),
            f(r["tpot_ms"]["p50"]), f(r["e2e_ms"]["p50"]), f(r["e2e_ms"]["p99"])]) + " |")
    notes = []
    for r in report["results"]:
        if r["errors"]:
            notes.append(f"rate {r['rate']:g}: errors {r['errors']}")
        if r["output_len_short"]:
            notes.append(f"rate {r['rate']:g}: {r['output_len_short']} completed requests did not make "
                         f"{cfg['output_len']} tokens")
        if r["tokens_per_chunk"] is not None and r["tokens_per_chunk"] > 1.05:
            notes.append(f"rate {r['rate']:g}: {r['tokens_per_chunk']:.2f} tokens per chunk (ITL is per chunk)")
    slo = report.get("slo")
    if slo:
        best = slo["highest_rate_meeting_slo"]
        notes.append(f"SLO p99 TTFT <= {slo['ttft_p99_ms_max']:g} ms and p99 ITL <= {slo['itl_p99_ms_max']:g} ms: "
                     + ("no measured rate meets it" if best is None else
                        f"highest rate meeting it {best:g} req/s ({slo['request_throughput_at_that_rate'] or 0:.2f} "
                        f"req/s achieved)"))
    return "\n".join(lines + ([""] + notes if notes else []))


# ---- the run ------------------------------------------------------------------------------------
def _body(args: argparse.Namespace, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def load_digest(arrivals: list[float], bodies: list[dict[str, Any]]) -> str:
    """sha256 of a rate's arrival times and request bodies (less the model name): two runs with the
    same digest sent every server the very same prompts at the very same times."""
    load = [[round(a, 9), {k: v for k, v in b.items() if k != "model"}] for a, b in zip(arrivals, bodies)]
    return hashlib.sha256(json.dumps(load, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def run_rate(session: aiohttp.ClientSession, args: argparse.Namespace, rate: float,
                   sampler: PromptSampler, rate_index: int) -> dict[str, Any]:
    """Open-loop Poisson load at `rate`, then wait (at most --timeout s) for what is in flight."""
    rng = random.Random(args.seed * 1_000_003 + rate_index)
    arrivals = poisson_arrivals(rate, rng, duration_s=None if args.num_requests else args.duration,
                                num_requests=args.num_requests)
    bodies = [_body(args, sampler.sample(rng, args.input_len), args.output_len) for _ in arrivals]
    load_sha256 = load_digest(arrivals, bodies)
    results = [RequestResult() for _ in arrivals]
    in_flight, peak = 0, 0

    async def one(body: dict[str, Any], result: RequestResult) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await stream_completion(session, args.completions_url, body, result)
        finally:
            in_flight -= 1

    tasks: list[asyncio.Task] = []
    timeline: list[dict[str, Any]] = []
    start = time.perf_counter()
    sampler_task = asyncio.create_task(sample_stats(session, args, start, timeline))
    for offset, body, result in zip(arrivals, bodies, results):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, result)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=args.timeout)
        if pending:
            logger.warning("rate %g: %d requests still running %gs after the last arrival; cancelling",
                           rate, len(pending), args.timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for r in results:
                if r.end_time is None and r.error is None:
                    r.error = f"not finished {args.timeout:g}s after the last arrival (cancelled)"
    sampler_task.cancel()
    await asyncio.gather(sampler_task, return_exceptions=True)
    out = summarize(rate, start, arrivals, results, args.output_len, peak)
    out["load_sha256"] = load_sha256
    out["kv_timeline"] = timeline
    return out


_TIMELINE_KEYS = ("num_running", "num_waiting", "num_groups_mapped", "num_groups_free", "num_groups_idle",
                  "kv_fragmentation")


async def sample_stats(session: aiohttp.ClientSession, args: argparse.Namespace, start: float,
                       timeline: list[dict[str, Any]]) -> None:
    """Append the server's KV statistics to `timeline` every --stats-interval s until cancelled.

    Stops quietly on a server without /stats (another engine); with several replicas each sample
    is of the replica that answered.
    """
    url = f"{args.url}/stats"
    while True:
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return
                stats = await resp.json()
        except (aiohttp.ClientError, ValueError):
            return
        timeline.append({"t": round(time.perf_counter() - start, 4),
                         **{k: stats.get(k) for k in _TIMELINE_KEYS}})
        await asyncio.sleep(args.stats_interval)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then every rate in turn; the whole report."""
    sampler = PromptSampler(args.vocab_size, args.excluded_ids)
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "excluded_ids"},
                              "results": []}
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue requests in the client
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=args.connect_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = RequestResult()
        warm_body = _body(args, sampler.sample(random.Random(args.seed - 1), args.input_len),
                          min(args.output_len, 16))
        # At least a minute: a server's first request may include one-time start-up work.
        await asyncio.wait_for(stream_completion(session, args.completions_url, warm_body, warm),
                               timeout=max(args.timeout, 60.0))
        if not warm.ok:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        report["warmup"] = {"ttft_ms": 1e3 * warm.ttft, "e2e_ms": 1e3 * warm.e2e,
                            "output_tokens": warm.output_tokens, "usage_in_stream": warm.output_tokens is not None}
        logger.info("warm-up: TTFT %.1f ms, %s tokens in %.1f ms", 1e3 * warm.ttft, warm.tokens, 1e3 * warm.e2e)
        for i, rate in enumerate(args.rates):
            logger.info("rate %g req/s ...", rate)
            res = await run_rate(session, args, rate, sampler, i)
            logger.info("rate %g: %d/%d completed, %.2f req/s, %.1f output tok/s", rate, res["completed"],
                        res["sent"], res["request_throughput"] or 0.0, res["output_tokens_per_s"] or 0.0)
            report["results"].append(res)
            report["slo"] = slo_summary(report["results"], args.slo_ttft_ms, args.slo_itl_ms)
            if args.out:  # after every rate, so an interrupted sweep keeps what it measured
                _write(args.out, report)
            if args.stop_when_saturated and saturated(res, args.slo_ttft_ms, args.slo_itl_ms):
                report["skipped_rates"] = args.rates[i + 1:]
                logger.info("rate %g saturates the server; skipping %s", rate, report["skipped_rates"] or "nothing")
                break
    if args.out:
        _write(args.out, report)
    return report


def _write(path: str, report: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be a comma list of numbers > 0 (or inf), got {text!r}")
    return rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (no /v1)")
    ap.add_argument("--model", required=True, help="the served model name (GET /v1/models)")
    ap.add_argument("--model-path", default=None,
                    help="checkpoint directory (or builtin:<name>) whose vocabulary the prompts use")
    ap.add_argument("--vocab-size", type=int, default=None, help="instead of --model-path")
    ap.add_argument("--rates", type=_rates, default=_rates("2,4,8,16"), help="request rates, req/s, e.g. 2,4,8")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate")
    ap.add_argument("--num-requests", type=int, default=None, help="arrivals per rate (instead of --duration)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="send ignore_eos so every request makes --output-len tokens (default: on)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for a rate's in-flight requests after its last arrival")
    ap.add_argument("--connect-timeout", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--plot", default=None, help="draw the report's figures into this file (matplotlib)")
    ap.add_argument("--stats-interval", type=float, default=0.5, help="seconds between GET /stats samples")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="SLO: p99 time to first token, ms")
    ap.add_argument("--slo-itl-ms", type=float, default=100.0, help="SLO: p99 inter-token latency, ms")
    ap.add_argument("--stop-when-saturated", action="store_true",
                    help="skip higher rates once one misses the SLO and completes requests < 90%% as fast as they arrive")
    ap.add_argument("--system", default=None, help="a label for the server under test (e.g. vattn, vllm)")
    args = ap.parse_args(argv)
    if args.num_requests is not None and args.num_requests < 1:
        ap.error("--num-requests must be >= 1")
    if args.num_requests is None and (any(math.isinf(r) for r in args.rates) or not args.duration > 0):
        ap.error("--duration must be > 0, and rate inf needs --num-requests")
    if args.input_len < 1 or args.output_len < 1:
        ap.error("--input-len and --output-len must be >= 1")
    if (args.model_path is None) == (args.vocab_size is None):
        ap.error("give the prompts' vocabulary: --model-path DIR (the server's checkpoint) or --vocab-size N")
    args.excluded_ids = set()
    if args.model_path is not None:
        args.vocab_size, args.excluded_ids = read_vocab(args.model_path)
    args.url = args.url.rstrip("/")
    args.completions_url = f"{args.url}/v1/completions"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        report = asyncio.run(run(args))
    except (RuntimeError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
        sys.stderr.write(f"serving benchmark failed: {type(exc).__name__}: {exc}\n")
        return 1
    if args.out:
        _write(args.out, report)
    if args.plot:
        from vattn_ray.bench.plots import plot_serving

        plot_serving(report, args.plot)
    print(render(report))
    return 0
