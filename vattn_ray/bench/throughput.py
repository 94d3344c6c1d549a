"""Offline throughput and latency, side by side on one checkpoint: vattn-ray, stock vLLM, transformers.

    python -m vattn_ray.bench throughput --model /tmp/l8b --dtype bfloat16 --systems vattn,vllm \
        --workloads fixed,mixed,prefill --decode-latency 1,8,64 \
        --peer-env /tmp/peer-site/peer_env.sh --out throughput_vllm.json

Systems (every request greedy with ignore_eos, so it makes exactly its max_tokens tokens):
  vattn      this engine (`LLM.generate`; one engine for every workload of the run)
  vattn-g1   the same with one layer per virtual KV tensor (the contiguous layout), for comparison
  vllm       stock vLLM's offline `LLM` in a child process (vattn_ray/bench/vllm_peer.py), on the
             same token-id prompts, max_tokens and engine limits; "unavailable" where vLLM cannot
             be imported. --peer-env is sourced in that child only.
  hf, hf-cb  transformers `generate` in static batches of --hf-batch / `generate_batch` (uniform
             workloads only)
Workloads (--workloads; vattn_ray/bench/workloads.py):
  fixed      --num-requests x (--input-len in / --output-len out)
  mixed      --mixed-requests ShareGPT-like requests: log-normal lengths, prompt median 300 / p99
             3000, output median 200 / p99 1000, prompt + output <= --mixed-max-len, seeded
  prefill    --prefill-requests prompts of --prefill-len tokens, 1 output token: prefill TFLOP/s
--decode-latency 1,8,64: at each batch, prompts of --decode-context tokens, generated twice to
lengths that differ by --decode-steps decode steps at the full batch; the step time is the time
difference / --decode-steps, the same method for every system (vattn also reports its step
observers' median; see METHODS and workloads.py).
Systems run one after another; each one's GPU memory is released before the next starts. Engine
start and a warm-up `generate` are kept out of every timing. The JSON holds each system's versions,
the device, the measured copy bandwidth, one record per (system, workload) and the vattn/vllm ratios.
The vattn records also hold `kv_timeline`: the engine's KV page groups (mapped / free / idle) and
running / waiting requests sampled every --stats-interval s of the workload; --plot draws them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from vattn_ray.bench import hf_baselines
from vattn_ray.bench.costs import ModelCosts
from vattn_ray.bench.provenance import device_info, versions
from vattn_ray.bench.report import RunReport, resolve_checkpoint
from vattn_ray.bench.vattn_system import GIB, VattnSystem, sync, used_bytes
from vattn_ray.bench.vllm_peer import engine_options, launch_beside, measurements
from vattn_ray.bench.workloads import (Job, decode_latency_job, fixed_job, mixed_job, prefill_job,
                                       warmup_job)

logger = logging.getLogger(__name__)
SYSTEMS = ("vattn", "vattn-g1", "vllm", "hf", "hf-cb")
WORKLOADS = ("fixed", "mixed", "prefill")
METHODS = {
    "throughput": "wall time of one generate() of every request of the workload, after a warm-up generate "
                  "on the same engine (engine start excluded); output_tokens_per_s = output tokens / seconds, "
                  "total_tokens_per_s = (prompt + output tokens) / seconds",
    "decode_latency": "decode_step_ms = (seconds_long - seconds_short) / steps: seconds_short times a generate "
                      "of the batch's prompts with max_tokens=lead_steps+1, seconds_long the same prompts with "
                      "max_tokens=lead_steps+steps+1; lead_steps = prefill steps of the batch at "
                      "max_num_batched_tokens + 16, so both runs reach the full batch and share the prefill and "
                      "the tail of finishing requests, and the difference is `steps` decode-only steps at the "
                      "full batch (no prefix caching in either system). output_tokens_per_s = batch / decode step. "
                      "vattn's decode_step_ms_observed: median gap between consecutive decode-only StepRecords' "
                      "done_at at the full batch in the long run",
    "prefill": "prefill_tflops_per_s = prefill_flops / seconds; prefill_flops = 2 * (params - embedding - "
               "lm_head) * prompt tokens + 2 * vocab * hidden per request + 2 * layers * q_heads * head_dim * "
               "sum(L * (L + 1)) (causal QK^T and PV), from the checkpoint's safetensors headers",
    "profile": "--profile: torch.profiler over a window of decode steps of the first throughput workload, "
               "started and stopped from step observers; those steps are left out of the step timings, but "
               "the workload's wall time includes the profiler's cost: take headline throughput from a run "
               "without --profile. `table` is the profiler's text as printed, `kernels` the same rows as data",
    "roofline": "bytes one decode step must read (streamed weights + KV of the context tokens) / "
                "(hbm_copy_bytes_per_s * tp)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size, for every system")
    ap.add_argument("--systems", default="vattn,hf,hf-cb", help=f"comma list of {', '.join(SYSTEMS)}")
    ap.add_argument("--workloads", default="fixed", help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--num-requests", type=int, default=256, help="fixed workload")
    ap.add_argument("--input-len", type=int, default=1024, help="fixed workload")
    ap.add_argument("--output-len", type=int, default=256, help="fixed workload")
    ap.add_argument("--mixed-requests", type=int, default=1000)
    ap.add_argument("--mixed-max-len", type=int, default=8192, help="cap on a mixed request's prompt + output")
    ap.add_argument("--prefill-requests", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=8192)
    ap.add_argument("--decode-latency", default="", help="comma list of batch sizes (empty: skip)")
    ap.add_argument("--decode-context", type=int, default=4096)
    ap.add_argument("--decode-steps", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="seed of every workload's token ids and lengths")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the longest request of the run")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-layers-per-tensor", default="auto")
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--profile", action="store_true",
                    help="vattn: profile --profile-steps decode steps of the first throughput workload")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--peer-env", default=None, help="script to source before starting the vLLM peer")
    ap.add_argument("--peer-timeout", type=float, default=None, help="seconds before the vLLM peer is stopped")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="draw the report's figures into this file (matplotlib)")
    ap.add_argument("--stats-interval", type=float, default=0.05,
                    help="vattn: seconds between samples of the engine's KV books (kv_timeline)")
    args = ap.parse_args(argv)
    args.system_list = _names(args.systems, SYSTEMS, "--systems")
    args.workload_list = _names(args.workloads, WORKLOADS, "--workloads")
    args.decode_batches = [int(b) for b in args.decode_latency.split(",") if b.strip()]
    if args.kv_layers_per_tensor != "auto":
        args.kv_layers_per_tensor = int(args.kv_layers_per_tensor)
    return args


def _names(value: str, known: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; choose from {', '.join(known)}")
    return names


def build_jobs(args: argparse.Namespace, vocab: int) -> list[Job]:
    """The run's jobs in order; the warm-up comes first and is sized once max_model_len is known."""
    jobs = []
    for name in args.workload_list:
        if name == "fixed":
            jobs.append(fixed_job(args.num_requests, args.input_len, args.output_len, vocab, args.seed))
        elif name == "mixed":
            jobs.append(mixed_job(args.mixed_requests, vocab, args.mixed_max_len, args.seed))
        else:
            jobs.append(prefill_job(args.prefill_requests, args.prefill_len, vocab, args.seed))
    for b in args.decode_batches:
        jobs.append(decode_latency_job(b, args.decode_context, args.decode_steps, vocab,
                                       args.max_num_batched_tokens, args.seed))
    if not jobs:
        raise SystemExit("nothing to run: give --workloads and/or --decode-latency")
    need = max(j.max_len for j in jobs)
    if args.max_model_len is None:
        args.max_model_len = need
    elif args.max_model_len < need:
        worst = max(jobs, key=lambda j: j.max_len)
        raise SystemExit(f"--max-model-len {args.max_model_len} is below the {need} tokens workload "
                         f"{worst.name!r} needs; raise it or leave it unset")
    long_len = max(1, min(args.max_num_batched_tokens, args.max_model_len - 2))
    return [warmup_job(vocab, long_len)] + jobs


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 * GIB) -> float:
    """Bytes/s of a large device copy, counting bytes read and written (HBM's practical limit)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    bw = 2 * nbytes * reps / (time.perf_counter() - t)
    del src, dst
    torch.cuda.empty_cache()
    return bw


# ---- records ------------------------------------------------------------------------------------
def make_record(system: str, tp: int, job: Job, meas: dict, costs: ModelCosts, bw: float | None) -> dict:
    """One result record from a system's raw measurement; the same arithmetic for every system."""
    rec = {"system": system, "tp": tp, "workload": job.name, "kind": job.kind}
    if "error" in meas or "unavailable" in meas or "skipped" in meas:
        return {**rec, "output_tokens_per_s": None, **meas}
    if job.kind == "decode_latency":
        batch, steps, context = len(job.prompts), job.steps, len(job.prompts[0])
        decode_s = meas["seconds_long"] - meas["seconds_short"]
        if decode_s <= 0:  # run-to-run noise larger than the timed steps: no number rather than a wrong one
            return {**rec, "output_tokens_per_s": None, **meas,
                    "error": f"the long run was not slower than the short one ({decode_s:.4f} s); raise --decode-steps"}
        step_s = decode_s / steps
        rec.update(batch=batch, context=context, steps=steps, lead_steps=job.lead_steps, requests=batch,
                   output_tokens=batch * steps, seconds=decode_s, decode_step_ms=step_s * 1e3,
                   output_tokens_per_s=batch / step_s, total_tokens_per_s=batch / step_s,
                   output_tokens_expected_short=batch * job.decode_max_tokens[0],
                   output_tokens_expected_long=batch * job.decode_max_tokens[1], **meas)
        if bw:  # tokens attended per timed step, on average over the timed steps
            attended = batch * (context + job.lead_steps + (steps + 1) / 2)
            rec["roofline_step_ms"] = costs.decode_bytes(attended) / (bw * tp) * 1e3
            rec["roofline_fraction"] = rec["roofline_step_ms"] / rec["decode_step_ms"]
        return rec
    seconds = meas["seconds"]
    rec.update(requests=meas["requests"], prompt_tokens=meas["prompt_tokens"], output_tokens=meas["output_tokens"],
               output_tokens_expected=sum(job.max_tokens), seconds=seconds,
               output_tokens_per_s=meas["output_tokens"] / seconds,
               total_tokens_per_s=(meas["prompt_tokens"] + meas["output_tokens"]) / seconds)
    rec.update({k: v for k, v in meas.items() if k not in rec})
    if job.name == "prefill":
        rec["prefill_flops"] = costs.prefill_flops([len(p) for p in job.prompts])
        rec["prefill_tflops_per_s"] = rec["prefill_flops"] / seconds / 1e12
    if bw and "decode_context_tokens_median" in rec:
        rec["bytes_read_per_decode_step"] = costs.decode_bytes(rec["decode_context_tokens_median"])
        rec["roofline_step_ms"] = rec["bytes_read_per_decode_step"] / (bw * tp) * 1e3
        rec["roofline_fraction"] = rec["roofline_step_ms"] / rec["decode_step_ms_median"]
    return rec


def ratios(results: list[dict]) -> dict:
    """vattn / vllm per workload, for each workload both measured; > 1 means vattn is faster."""
    by = {(r["system"], r["workload"]): r for r in results if r.get("output_tokens_per_s")}
    out = {}
    for (system, workload), ours in by.items():
        peer = by.get(("vllm", workload))
        if system != "vattn" or peer is None:
            continue
        if ours["kind"] == "decode_latency":
            out[workload] = {"metric": "decode steps per second (1 / decode_step_ms)", "vattn_ms": ours["decode_step_ms"],
                             "vllm_ms": peer["decode_step_ms"],
                             "vattn_over_vllm": peer["decode_step_ms"] / ours["decode_step_ms"]}
        else:
            metric = "prefill_tflops_per_s" if workload == "prefill" else "output_tokens_per_s"
            out[workload] = {"metric": metric, "vattn": ours[metric], "vllm": peer[metric],
                             "vattn_over_vllm": ours[metric] / peer[metric]}
    return out


# ---- systems --------------------------------------------------------------------------------------
def run_vattn(name: str, args, jobs: list[Job], dtype: str, emit) -> None:
    system = VattnSystem(stats_interval=args.stats_interval, model=args.model, tensor_parallel_size=args.tp,
                         device=args.device, dtype=dtype,
                         max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         kv_layers_per_tensor=1 if name == "vattn-g1" else args.kv_layers_per_tensor)
    emit.engine_start(name, system.engine_start_s)
    profiled = False
    try:
        for job in jobs:
            profile = args.profile and name == "vattn" and job.kind == "throughput" and not profiled
            profiled = profiled or profile
            try:
                meas = system.run(job, profile_steps=args.profile_steps if profile else 0)
            except Exception as exc:  # noqa: BLE001 - one failed workload must not lose the others
                logger.exception("%s on %s failed", name, job.name)
                meas = {"error": f"{type(exc).__name__}: {exc}"}
            if job.kind != "warmup" or "error" in meas:
                emit(name, job, meas)
    finally:
        system.shutdown()


def run_vllm(args, jobs: list[Job], dtype: str, emit) -> None:
    res = launch_beside(args.out, [j.to_dict() for j in jobs], engine_options(args, dtype),
                        peer_env=args.peer_env, timeout_s=args.peer_timeout)
    emit.peer(res)
    for job, meas in measurements(res, jobs):
        if job.kind != "warmup" or "error" in meas:
            emit("vllm", job, meas)


def run_hf(name: str, args, jobs: list[Job], dtype: str, device: torch.device, emit) -> None:
    for job in jobs:
        if job.kind == "warmup":
            continue
        why = "transformers baselines run the throughput workloads only" if job.kind != "throughput" \
            else hf_baselines.uniform(job)
        if why:
            emit(name, job, {"skipped": why})
            continue
        try:
            if name == "hf":
                meas = hf_baselines.run_generate(args.model, dtype, device, job, args.hf_batch)
                meas["label"] = f"transformers generate (static batches of {args.hf_batch}, sdpa)"
            else:
                meas = hf_baselines.run_generate_batch(args.model, dtype, device, job)
                meas["label"] = "transformers continuous batching (generate_batch)"
        except Exception as exc:  # noqa: BLE001 - one baseline failing must not lose the others
            logger.exception("%s failed", name)
            meas = {"error": f"{type(exc).__name__}: {exc}"}
        emit(name, job, meas)


class Report(RunReport):
    """The run's JSON: one record per (system, workload), the ratios and the baselines' ratios."""

    def __init__(self, args, costs: ModelCosts, bw: float | None, data: dict) -> None:
        super().__init__(args.out, data)
        self.args, self.costs, self.bw = args, costs, bw

    def __call__(self, system: str, job: Job, meas: dict) -> None:
        rec = make_record(system, self.args.tp, job, meas, self.costs, self.bw)
        self.data["results"].append(rec)
        self._finish()
        logger.info("result: %s", json.dumps({k: v for k, v in rec.items() if k != "profile"}))

    def _finish(self) -> None:
        results = self.data["results"]
        self.data["ratios"] = ratios(results)
        for r in results:  # the transformers baselines against ours, per workload
            ours = next((o for o in results if o["system"] == "vattn" and o["workload"] == r["workload"]
                         and o.get("output_tokens_per_s")), None)
            if ours and r.get("output_tokens_per_s") and r["system"] in ("hf", "hf-cb", "vattn-g1"):
                r["ratio_vs_vattn"] = r["output_tokens_per_s"] / ours["output_tokens_per_s"]
        self.save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hf, device, dtype = resolve_checkpoint(args)
    costs = ModelCosts.from_checkpoint(args.model, dtype)
    jobs = build_jobs(args, int(hf["vocab_size"]))
    bw = measure_copy_bandwidth(device) if device.type == "cuda" else None
    config = {k: v for k, v in vars(args).items() if k not in ("system_list", "workload_list")}
    data: dict = {"config": {**config, "resolved_dtype": dtype}, "device": device_info(device),
                  "hbm_copy_bytes_per_s": bw, "versions": {"vattn": versions()}, "engine_start_s": {},
                  "device_memory_in_use_gib_before": {}, "methods": METHODS,
                  "jobs": {j.name: j.summary() for j in jobs}, "results": [], "ratios": {}}
    report = Report(args, costs, bw, data)
    for name in args.system_list:
        data["device_memory_in_use_gib_before"][name] = used_bytes(device) / GIB
        logger.info("system %s: starting", name)
        try:
            if name in ("vattn", "vattn-g1"):
                run_vattn(name, args, jobs, dtype, report)
            elif name == "vllm":
                run_vllm(args, jobs, dtype, report)
            else:
                run_hf(name, args, jobs, dtype, device, report)
        except Exception as exc:  # noqa: BLE001 - e.g. an engine that fails to start: keep the others
            logger.exception("%s failed", name)
            done = {r["workload"] for r in data["results"] if r["system"] == name}
            for job in jobs[1:]:
                if job.name not in done:
                    report(name, job, {"error": f"{type(exc).__name__}: {exc}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.save()
    if args.plot:
        from vattn_ray.bench.plots import plot_throughput

        plot_throughput(data, args.plot)
    print(render(data))
    return 0


# ---- text -----------------------------------------------------------------------------------------
def render(data: dict) -> str:
    """Markdown tables of the run: throughput per workload, decode latency, prefill, ratios."""
    lines = ["| workload | system | tp | output tok/s | total tok/s | seconds | note |", "|---|---|---:|---:|---:|---:|---|"]
    for r in data["results"]:
        if r["kind"] == "decode_latency":
            continue
        if not r.get("output_tokens_per_s"):
            note = r.get("unavailable") or r.get("skipped") or r.get("error") or ""
            lines.append(f"| {r['workload']} | {r['system']} | {r['tp']} | | | | {note[:100]} |")
            continue
        note = f"{r['prefill_tflops_per_s']:.0f} TFLOP/s" if "prefill_tflops_per_s" in r else ""
        if "decode_step_ms_median" in r:
            note += (f"decode step {r['decode_step_ms_median']:.2f} ms at batch {r['decode_batch']}"
                     + (f" ({100 * r['roofline_fraction']:.0f}% of roofline)" if "roofline_fraction" in r else ""))
        lines.append(f"| {r['workload']} | {r['system']} | {r['tp']} | {r['output_tokens_per_s']:.0f} | "
                     f"{r['total_tokens_per_s']:.0f} | {r['seconds']:.1f} | {note} |")
    dec = [r for r in data["results"] if r["kind"] == "decode_latency"]
    if dec:
        lines += ["", "| decode batch | context | system | ms per step | observed (vattn) | roofline ms |",
                  "|---:|---:|---|---:|---:|---:|"]
        for r in dec:
            if "decode_step_ms" not in r:
                lines.append(f"| {r['workload']} | | {r['system']} | {(r.get('unavailable') or r.get('error') or '')[:60]} | | |")
                continue
            obs = r.get("decode_step_ms_observed")
            lines.append(f"| {r['batch']} | {r['context']} | {r['system']} | {r['decode_step_ms']:.2f} | "
                         f"{'' if obs is None else f'{obs:.2f}'} | {r.get('roofline_step_ms', float('nan')):.2f} |")
    if data["ratios"]:
        lines += ["", "| workload | metric | vattn / vllm |", "|---|---|---:|"]
        for w, q in data["ratios"].items():
            lines.append(f"| {w} | {q['metric']} | {q['vattn_over_vllm']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
