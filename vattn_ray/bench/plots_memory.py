"""Figures of the benchmarks of KV memory put to other uses: prefix caching side by side with vLLM's
(`bench prefix`) and elastic memory under a burst (`bench elastic`)."""

from __future__ import annotations

import math
from typing import Any

from vattn_ray.bench.plots_common import bars, cdf, device_name, log_scale, note_if_empty, pyplot, save

PASSES = (("without_elasticity", "without elasticity"), ("with_elasticity", "with elasticity"))


def _ttft_s(r: dict) -> list[float]:
    """A record's per-request TTFTs in seconds (sending to the step that gave the first token)."""
    pr = r.get("per_request") or {}
    return [f - s for s, f in zip(pr.get("sent_at", []), pr.get("first_token_at", [])) if f is not None]


def plot_prefix(report: dict, path: str) -> Any:
    """Per workload, every system's TTFT CDF (log seconds); output tokens/s per workload and system.
    Records without a measurement (an unavailable peer, an error) are left out and named."""
    plt = pyplot()
    results = report["results"]
    ok = [r for r in results if r.get("output_tokens_per_s")]
    skipped = [r for r in results if not r.get("output_tokens_per_s")]
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    systems = list(dict.fromkeys(r["system"] for r in ok))
    colour = {s: f"C{i}" for i, s in enumerate(systems)}  # the order bars() colours its series in
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(5 * len(workloads) + 5, 4.8), layout="constrained",
                             squeeze=False)
    jobs = report.get("jobs", {})
    for ax, w in zip(axes[0], workloads):
        for r in (r for r in ok if r["workload"] == w):
            p50 = r.get("ttft_p50_ms")
            cdf(ax, _ttft_s(r), r["system"] + (f" (p50 {p50 / 1e3:.2f} s)" if p50 is not None else ""),
                color=colour[r["system"]])
        n = jobs.get(w, {}).get("requests")
        ax.set_title(f"{w}: time to first token CDF" + (f" ({n:,} requests)" if n else ""))
        ax.set_xlabel("time to first token (s)")
        ax.set_ylabel("fraction of requests")
        if ax.lines:
            log_scale(ax)
            ax.legend(fontsize=7, loc="lower right")
        note_if_empty(ax, "per-request TTFTs")
    tput = axes[0][-1]
    value = {(r["workload"], r["system"]): r["output_tokens_per_s"] for r in ok}
    bars(tput, workloads, {s: [value.get((w, s)) for w in workloads] for s in systems})
    tput.set_ylabel("output tokens/s")
    tput.set_title("throughput")
    note_if_empty(tput, "measured runs")
    cfg = report.get("config", {})
    title = (f"prefix caching on {device_name(report) or '?'}: {cfg.get('dtype', '')} TP={cfg.get('tp', 1)}, "
             "every system through one step loop, greedy; caching off only in systems named *-nocache")
    if skipped:  # say what is missing rather than leave a gap unexplained
        why = [f"{r['system']} {r['workload']} ({(r.get('unavailable') or r.get('error') or 'no result')[:60]})"
               for r in skipped]
        title += "\nnot measured, left out: " + "; ".join(why)
    fig.suptitle(title)
    return save(fig, path)


def plot_elastic(report: dict, path: str) -> Any:
    """Burst TTFT p50/p99 (log) and output tokens/s with and without elasticity, and a timeline of
    each pass: the burst window, the trace's end, and when the pair was merged."""
    plt = pyplot()
    fig, ax = plt.subplot_mosaic([["ttft", "tput"], ["time", "time"]], figsize=(12, 7.5), layout="constrained",
                                 height_ratios=[3, 1.4])
    runs = [(label, report[key]) for key, label in PASSES if report.get(key)]
    _burst_ttft(ax["ttft"], runs)
    _elastic_throughput(ax["tput"], runs)
    _timeline(ax["time"], runs, report.get("argv", {}))
    a, device = report.get("argv", {}), report.get("device")
    restore = (report.get("restore") or {}).get("restore_s_max")
    bursts = ", ".join(_num(b) for b in a.get("bursts") or []) or "?"
    count = device.get("count") if isinstance(device, dict) else None
    title = (f"elastic memory, two replicas on {f'{count}x ' if count else ''}{device_name(report) or '?'}: "
             f"Poisson arrivals at {_num(a.get('rate'))} req/s, {_num(a.get('burst_factor'))}x for "
             f"{_num(a.get('burst_s'))} s from {bursts} s, the same trace on both passes")
    if restore is not None:
        title += f"\nslowest restore of the dropped layers after a split: {restore:.2f} s"
    fig.suptitle(title)
    return save(fig, path)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else "?"


def _burst_ttft(ax: Any, runs: list[tuple[str, dict]]) -> None:
    """p50 and p99 TTFT of the requests that arrived inside bursts. A request with no first token
    when its pass stopped counts with the time it had waited, so such a pass's bars are lower bounds."""
    groups = (("ttft_p50_burst_ms", "burst p50"), ("ttft_p99_burst_ms", "burst p99"))
    width = 0.8 / max(len(runs), 1)
    for i, (label, r) in enumerate(runs):
        values = [r.get(k) for k, _ in groups]
        missing = r.get("burst_without_first_token") or 0
        bound = "≥ " if missing else ""
        if missing:
            label += f"\n(lower bounds: {missing} of {r.get('burst_requests', '?')} burst requests had no first token)"
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(groups))]
        rects = ax.bar(xs, [math.nan if v is None else v / 1e3 for v in values], width, label=label,
                       hatch="//" if missing else None, edgecolor="white" if missing else None)
        ax.bar_label(rects, labels=["" if v is None else f"{bound}{v / 1e3:.2f} s" for v in values], fontsize=7,
                     padding=1)
    ax.set_xticks(range(len(groups)), [g for _, g in groups])
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT of the requests that arrived in the burst")
    if ax.patches:
        log_scale(ax, "y")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 30)  # room above the bars for the legend
        ax.legend(fontsize=7, loc="upper right")
    note_if_empty(ax, "passes")


def _elastic_throughput(ax: Any, runs: list[tuple[str, dict]]) -> None:
    """Output tokens/s of completed requests per pass, with completions and preemptions below."""
    names = [f"{label}\n{r.get('completed', '?')} of {r.get('sent', '?')} completed\n"
             f"{r.get('preemptions', '?')} preemption{'' if r.get('preemptions') == 1 else 's'}" for label, r in runs]
    bars(ax, names, {"output tokens/s": [r.get("output_tokens_per_s") for _, r in runs]})
    for i, rect in enumerate(ax.patches):
        rect.set_color(f"C{i}")  # the pass's colour in the TTFT panel
    ax.set_ylabel("output tokens/s (completed requests)")
    ax.set_title("throughput")
    note_if_empty(ax, "passes")


def _timeline(ax: Any, runs: list[tuple[str, dict]], argv: dict) -> None:
    """One row per pass: split (two replicas) or merged (one pipeline over both GPUs), each
    transition drawn over its duration (an event's t_s is when it finished)."""
    for window in argv.get("bursts") or []:
        ax.axvspan(window, window + argv.get("burst_s", 0), color="tab:orange", alpha=0.15,
                   label="burst window" if window == argv["bursts"][0] else None)
    if argv.get("duration_s"):
        ax.axvline(argv["duration_s"], color="k", linestyle=":", linewidth=1, label="arrivals end")
    drawn = set()

    def span(y: int, start: float, end: float, colour: str, label: str) -> None:
        if end <= start:
            return
        ax.broken_barh([(start, end - start)], (y - 0.3, 0.6), color=colour,
                       label=None if label in drawn else label)
        drawn.add(label)

    for i, (_, r) in enumerate(runs):
        y = len(runs) - 1 - i  # the first pass on top
        end = max([r.get("seconds") or 0] + [e.get("t_s", 0) for e in r.get("events", [])])
        t, merged = 0.0, False
        for e in sorted((e for e in r.get("events", []) if "t_s" in e), key=lambda e: e["t_s"]):
            begin = e["t_s"] - e.get("duration_s", 0)
            span(y, t, begin, "tab:green" if merged else "lightgrey",
                 "merged: one pipeline" if merged else "split: two replicas")
            span(y, begin, e["t_s"], "k", "merging or splitting")
            text = (f"merge {e['duration_s']:.2f} s, {e.get('requests_recomputed', 0)} recomputed"
                    if e["event"] == "merge" else f"split ({e.get('reason', '')}) {e['duration_s']:.2f} s, "
                    f"restore {e.get('restore_s', 0):.2f} s")
            ax.annotate(text, (e["t_s"], y + 0.3), (0, 3), textcoords="offset points", fontsize=7,
                        ha="left" if e["event"] == "merge" else "right", va="bottom")
            t, merged = e["t_s"], e["event"] == "merge"
        span(y, t, end, "tab:green" if merged else "lightgrey",
             "merged: one pipeline" if merged else "split: two replicas")
        if r.get("seconds"):
            ax.plot([r["seconds"]] * 2, [y - 0.35, y + 0.35], color="tab:red", linewidth=2,
                    label=None if "done" in drawn else "last completion")
            drawn.add("done")
    ax.set_yticks(range(len(runs)), [label for label, _ in reversed(runs)])
    ax.set_ylim(-0.6, len(runs) - 0.1)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds from the pass's start")
    ax.set_title("the pair's state during each pass")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    note_if_empty(ax, "passes")
