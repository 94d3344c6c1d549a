"""Figures from benchmark reports (matplotlib, ``pip install 'vattn-ray[bench]'``).

    python -m vattn_ray.bench plots docs/results/serving_2xh200.json --out docs/results/serving_2xh200.png

The report's kind is recognised from its JSON, and a benchmark's ``--plot out.png`` calls the same
function on its report, so a figure can always be redrawn from the JSON alone:
- serving: output tokens/s and completed requests/s against the offered request rate; TTFT and
  inter-token latency CDFs, one line per rate (in reports without per-request samples: their p50
  and p99 against the rate); the server's KV page groups (mapped, free, idle) and running requests
  over the run (sampled from ``GET /stats``), when sampled.
- serving_comparison (serving_compare, systems side by side): output tokens/s, p99 TTFT and p99
  ITL against the offered rate, one line per system, with the SLO's bounds; TTFT and ITL CDFs of
  every system at every rate.
- throughput: output tokens/s per workload and system; prefill TFLOP/s and decode step time
  against the bandwidth roofline, where measured; the engine's KV page groups and running /
  waiting requests over the run (sampled from `LLMEngine.stats()`), the memory story of demand paging.
- kv: map and unmap throughput per layers-per-tensor G; decode step time with pre-mapped, on-demand
  and prefetched pages.
- attention: decode attention bandwidth per kernel against the device's copy bandwidth; prefill
  attention TFLOP/s per kernel.
- allreduce: time per call against message size per method (the chosen one ringed); the chosen
  method's speed-up over NCCL.
- tp: per TP size and control path, the head's control overhead per step, output tokens/s, and the
  decode step with its all-reduces' share.
- prefix: per workload, every system's TTFT CDF (log seconds); output tokens/s per workload and
  system (records with no measurement are left out and named in the title).
- elastic: burst TTFT p50 and p99 (log) and output tokens/s with and without elasticity (a pass
  whose burst requests did not all get a first token has lower bounds, marked); a timeline of each
  pass with the burst window and when the pair was merged.
"""

from __future__ import annotations

import argparse
import json

from vattn_ray.bench.plots_engine import plot_allreduce, plot_attention, plot_kv, plot_throughput, plot_tp
from vattn_ray.bench.plots_memory import plot_elastic, plot_prefix
from vattn_ray.bench.plots_serving import plot_serving, plot_serving_comparison

__all__ = ["PLOTTERS", "kind_of", "plot_allreduce", "plot_attention", "plot_elastic", "plot_kv", "plot_prefix",
           "plot_serving", "plot_serving_comparison", "plot_throughput", "plot_tp"]


def kind_of(report: dict) -> str:
    """Which benchmark wrote `report`: one of PLOTTERS' keys."""
    if "systems" in report and "same_load" in report:
        return "serving_comparison"
    if "decode" in report and "throughput" in report:
        return "kv"
    if report.get("benchmark") == "allreduce" or ("sizes" in report and "symmetric_memory" in report):
        return "allreduce"
    if "copy_TBps" in report and ("rows" in report or "prefill_rows" in report):
        return "attention"
    if report.get("groups") and all("overhead" in g for g in report["groups"]):
        return "tp"
    if report.get("benchmark") == "elastic" or ("with_elasticity" in report and "without_elasticity" in report):
        return "elastic"
    if "url" in report.get("config", {}) or "server" in report:
        return "serving"
    if "results" in report and any(r.get("kind") == "schedule" for r in report["results"]):
        return "prefix"  # before throughput: its records carry output_tokens_per_s too
    if "results" in report and any("output_tokens_per_s" in r for r in report["results"]):
        return "throughput"
    raise ValueError(f"not a report of a benchmark with a figure ({', '.join(PLOTTERS)})")


PLOTTERS = {"serving": plot_serving, "serving_comparison": plot_serving_comparison,
            "throughput": plot_throughput, "kv": plot_kv, "attention": plot_attention,
            "allreduce": plot_allreduce, "tp": plot_tp, "prefix": plot_prefix, "elastic": plot_elastic}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a benchmark's --out JSON")
    ap.add_argument("--out", required=True, help="the figure to write (.png, .svg, .pdf)")
    args = ap.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    kind = kind_of(report)
    PLOTTERS[kind](report, args.out)
    print(f"wrote {args.out} ({kind} report)")
    return 0
