"""Benchmark workloads: token-id prompts and per-request output lengths, identical for every system.

A `Job` is what one system runs in one timed measurement. Kinds:
  warmup          one untimed `generate` (engine start and first-call costs stay out of the timings)
  throughput      one timed `generate` of all prompts, each with its own `max_tokens`
  decode_latency  the same prompts twice: `max_tokens=lead_steps+1`, then `lead_steps+steps+1`.
                  `lead_steps` covers the prefill of the whole batch (chunked prefill lets early
                  requests decode while later ones prefill) with room to spare, so both runs reach
                  the full batch and end with the same tail of finishing requests: the difference
                  is `steps` decode-only steps at the full batch
Every request is greedy with `ignore_eos`, so it makes exactly its `max_tokens` tokens.

The mixed workload is ShareGPT-like: log-normal lengths fitted to a median and a 99th percentile
(sigma = ln(p99 / median) / z_0.99), drawn from one seeded `random.Random`, so it is the same on
every machine and Python version.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from vattn_ray.bench.vllm_peer import digest

Z99 = 2.3263478740408408  # standard normal 99th percentile

# The mixed workload's parameters (tokens). Documented in docs/benchmarks.md.
MIXED_PROMPT_MEDIAN, MIXED_PROMPT_P99 = 300, 3000
MIXED_OUTPUT_MEDIAN, MIXED_OUTPUT_P99 = 200, 1000


@dataclass(frozen=True)
class Job:
    """One measurement: the same prompts and lengths for every system."""

    name: str
    kind: str  # "warmup" | "throughput" | "decode_latency"
    prompts: list[list[int]]
    max_tokens: list[int]  # per request (decode_latency: unused, see `decode_max_tokens`)
    steps: int = 0  # decode_latency: decode steps timed
    lead_steps: int = 0  # decode_latency: steps before the timed ones (prefill and ramp-up)

    @property
    def decode_max_tokens(self) -> tuple[int, int]:
        """decode_latency: max_tokens of the short and of the long run."""
        return self.lead_steps + 1, self.lead_steps + self.steps + 1

    @property
    def max_len(self) -> int:
        """Longest prompt + output of the job (what max_model_len must hold)."""
        if self.kind == "decode_latency":
            return max(len(p) for p in self.prompts) + self.decode_max_tokens[1]
        return max(len(p) + n for p, n in zip(self.prompts, self.max_tokens))

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "prompts": self.prompts, "max_tokens": self.max_tokens,
                "steps": self.steps, "lead_steps": self.lead_steps}

    def summary(self) -> dict:
        """Sizes of the job for the report (no token ids)."""
        lens = [len(p) for p in self.prompts]
        out = {"kind": self.kind, "sha256": digest(self.prompts, self.max_tokens), "requests": len(lens),
               "prompt_tokens": sum(lens),
               "prompt_len_median": statistics.median(lens), "prompt_len_p99": percentile(lens, 99),
               "prompt_len_max": max(lens)}
        if self.kind == "decode_latency":
            out.update(batch=len(lens), context=lens[0], steps=self.steps, lead_steps=self.lead_steps)
        else:
            out.update(output_tokens=sum(self.max_tokens),
                       output_len_median=statistics.median(self.max_tokens),
                       output_len_p99=percentile(self.max_tokens, 99), output_len_max=max(self.max_tokens))
        return out


def percentile(values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """Random token ids, clear of the ids a small vocabulary reserves for special tokens."""
    return [rng.randrange(10, vocab - 10) for _ in range(length)]


def lognormal_lengths(rng: random.Random, n: int, median: float, p99: float, lo: int, hi: int) -> list[int]:
    """n integer lengths, log-normal with the given median and 99th percentile, clipped to [lo, hi]."""
    mu, sigma = math.log(median), math.log(p99 / median) / Z99
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def fixed_job(num_requests: int, input_len: int, output_len: int, vocab: int, seed: int = 0) -> Job:
    rng = random.Random(seed)
    prompts = [random_prompt(rng, input_len, vocab) for _ in range(num_requests)]
    return Job("fixed", "throughput", prompts, [output_len] * num_requests)


def mixed_lengths(rng: random.Random, num_requests: int, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt lengths, output lengths), ShareGPT-like; each prompt + output fits in `max_len`.

    Output lengths are drawn first (clipped to [1, max_len // 2]), then prompt lengths (clipped to
    [1, max_len - output]); with max_len 8192 clipping touches well under 1% of requests.
    """
    if max_len < 2:
        raise ValueError(f"mixed workload needs max_len >= 2, got {max_len}")
    outs = lognormal_lengths(rng, num_requests, MIXED_OUTPUT_MEDIAN, MIXED_OUTPUT_P99, 1, max_len // 2)
    lens = lognormal_lengths(rng, num_requests, MIXED_PROMPT_MEDIAN, MIXED_PROMPT_P99, 1, max_len)
    return [min(n, max_len - o) for n, o in zip(lens, outs)], outs


def mixed_job(num_requests: int, vocab: int, max_len: int, seed: int = 0) -> Job:
    rng = random.Random(seed)
    lens, outs = mixed_lengths(rng, num_requests, max_len)
    return Job("mixed", "throughput", [random_prompt(rng, n, vocab) for n in lens], outs)


def prefill_job(num_requests: int, prompt_len: int, vocab: int, seed: int = 0) -> Job:
    """Long prompts, one output token each: the step time is prefill (chunks of the token budget)."""
    rng = random.Random(seed + 1)
    return Job("prefill", "throughput", [random_prompt(rng, prompt_len, vocab) for _ in range(num_requests)],
               [1] * num_requests)


def decode_latency_job(batch: int, context: int, steps: int, vocab: int, chunk_tokens: int,
                       seed: int = 0) -> Job:
    """`batch` prompts of `context` tokens; `chunk_tokens` is the engines' per-step token budget.

    The lead-in is the number of steps the batch's prefill takes at that budget, plus 16 steps of
    slack for decode rows that share the budget while the last prompts are prefilled.
    """
    rng = random.Random(seed + 2 + batch)
    lead = -(-batch * context // chunk_tokens) + 16
    return Job(f"decode-b{batch}-ctx{context}", "decode_latency",
               [random_prompt(rng, context, vocab) for _ in range(batch)], [1] * batch, steps, lead)


def warmup_job(vocab: int, long_len: int) -> Job:
    """Two short requests and one as long as a full prefill chunk: first-call costs of both paths."""
    rng = random.Random(12345)
    prompts = [random_prompt(rng, 16, vocab), random_prompt(rng, 32, vocab), random_prompt(rng, long_len, vocab)]
    return Job("warmup", "warmup", prompts, [8, 8, 2])
