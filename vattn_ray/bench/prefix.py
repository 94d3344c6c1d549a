"""Prefix caching, side by side: this engine with caching on and off, and stock vLLM with its own.

    python -m vattn_ray.bench prefix --model /tmp/l8b --dtype bfloat16 \
        --systems vattn,vattn-nocache,vllm --workloads shared,multiturn \
        --peer-env /tmp/peer-site/peer_env.sh --out prefix_h200.json

Workloads (token ids seeded with --seed; every request greedy with ignore_eos):
  shared     --shared-requests requests, each a --system-len token system prompt common to all
             followed by its own user turn (uniform in [3/4, 5/4] x --user-len tokens), making
             --output-len tokens. All are sent at once (--rate 0) or as Poisson arrivals at --rate/s.
  multiturn  --conversations conversations of --turns turns, all starting at once. Turn 1 is a
             --first-len token context; turn k+1's prompt is turn k's prompt, then --output-len
             tokens standing in for the answer (the same ids for every system, so prompts do not
             depend on what a system generated), then a --turn-len token user message. A turn is
             sent when the previous one has finished.
Systems:
  vattn          this engine, enable_prefix_caching=True (the default)
  vattn-nocache  this engine, enable_prefix_caching=False
  vllm           stock vLLM's `LLM` engine in a child process (vattn_ray/bench/vllm_peer.py),
                 enable_prefix_caching=True; "unavailable" where vLLM cannot be imported
Every system runs the same loop (vattn_ray/bench/step_driver.py) over its engine's own
add_request/step calls, streaming deltas: TTFT is from a request's sending to the step that
returned its first token, throughput is output tokens over the time from the first sending to the
last finish. Engine start and a warm-up generate (prompts unrelated to the workloads) stay out.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass

import torch

from vattn_ray.bench import step_driver
from vattn_ray.bench.provenance import device_info, versions
from vattn_ray.bench.report import RunReport, resolve_checkpoint
from vattn_ray.bench.vattn_system import GIB, VattnSystem, used_bytes
from vattn_ray.bench.vllm_peer import engine_options, launch_beside, measurements
from vattn_ray.bench.workloads import Job, percentile, random_prompt, warmup_job
from vattn_ray.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)
SYSTEMS = ("vattn", "vattn-nocache", "vllm")
WORKLOADS = ("shared", "multiturn")
METHODS = {
    "ttft": "seconds from a request's sending (add_request) to the return of the engine step that gave its "
            "first token, in one loop (vattn_ray/bench/step_driver.py) shared by every system; outputs stream "
            "as deltas",
    "throughput": "output_tokens_per_s = output tokens / seconds from the first sending to the last finish",
    "cached_tokens": "prompt tokens served from the prefix cache, as each engine reports them per request "
                     "(RequestOutput.num_cached_tokens in both)",
    "outputs_sha256": "sha256 of every request's output token ids in request order: equal digests mean the "
                      "same greedy outputs",
}


@dataclass(frozen=True)
class ScheduleJob:
    """A workload whose requests are sent on a schedule: `after[i]` (-1 or the request whose finish
    releases request i) and `arrival[i]` (seconds after the start, at the earliest)."""

    job: Job
    after: list[int]
    arrival: list[float]

    @property
    def name(self) -> str:
        return self.job.name

    def to_dict(self) -> dict:
        return {**self.job.to_dict(), "after": self.after, "arrival": self.arrival}

    def summary(self) -> dict:
        return {**self.job.summary(), "chained_requests": sum(1 for a in self.after if a >= 0)}


def shared_job(n: int, system_len: int, user_len: int, output_len: int, vocab: int, rate: float,
               seed: int = 0) -> ScheduleJob:
    """n requests sharing one system prompt, each with its own user turn."""
    rng = random.Random(seed + 101)
    system = random_prompt(rng, system_len, vocab)
    lo, hi = max(1, user_len * 3 // 4), max(1, user_len * 5 // 4)
    prompts = [system + random_prompt(rng, rng.randint(lo, hi), vocab) for _ in range(n)]
    arrival, t = [], 0.0
    for _ in range(n):
        if rate > 0:
            t += rng.expovariate(rate)
        arrival.append(t)
    return ScheduleJob(Job("shared", "schedule", prompts, [output_len] * n), [-1] * n, arrival)


def multiturn_job(conversations: int, turns: int, first_len: int, turn_len: int, output_len: int,
                  vocab: int, seed: int = 0) -> ScheduleJob:
    """Conversations whose every turn extends the previous turn's prompt by an answer and a message."""
    rng = random.Random(seed + 202)
    prompts, after = [], []
    for _ in range(conversations):
        ctx = random_prompt(rng, first_len, vocab)
        for k in range(turns):
            if k:
                ctx = ctx + random_prompt(rng, output_len, vocab) + random_prompt(rng, turn_len, vocab)
                after.append(len(prompts) - 1)
            else:
                after.append(-1)
            prompts.append(list(ctx))
    n = len(prompts)
    return ScheduleJob(Job("multiturn", "schedule", prompts, [output_len] * n), after, [0.0] * n)


# ---- systems --------------------------------------------------------------------------------------
class VattnStepper:
    """`step_driver.Stepper` over this project's `LLMEngine`."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        self.engine.add_request(request_id, prompt, params)

    def step(self):
        return [(o.request_id, list(o.outputs[0].token_ids), o.finished, o.num_cached_tokens)
                for o in self.engine.step()]

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()


def run_vattn(name: str, args, jobs: list, dtype: str, emit) -> None:
    system = VattnSystem(stats_interval=args.stats_interval, model=args.model, tensor_parallel_size=args.tp,
                         device=args.device, dtype=dtype, max_model_len=args.max_model_len,
                         max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         enable_prefix_caching=name == "vattn",
                         **({"page_bytes": args.page_bytes} if args.page_bytes else {}))
    emit.engine_start(name, system.engine_start_s)
    try:
        for job in jobs:
            if isinstance(job, Job):  # the warm-up
                system.run(job)
                continue
            try:
                stats0 = system.engine.stats()
                system.timeline.start()
                meas = step_driver.run(VattnStepper(system.engine), job.job.prompts, job.job.max_tokens,
                                       job.after, job.arrival, name=job.name)
                system.timeline.sample(time.perf_counter())
                stats1 = system.engine.stats()
                meas.update(num_preemptions=(stats1.get("num_preemptions") or 0) - (stats0.get("num_preemptions") or 0),
                            device_memory_in_use_gib=used_bytes(system.device) / GIB,
                            kv_groups_mapped_peak=max(s["num_groups_mapped"] for s in system.timeline.samples),
                            kv_timeline=list(system.timeline.samples))
            except Exception as exc:  # noqa: BLE001 - one failed workload must not lose the others
                logger.exception("%s on %s failed", name, job.name)
                meas = {"error": f"{type(exc).__name__}: {exc}"}
            emit(name, job, meas)
    finally:
        system.shutdown()


def run_vllm(args, jobs: list, dtype: str, emit) -> None:
    res = launch_beside(args.out, [j.to_dict() for j in jobs], engine_options(args, dtype, enable_prefix_caching=True),
                        peer_env=args.peer_env, timeout_s=args.peer_timeout)
    emit.peer(res)
    for job, meas in measurements(res, jobs[1:]):  # the warm-up's failure shows in the jobs after it
        emit("vllm", job, meas)


# ---- records --------------------------------------------------------------------------------------
def make_record(system: str, tp: int, job: ScheduleJob, meas: dict) -> dict:
    """One result record: latency percentiles and throughput from the per-request times."""
    rec = {"system": system, "tp": tp, "workload": job.name, "kind": "schedule"}
    if "error" in meas or "unavailable" in meas:
        return {**rec, "output_tokens_per_s": None, **meas}
    sent, first, done = meas["sent_at"], meas["first_token_at"], meas["finished_at"]
    ttft = [(f - s) * 1e3 for s, f in zip(sent, first)]
    e2e = [(d - s) * 1e3 for s, d in zip(sent, done)]
    prompt_tokens = sum(len(p) for p in job.job.prompts)
    cached = [c or 0 for c in meas["cached_tokens"]]
    rec.update(requests=len(sent), prompt_tokens=prompt_tokens, output_tokens=sum(meas["output_tokens"]),
               output_tokens_expected=sum(job.job.max_tokens), seconds=meas["seconds"],
               output_tokens_per_s=sum(meas["output_tokens"]) / meas["seconds"],
               ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
               ttft_mean_ms=sum(ttft) / len(ttft), e2e_p50_ms=percentile(e2e, 50), e2e_p99_ms=percentile(e2e, 99),
               cached_tokens=sum(cached), cached_token_fraction=sum(cached) / prompt_tokens,
               requests_with_cache_hit=sum(1 for c in cached if c > 0))
    lists = ("sent_at", "first_token_at", "finished_at", "output_tokens", "cached_tokens")
    rec["per_request"] = {k: meas[k] for k in lists}
    rec.update({k: v for k, v in meas.items() if k not in rec and k not in lists})
    return rec


def ratios(results: list[dict]) -> dict:
    """Per workload: TTFT with caching over without (ours), throughput of ours over vLLM's (both cached)."""
    by = {(r["system"], r["workload"]): r for r in results if r.get("output_tokens_per_s")}
    out: dict = {}
    for workload in WORKLOADS:
        on, off, peer = (by.get((s, workload)) for s in ("vattn", "vattn-nocache", "vllm"))
        q = {}
        if on and off:
            q["ttft_p50_cached_over_uncached"] = on["ttft_p50_ms"] / off["ttft_p50_ms"]
            q["ttft_p99_cached_over_uncached"] = on["ttft_p99_ms"] / off["ttft_p99_ms"]
            q["throughput_cached_over_uncached"] = on["output_tokens_per_s"] / off["output_tokens_per_s"]
            q["same_outputs_cached_and_uncached"] = on["outputs_sha256"] == off["outputs_sha256"]
        if on and peer:
            q["throughput_vattn_over_vllm"] = on["output_tokens_per_s"] / peer["output_tokens_per_s"]
            q["ttft_p50_vattn_over_vllm"] = on["ttft_p50_ms"] / peer["ttft_p50_ms"]
        if q:
            out[workload] = q
    return out


class Report(RunReport):
    """The run's JSON: one record per (system, workload), and the ratios."""

    def __init__(self, args, data: dict) -> None:
        super().__init__(args.out, data)
        self.args = args

    def __call__(self, system: str, job: ScheduleJob, meas: dict) -> None:
        rec = make_record(system, self.args.tp, job, meas)
        self.data["results"].append(rec)
        self.data["ratios"] = ratios(self.data["results"])
        self.save()
        logger.info("result: %s", json.dumps({k: v for k, v in rec.items() if not isinstance(v, (list, dict))}))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench prefix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--systems", default="vattn,vattn-nocache,vllm")
    ap.add_argument("--workloads", default="shared,multiturn")
    ap.add_argument("--shared-requests", type=int, default=1000)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--user-len", type=int, default=256)
    ap.add_argument("--rate", type=float, default=0.0, help="shared: Poisson requests/s (0: all at once)")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--first-len", type=int, default=512)
    ap.add_argument("--turn-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128, help="tokens each request makes (both workloads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the longest request of the run")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--stats-interval", type=float, default=0.05)
    ap.add_argument("--page-bytes", type=int, default=None,
                    help="vattn: physical page size (default: the engine's; small pages give a tiny "
                         "model's CPU run page groups of a few tokens)")
    ap.add_argument("--peer-env", default=None)
    ap.add_argument("--peer-timeout", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for flag, names, known in (("--systems", args.system_list, SYSTEMS), ("--workloads", args.workload_list, WORKLOADS)):
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise SystemExit(f"{flag}: unknown or empty {bad}; choose from {', '.join(known)}")
    return args


def build_jobs(args, vocab: int) -> list:
    jobs: list = []
    for name in args.workload_list:
        if name == "shared":
            jobs.append(shared_job(args.shared_requests, args.system_len, args.user_len, args.output_len,
                                   vocab, args.rate, args.seed))
        else:
            jobs.append(multiturn_job(args.conversations, args.turns, args.first_len, args.turn_len,
                                      args.output_len, vocab, args.seed))
    need = max(j.job.max_len for j in jobs)
    if args.max_model_len is None:
        args.max_model_len = need
    elif args.max_model_len < need:
        raise SystemExit(f"--max-model-len {args.max_model_len} is below the {need} tokens the run needs")
    return [warmup_job(vocab, max(1, min(args.max_num_batched_tokens, args.max_model_len - 2)))] + jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hf, device, dtype = resolve_checkpoint(args)
    jobs = build_jobs(args, int(hf["vocab_size"]))
    config = {k: v for k, v in vars(args).items() if k not in ("system_list", "workload_list")}
    data: dict = {"config": {**config, "resolved_dtype": dtype}, "device": device_info(device),
                  "versions": {"vattn": versions()}, "engine_start_s": {}, "methods": METHODS,
                  "device_memory_in_use_gib_before": {},
                  "jobs": {j.name: j.summary() for j in jobs[1:]}, "results": [], "ratios": {}}
    report = Report(args, data)
    for name in args.system_list:
        data["device_memory_in_use_gib_before"][name] = used_bytes(device) / GIB
        logger.info("system %s: starting", name)
        try:
            if name == "vllm":
                run_vllm(args, jobs, dtype, report)
            else:
                run_vattn(name, args, jobs, dtype, report)
        except Exception as exc:  # noqa: BLE001 - e.g. an engine that fails to start: keep the others
            logger.exception("%s failed", name)
            for job in jobs[1:]:
                if not any(r["system"] == name and r["workload"] == job.name for r in data["results"]):
                    report(name, job, {"error": f"{type(exc).__name__}: {exc}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.save()
    print(render(data))
    return 0


def render(data: dict) -> str:
    """A markdown table of the run."""
    lines = ["| workload | system | output tok/s | TTFT p50 ms | TTFT p99 ms | cached prompt tokens | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in data["results"]:
        if not r.get("output_tokens_per_s"):
            lines.append(f"| {r['workload']} | {r['system']} | | | | | {(r.get('unavailable') or r.get('error') or '')[:90]} |")
            continue
        lines.append(f"| {r['workload']} | {r['system']} | {r['output_tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} | "
                     f"{r['ttft_p99_ms']:.0f} | {100 * r['cached_token_fraction']:.1f}% | |")
    for w, q in data["ratios"].items():
        lines.append(f"\n{w}: " + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                           for k, v in q.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
