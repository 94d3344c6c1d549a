"""Figures of the online benchmarks: one server under Poisson load (`bench serving`) and systems
side by side under the same load (`bench serving_compare`)."""

from __future__ import annotations

import math
from typing import Any

from vattn_ray.bench.plots_common import cdf, kv_timeline, log_scale, note_if_empty, pyplot, save

LATENCIES = (("ttft", "time to first token", "ttft_ms"), ("itl", "inter-token latency", "itl_ms"))


def _rate(r: dict) -> float:
    """The x of a rate's point: its nominal rate, or the measured one for an all-at-once run (inf)."""
    return r["offered_rate"] if math.isinf(r["rate"]) and r.get("offered_rate") else r["rate"]


def _samples_ms(r: dict, key: str) -> list[float]:
    """A rate's per-request TTFTs or every inter-token gap, in ms (absent in older reports)."""
    if key == "ttft":
        return [1e3 * q["ttft_s"] for q in r.get("requests", []) if q.get("ttft_s") is not None]
    return [1e3 * g for g in r.get("itl_s", [])]


def plot_serving(report: dict, path: str) -> Any:
    """Throughput vs offered rate; TTFT and ITL as CDFs (one line per rate) when the report holds
    per-request samples, else their percentiles vs rate; the server's KV pages when sampled."""
    plt = pyplot()
    results = report["results"]
    rates = [_rate(r) for r in results]
    per_request = any(_samples_ms(r, "ttft") or _samples_ms(r, "itl") for r in results)
    timeline, offset = [], 0.0
    for r in results:  # the rates ran one after the other: lay their samples end to end
        timeline += [{**s, "t": s["t"] + offset} for s in r.get("kv_timeline", [])]
        offset = timeline[-1]["t"] if timeline else offset
    mosaic = [["tput", "ttft"], ["itl", "kv"]] if timeline else [["tput", "ttft", "itl"]]
    fig, ax = plt.subplot_mosaic(mosaic, figsize=(12, 8) if timeline else (16, 4.8), layout="constrained")
    _throughput_vs_rate(ax["tput"], results, rates)
    for key, name, stat in LATENCIES:
        a = ax[key]
        if per_request:
            for r in results:
                cdf(a, _samples_ms(r, key), f"{r['rate']:g} req/s")
            a.set_xlabel(f"{name} (ms)")
            a.set_ylabel("fraction of samples")
            a.set_title(f"{name} CDF" + ("" if key == "ttft" else " (every gap between tokens)"))
            if a.lines:
                log_scale(a)
        else:
            for q, style in (("p50", "o-"), ("p99", "s--")):
                ys = [(r.get(stat) or {}).get(q) for r in results]
                a.plot([x for x, y in zip(rates, ys) if y is not None], [y for y in ys if y is not None], style,
                       label=q)
            a.set_xlabel("offered request rate (req/s)")
            a.set_ylabel(f"{name} (ms)")
            a.set_title(f"{name}: p50 and p99")
        if a.lines:
            a.legend(fontsize=7)
        note_if_empty(a, f"{name} samples")
    if timeline:
        kv_timeline(ax["kv"], timeline, "server KV memory over the run (rates one after the other)")
    cfg = report["config"]
    system = cfg.get("system") or (report.get("server") or {}).get("system")
    how = "" if per_request else "\n(latency percentiles per rate: this report has no per-request samples)"
    fig.suptitle(f"serving{' ' + system if system else ''} {cfg.get('model', '')}: {cfg.get('input_len', '?')} in / "
                 f"{cfg.get('output_len', '?')} out tokens, Poisson arrivals{how}")
    return save(fig, path)


def _throughput_vs_rate(ax: Any, results: list[dict], rates: list[float]) -> None:
    ax.plot(rates, [r.get("output_tokens_per_s") or 0 for r in results], "o-", label="output tokens/s")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs request rate")
    note_if_empty(ax, "measured rates")
    if not results:
        return
    right = ax.twinx()
    right.plot(rates, [r.get("request_throughput") or 0 for r in results], "s--", color="tab:orange",
               label="completed req/s")
    top = max(rates)
    right.plot([0, top], [0, top], ":", color="grey", linewidth=0.8, label="completed = offered")
    right.set_ylabel("completed requests/s")
    for a in (ax, right):  # both from zero, so the two lines read against the same baseline
        a.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.legend(loc="upper left", fontsize=7)
    right.legend(loc="lower right", fontsize=7)


def plot_serving_comparison(cmp: dict, path: str) -> Any:
    """Systems side by side (serving_compare's JSON): throughput, p99 TTFT and p99 ITL against the
    offered rate with the SLO's bounds; TTFT and ITL CDFs of every system at every rate (colour:
    rate, line style: system), drawn from the latency quantiles the comparison keeps."""
    plt = pyplot()
    fig, ax = plt.subplot_mosaic([["tput"] * 2 + ["ttft99"] * 2 + ["itl99"] * 2, ["ttft"] * 3 + ["itl"] * 3],
                                 figsize=(15, 9), layout="constrained")
    systems = cmp["systems"]
    slo = next((s["slo"] for s in systems.values() if s.get("slo")), None)
    all_rates = sorted({r["rate"] for s in systems.values() for r in s["rates"] if r["completed"]})
    colour = {rate: f"C{i % 10}" for i, rate in enumerate(all_rates)}
    style = dict(zip(systems, ("-", "--", ":", "-.")))
    for name, s in systems.items():
        rows = sorted((r for r in s["rates"] if r["completed"]), key=lambda r: r["rate"])
        best = (s.get("slo") or {}).get("highest_rate_meeting_slo")
        label = f"{name} (SLO met up to {best:g} req/s)" if best is not None else f"{name} (SLO never met)"
        rates = [r["rate"] for r in rows]
        ax["tput"].plot(rates, [r["output_tokens_per_s"] or 0 for r in rows], "o" + style[name], label=label)
        ax["ttft99"].plot(rates, [r["ttft_ms"]["p99"] for r in rows], "o" + style[name], label=name)
        ax["itl99"].plot(rates, [r["itl_ms"]["p99"] for r in rows], "o" + style[name], label=name)
        for r in rows:
            for key in ("ttft", "itl"):
                cdf(ax[key], r.get(f"{key}_ms_quantiles") or [], f"{name} {r['rate']:g}", quantiles=True,
                    color=colour[r["rate"]], linestyle=style[name])
    ax["tput"].set_ylabel("output tokens/s")
    ax["tput"].set_title("throughput vs request rate")
    for key, bound, title in (("ttft99", "ttft_p99_ms_max", "p99 time to first token (ms)"),
                              ("itl99", "itl_p99_ms_max", "p99 inter-token latency (ms)")):
        if slo:
            ax[key].axhline(slo[bound], color="k", linestyle=":", linewidth=1, label=f"SLO {slo[bound]:g} ms")
        if ax[key].lines:
            log_scale(ax[key], "y")
        ax[key].set_ylabel(title)
        ax[key].set_title(title.split(" (")[0])
    for key in ("tput", "ttft99", "itl99"):
        ax[key].set_xlabel("offered request rate (req/s)")
        if ax[key].lines:
            ax[key].legend(fontsize=7)
        note_if_empty(ax[key], "measured rates")
    _cdf_legends(ax, style, colour)
    cfg = cmp.get("config", {})
    fig.suptitle(f"serving side by side: {cfg.get('input_len', '?')} in / {cfg.get('output_len', '?')} out "
                 f"tokens, same load on every system: {cmp.get('same_load')}")
    return save(fig, path)


def _cdf_legends(ax: dict, style: dict, colour: dict) -> None:
    """The CDF panels' legend names each rate's colour and each system's line style once."""
    from matplotlib.lines import Line2D

    handles = ([Line2D([], [], color="k", linestyle=ls, label=name) for name, ls in style.items()]
               + [Line2D([], [], color=c, label=f"{rate:g} req/s") for rate, c in colour.items()])
    for key, name in (("ttft", "time to first token"), ("itl", "inter-token latency")):
        a = ax[key]
        a.set_xlabel(f"{name} (ms)")
        a.set_ylabel("fraction of samples")
        a.set_title(f"{name} CDF, every system at every rate")
        if a.lines:
            log_scale(a)
            a.legend(handles=handles, fontsize=7, ncol=2)
        note_if_empty(a, "latency quantiles (re-run serving_compare --combine)")
