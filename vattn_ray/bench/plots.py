"""Figures from benchmark reports (matplotlib, ``pip install 'vattn-ray[bench]'``).

    python -m vattn_ray.bench plots results/serving.json --out docs/results/serving.png

Each benchmark's ``--plot out.png`` calls the same function on its report, so a figure can always
be redrawn from the JSON alone:
- serving: output tokens/s and requests/s against the offered request rate; TTFT and inter-token
  latency CDFs, one line per rate; the server's KV page groups (mapped, free, idle) and running
  requests over the run (sampled from ``GET /stats``).
- serving_compare (systems side by side): output tokens/s, p99 TTFT and p99 ITL against the
  offered rate, one line per system, with the SLO's bounds.
- throughput: output tokens/s per system; the engine's KV page groups and running / waiting
  requests over the run (sampled from `LLMEngine.stats()`), the memory story of demand paging.
- kv: map and unmap throughput per layers-per-tensor G; decode step time with pre-mapped, on-demand
  and prefetched pages.
"""

from __future__ import annotations

import argparse
import json
import math
import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark machines
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    xs = sorted(values)
    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def _note_if_empty(ax, what: str) -> None:
    """Reports of older runs lack some samples: say so on the panel instead of drawing nothing."""
    if not ax.lines:
        ax.text(0.5, 0.5, f"no {what} in this report", ha="center", va="center", transform=ax.transAxes)


def _kv_timeline(ax, timeline: list[dict], title: str) -> None:
    """Page groups mapped / free / idle (left axis) and running / waiting requests (right axis)."""
    if not timeline:
        ax.text(0.5, 0.5, "no KV samples in this report", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    t = [s["t"] for s in timeline]
    for key, label in (("num_groups_mapped", "mapped"), ("num_groups_free", "free"),
                       ("num_groups_idle", "idle (kept for reuse)")):
        ax.plot(t, [s.get(key) for s in timeline], label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV page groups")
    ax.set_title(title)
    right = ax.twinx()
    right.plot(t, [s.get("num_running") for s in timeline], "k--", linewidth=0.8, label="running")
    right.plot(t, [s.get("num_waiting") for s in timeline], "k:", linewidth=0.8, label="waiting")
    right.set_ylabel("requests")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper right")


def plot_serving(report: dict, path: str) -> None:
    plt = _pyplot()
    results = report["results"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    rates = [r["offered_rate"] if math.isinf(r["rate"]) and r.get("offered_rate") else r["rate"] for r in results]
    ax = axes[0][0]
    ax.plot(rates, [r["output_tokens_per_s"] or 0 for r in results], "o-", label="output tokens/s")
    ax.set_xlabel("offered request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs request rate")
    right = ax.twinx()
    right.plot(rates, [r["request_throughput"] or 0 for r in results], "s--", color="tab:orange",
               label="completed req/s")
    right.set_ylabel("completed requests/s")
    ax.legend(loc="upper left", fontsize=7)
    right.legend(loc="lower right", fontsize=7)
    for r in results:
        label = f"{r['rate']:g} req/s"
        _cdf(axes[0][1], [1e3 * q["ttft_s"] for q in r.get("requests", []) if q.get("ttft_s") is not None], label)
        _cdf(axes[1][0], [1e3 * x for x in r.get("itl_s", [])], label)
    for ax, name in ((axes[0][1], "TTFT"), (axes[1][0], "inter-token latency")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{name} CDF")
        if ax.lines:
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        _note_if_empty(ax, f"per-request {name} samples")
    timeline, offset = [], 0.0
    for r in results:  # the rates ran one after the other: lay their samples end to end
        timeline += [{**s, "t": s["t"] + offset} for s in r.get("kv_timeline", [])]
        offset = timeline[-1]["t"] if timeline else offset
    _kv_timeline(axes[1][1], timeline, "server KV memory over the run")
    cfg = report["config"]
    fig.suptitle(f"serving {cfg['model']}: {cfg['input_len']} in / {cfg['output_len']} out tokens")
    _save(fig, path)


def plot_serving_comparison(cmp: dict, path: str) -> None:
    """Systems side by side (serving_compare's JSON): throughput, p99 TTFT and p99 ITL against the
    offered rate, with the SLO's bounds drawn; the per-request CDFs are in each system's own figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    slo = next((s["slo"] for s in cmp["systems"].values() if s.get("slo")), None)
    for name, s in cmp["systems"].items():
        rows = sorted((r for r in s["rates"] if r["completed"]), key=lambda r: r["rate"])
        best = (s.get("slo") or {}).get("highest_rate_meeting_slo")
        label = f"{name} (SLO met up to {best:g} req/s)" if best is not None else f"{name} (SLO never met)"
        rates = [r["rate"] for r in rows]
        axes[0].plot(rates, [r["output_tokens_per_s"] or 0 for r in rows], "o-", label=label)
        axes[1].plot(rates, [r["ttft_ms"]["p99"] for r in rows], "o-", label=name)
        axes[2].plot(rates, [r["itl_ms"]["p99"] for r in rows], "o-", label=name)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("throughput vs request rate")
    for ax, key, title in ((axes[1], "ttft_p99_ms_max", "p99 time to first token (ms)"),
                           (axes[2], "itl_p99_ms_max", "p99 inter-token latency (ms)")):
        if slo:
            ax.axhline(slo[key], color="k", linestyle=":", linewidth=1, label=f"SLO {slo[key]:g} ms")
        ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.set_title(title.split(" (")[0])
    for ax in axes:
        ax.set_xlabel("offered request rate (req/s)")
        if ax.lines:
            ax.legend(fontsize=7)
        _note_if_empty(ax, "measured rates")
    cfg = cmp.get("config", {})
    fig.suptitle(f"serving side by side: {cfg.get('input_len', '?')} in / {cfg.get('output_len', '?')} out "
                 f"tokens, same load on every system: {cmp.get('same_load')}")
    _save(fig, path)


def plot_throughput(report: dict, path: str) -> None:
    plt = _pyplot()
    ok = [r for r in report["results"] if r.get("output_tokens_per_s") and r.get("kind", "throughput") == "throughput"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    ax = axes[0]
    ax.bar([f"{r['system']}\n{r.get('workload', '')}" for r in ok], [r["output_tokens_per_s"] for r in ok])
    ax.set_ylabel("output tokens/s")
    ax.set_title("offline throughput")
    ax.tick_params(axis="x", labelsize=7)
    ours = next((r for r in ok if r.get("kv_timeline")), {})
    _kv_timeline(axes[1], ours.get("kv_timeline", []),
                 f"{ours.get('system', 'vattn')} {ours.get('workload', '')}: KV page groups over the run")
    cfg = report["config"]
    device = report.get("device")
    device = device.get("name", "") if isinstance(device, dict) else (device or "")
    fig.suptitle(f"throughput: {cfg['num_requests']} requests, {cfg['input_len']} in / {cfg['output_len']} out "
                 f"tokens{', ' + device if device else ''}")
    _save(fig, path)


def plot_kv(report: dict, path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = report["throughput"]
    groups = list(dict.fromkeys((r["G"], r["mode"]) for r in rows))  # (G, mode) in report order
    ops = list(dict.fromkeys(r["op"] for r in rows))
    width = 0.8 / len(ops)
    for i, op in enumerate(ops):
        by_group = {(r["G"], r["mode"]): r["GB_per_s"] for r in rows if r["op"] == op}
        axes[0].bar([j + (i - (len(ops) - 1) / 2) * width for j in range(len(groups))],
                    [by_group.get(g, 0) for g in groups], width, label=op)
    axes[0].set_xticks(range(len(groups)), [f"G={g}\n{mode}" for g, mode in groups], fontsize=7)
    axes[0].set_ylabel("GB/s")
    axes[0].set_title("map / unmap throughput")
    axes[0].legend(fontsize=7)
    decode = report["decode"]
    width = 0.25
    for i, (key, label) in enumerate((("premapped_ms", "pre-mapped"), ("on_demand_ms", "on demand"),
                                      ("prefetch_ms", "prefetched"))):
        axes[1].bar([j + (i - 1) * width for j in range(len(decode))], [r[key] for r in decode], width, label=label)
    axes[1].set_xticks(range(len(decode)), [f"G={r['G']}" for r in decode])
    axes[1].set_ylabel("decode step (ms)")
    axes[1].set_title("decode step time by page mapping")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"KV benchmark on {report.get('device_name', '?')}")
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def kind_of(report: dict) -> str:
    """Which benchmark wrote `report`: "serving", "serving_comparison", "throughput" or "kv"."""
    if "systems" in report and "same_load" in report:
        return "serving_comparison"
    if "decode" in report and "throughput" in report:
        return "kv"
    if "config" in report and "url" in report["config"]:
        return "serving"
    if "results" in report and any("output_tokens_per_s" in r for r in report["results"]):
        return "throughput"
    raise ValueError("not a serving, throughput or kv benchmark report")


PLOTTERS = {"serving": plot_serving, "serving_comparison": plot_serving_comparison,
            "throughput": plot_throughput, "kv": plot_kv}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vattn_ray.bench plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="a benchmark's --out JSON")
    ap.add_argument("--out", required=True, help="the figure to write (.png, .svg, .pdf)")
    args = ap.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    PLOTTERS[kind_of(report)](report, args.out)
    print(f"wrote {args.out}")
    return 0
