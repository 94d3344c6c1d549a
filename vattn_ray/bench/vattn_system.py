"""The project's engine on benchmark jobs, driven only through its public loop (`LLM.generate`).

Per-step timing comes from `LLMEngine.step_observers`: every processed step hands a `StepRecord`
to `StepLog`. A decode step's time is the gap between the `done_at` of two consecutive decode-only
records: in a loop that plans, runs and processes steps back to back, that gap is the whole period
of one step (planning, the GPU's work, taking the output in). The profiler is started and stopped
the same way, from an observer, for a window of decode steps (`ProfileWindow`).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from vattn_ray.bench.workloads import Job, percentile
from vattn_ray.engine import StepRecord
from vattn_ray.sampling_params import SamplingParams

GIB = 1 << 30


class StepLog:
    """Observer keeping the step records of the current measurement."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []
        self.excluded: set[int] = set()  # indices whose gap to the record before is not a clean step

    def __call__(self, rec: StepRecord) -> None:
        self.records.append(rec)

    def clear(self) -> None:
        self.records.clear()
        self.excluded.clear()

    def decode_gaps(self) -> list[tuple[float, int, int]]:
        """(seconds, batch, context tokens) of each decode-only step that followed another one."""
        out = []
        for i in range(1, len(self.records)):
            prev, rec = self.records[i - 1], self.records[i]
            if rec.decode_only and prev.decode_only and i not in self.excluded:
                out.append((rec.done_at - prev.done_at, rec.num_seqs, rec.context_tokens))
        return out


def decode_stats(gaps: list[tuple[float, int, int]]) -> dict:
    """Decode step time at the largest batch seen (the steady state of a saturated run)."""
    if not gaps:
        return {}
    full = max(b for _, b, _ in gaps)
    at_full = [g for g in gaps if g[1] == full]
    ms = [g[0] * 1e3 for g in at_full]
    return {"decode_steps_timed": len(gaps), "decode_batch": full, "decode_steps_at_full_batch": len(at_full),
            "decode_step_ms_median": statistics.median(ms), "decode_step_ms_p10": percentile(ms, 10),
            "decode_step_ms_p90": percentile(ms, 90),
            "decode_context_tokens_median": statistics.median(g[2] for g in at_full)}


class ProfileWindow:
    """Observer: profiles `steps` steps after the `after`-th decode-only step at batch `batch`
    (with `batch` None: after the `after`-th step of any kind, e.g. the prefill workload's).

    Starting and stopping the profiler happen inside observer calls, so the gaps that contain them
    (and the profiled steps) are marked excluded in `log`.
    """

    def __init__(self, log: StepLog, batch: int | None, after: int = 20, steps: int = 3) -> None:
        self.log, self.batch, self.after, self.steps = log, batch, after, steps
        self.seen = 0
        self.started_at: int | None = None
        self.prof = None
        self.result: dict | None = None

    def __call__(self, rec: StepRecord) -> None:
        index = len(self.log.records) - 1  # the log observer runs first
        if self.result is not None:
            return
        if self.prof is None:
            if self.batch is None or (rec.decode_only and rec.num_seqs == self.batch):
                self.seen += 1
                if self.seen == self.after:
                    self._start(index)
            return
        if index - self.started_at == self.steps:
            self._stop(rec)

    def _start(self, index: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=acts)
        self.started_at = index
        self.log.excluded.update(range(index + 1, index + self.steps + 2))
        self.prof.start()

    def _stop(self, rec: StepRecord) -> None:
        self.prof.stop()
        events = self.prof.key_averages()
        cuda = torch.cuda.is_available()
        rows = [{"name": e.key, "device_type": str(getattr(e, "device_type", "")).rsplit(".", 1)[-1],
                 "count": e.count, "self_device_time_total_us": _device_time(e, "self_"),
                 "device_time_total_us": _device_time(e, ""), "self_cpu_time_total_us": e.self_cpu_time_total,
                 "cpu_time_total_us": e.cpu_time_total}
                for e in events]
        own = "self_device_time_total_us" if cuda else "self_cpu_time_total_us"
        rows.sort(key=lambda r: r[own], reverse=True)
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"  # torch maps cuda -> device
        # GPU time: the device rows (kernels, copies) only; an operator row repeats its kernels' time.
        gpu_us = sum(r["self_device_time_total_us"] for r in rows if r["device_type"] not in ("CPU", ""))
        self.result = {
            "steps": self.steps, "batch": rec.num_seqs, "context_tokens": rec.context_tokens,
            "device_time_us_per_step": gpu_us / self.steps,
            "table": events.table(sort_by=sort_by, row_limit=25, max_name_column_width=80),
            "kernels": rows[:60],  # the same numbers as the table, sorted by own time, as data
        }
        self.prof = None


def _device_time(event, prefix: str) -> float:
    """Device (GPU) time of a profiler row; older torch names it cuda_time."""
    value = getattr(event, f"{prefix}device_time_total", None)
    return getattr(event, f"{prefix}cuda_time_total", 0) if value is None else value


class KVTimeline:
    """Observer: the engine's KV books (page groups mapped / free / idle, running / waiting requests)
    at most every `interval` seconds of a run: the memory story of demand paging, for plots."""

    KEYS = ("num_running", "num_waiting", "num_groups_mapped", "num_groups_free", "num_groups_idle",
            "kv_fragmentation")

    def __init__(self, engine, interval: float) -> None:
        self.engine, self.interval = engine, interval
        self.samples: list[dict] = []
        self.t0 = self.next = 0.0

    def start(self) -> None:
        self.samples = []
        self.t0 = self.next = time.perf_counter()
        self.sample(self.t0)

    def sample(self, at: float) -> None:
        stats = self.engine.stats()  # the scheduler's books: no round trip to the workers
        self.samples.append({"t": round(at - self.t0, 4), **{k: stats[k] for k in self.KEYS}})
        self.next = at + self.interval

    def __call__(self, rec: StepRecord) -> None:
        if rec.done_at >= self.next:
            self.sample(rec.done_at)


class VattnSystem:
    """One engine for all jobs of a run (engine start is timed apart and kept out of the jobs)."""

    def __init__(self, stats_interval: float = 0.05, **llm_kwargs) -> None:
        from vattn_ray import LLM

        # The decode-latency job sends the same prompts twice: a prefix-cache hit would skip the
        # second prefill. Off unless a run asks for it (the vLLM peer runs with it off too).
        llm_kwargs.setdefault("enable_prefix_caching", False)
        t0 = time.perf_counter()
        self.llm = LLM(**llm_kwargs)
        self.engine_start_s = time.perf_counter() - t0
        self.engine = self.llm.engine
        self.log = StepLog()
        self.engine.step_observers.append(self.log)
        self.timeline = KVTimeline(self.engine, stats_interval)
        self.engine.step_observers.append(self.timeline)
        self.device = torch.device(self.engine.config.device)  # resolved: "cpu" or "cuda"

    def run(self, job: Job, profile_steps: int = 0) -> dict:
        """The same measurement as the vLLM peer's (`vllm_peer.run_job`), plus step timings."""
        if job.kind == "decode_latency":
            short, long = job.decode_max_tokens
            t_short, n_short = self._timed(job.prompts, [short] * len(job.prompts))
            self.log.clear()
            t_long, n_long = self._timed(job.prompts, [long] * len(job.prompts))
            stats = decode_stats([g for g in self.log.decode_gaps() if g[1] == len(job.prompts)])
            return {"seconds_short": t_short, "seconds_long": t_long, "output_tokens_short": n_short,
                    "output_tokens_long": n_long, "decode_step_ms_observed": stats.get("decode_step_ms_median"),
                    "decode_steps_observed": stats.get("decode_steps_at_full_batch", 0)}
        window = None
        if profile_steps and job.kind == "throughput":
            if all(n == 1 for n in job.max_tokens):  # prefill only: profile prefill steps
                window = ProfileWindow(self.log, None, after=2, steps=profile_steps)
            else:
                batch = min(len(job.prompts), self.engine.config.scheduler.max_num_seqs)
                window = ProfileWindow(self.log, batch, steps=profile_steps)
            self.engine.step_observers.append(window)
        preempted = self.engine.stats().get("num_preemptions") or 0
        self.log.clear()
        self.timeline.start()
        try:
            seconds, out_tokens = self._timed(job.prompts, job.max_tokens)
        finally:
            if window is not None:
                self.engine.step_observers.remove(window)
        self.timeline.sample(time.perf_counter())
        if job.kind == "warmup":
            return {"seconds": seconds}
        result = {"seconds": seconds, "requests": len(job.prompts),
                  "prompt_tokens": sum(len(p) for p in job.prompts), "output_tokens": out_tokens,
                  "steps": len(self.log.records),
                  "num_preemptions": (self.engine.stats().get("num_preemptions") or 0) - preempted,
                  "device_memory_in_use_gib": used_bytes(self.device) / GIB,
                  **decode_stats(self.log.decode_gaps()),
                  "kv_timeline": list(self.timeline.samples)}  # a copy: later jobs sample on
        if window is not None:
            result["profile"] = window.result or {"error": "the profiled window was never reached"}
        return result

    def _timed(self, prompts: list[list[int]], max_tokens: list[int]) -> tuple[float, int]:
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
        sync(self.device)
        t = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        seconds = time.perf_counter() - t
        return seconds, sum(len(o.outputs[0].token_ids) for o in outs)

    def shutdown(self) -> None:
        """Release the engine's GPU memory before another system starts."""
        self.llm.shutdown()
        self.llm = self.engine = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def used_bytes(device: torch.device) -> int:
    """Device memory in use by every process (what the next system will not have)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free
