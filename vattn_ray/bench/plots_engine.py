"""Figures of the offline benchmarks: engine throughput (`bench throughput`), the KV cache's page
mapping (`bench kv`), attention kernels (`bench attention`), the all-reduce (`bench allreduce`)
and tensor parallelism (`bench tp`)."""

from __future__ import annotations

import math
from typing import Any

from vattn_ray.bench.plots_common import bars, device_name, kv_timeline, log_scale, note_if_empty, pyplot, save


def _step_ms(r: dict) -> float | None:
    """A record's decode step: the median of a throughput run's full-batch steps, or the
    decode-latency method's time per step."""
    return r.get("decode_step_ms_median") or r.get("decode_step_ms")


def _own_timeline(r: dict) -> list[dict]:
    """The record's KV samples up to the end of its own run. The samples run to the first one at or
    after the record's wall time (taken as the run ends); in some reports the later decode-latency
    jobs of the same engine kept appending to the list, and those samples are not this run's."""
    end = r.get("seconds")
    timeline = r.get("kv_timeline") or []
    if end is None:
        return timeline
    last = next((i for i, s in enumerate(timeline) if s["t"] >= end), len(timeline) - 1)
    return timeline[: last + 1]


def plot_throughput(report: dict, path: str) -> Any:
    """Output tokens/s per workload and system; prefill TFLOP/s and decode step time (against the
    bandwidth roofline) where measured; the engine's KV page groups over the first sampled run."""
    plt = pyplot()
    ok = [r for r in report["results"] if r.get("output_tokens_per_s")]
    tput = [r for r in ok if r.get("kind", "throughput") == "throughput" and not r.get("prefill_tflops_per_s")]
    prefill = [r for r in ok if r.get("prefill_tflops_per_s")]
    steps = [r for r in ok if _step_ms(r)]
    ours = next((r for r in report["results"] if r.get("kv_timeline")), None)
    profiled = next((r for r in ok if (r.get("profile") or {}).get("kernels")), None)
    panels = {"tok": tput, **({"prefill": prefill} if prefill else {}), **({"step": steps} if steps else {})}
    widths = [1 + len({r.get("workload") for r in rows}) for rows in panels.values()]  # room per bar group
    top = list(panels) + (["prof"] if profiled else [])
    widths += [5] if profiled else []
    mosaic = [top, ["kv"] * len(top)] if ours else [top]
    fig, ax = plt.subplot_mosaic(mosaic, figsize=(14, 8.5) if ours else (14, 4.5), layout="constrained",
                                 width_ratios=widths)
    _by_workload(ax["tok"], tput, "output_tokens_per_s")
    ax["tok"].set_ylabel("output tokens/s")
    one = {r["system"] for r in tput}
    ax["tok"].set_title("offline throughput" + (f" ({one.pop()})" if len(one) == 1 else ""))
    note_if_empty(ax["tok"], "throughput workload")
    if prefill:
        _by_workload(ax["prefill"], prefill, "prefill_tflops_per_s")
        ax["prefill"].set_ylabel("prefill TFLOP/s")
        ax["prefill"].set_title("prefill")
    if steps:
        _decode_steps(ax["step"], steps)
    if profiled:
        _profile(ax["prof"], profiled)
    if ours:
        kv_timeline(ax["kv"], _own_timeline(ours),
                    f"{ours.get('system', 'vattn')} {ours.get('workload', '')}: KV page groups over the run")
    cfg = report["config"]
    device = device_name(report)
    parts = [f"fixed workload {cfg['num_requests']} x ({cfg['input_len']} in, {cfg['output_len']} out tokens)"
             ] if "fixed" in str(cfg.get("workloads", "fixed")) else []
    parts += [f"TP={cfg['tp']}"] if (cfg.get("tp") or 1) > 1 else []
    parts += [device] if device else []
    fig.suptitle("throughput: " + ", ".join(parts) if parts else "throughput")
    return save(fig, path)


def _by_workload(ax: Any, rows: list[dict], key: str) -> None:
    workloads = list(dict.fromkeys(r.get("workload", "") for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    value = {(r.get("workload", ""), r["system"]): r[key] for r in rows}
    bars(ax, workloads, {s: [value.get((w, s)) for w in workloads] for s in systems})


def _decode_steps(ax: Any, rows: list[dict]) -> None:
    """Decode step per workload and system (p10-p90 whiskers where the run has them), with each
    workload's bandwidth roofline (bytes one step must read / measured copy bandwidth)."""
    def label(r: dict) -> str:
        if r.get("kind") == "decode_latency":
            return f"batch {r['batch']}\n{r['context']} ctx\n(decode-only)"
        return f"{r.get('workload', '')} run\nmedian step\n(batch {r.get('decode_batch', '?')})"

    groups = list(dict.fromkeys(label(r) for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = {(label(r), r["system"]): r for r in rows}
    centres = bars(ax, groups, {s: [_step_ms(by[(g, s)]) if (g, s) in by else None for g in groups]
                                for s in systems}, fmt="{:.2f}", inside=True)
    for s, xs in centres.items():
        for x, g in zip(xs, groups):
            r = by.get((g, s), {})
            if r.get("decode_step_ms_p10") is not None and r.get("decode_step_ms_p90") is not None:
                m = _step_ms(r)
                ax.errorbar(x, m, yerr=[[m - r["decode_step_ms_p10"]], [r["decode_step_ms_p90"] - m]],
                            color="k", capsize=3, linewidth=0.8)
    labelled = False
    for j, g in enumerate(groups):
        roof = next((by[(g, s)]["roofline_step_ms"] for s in systems if by.get((g, s), {}).get("roofline_step_ms")),
                    None)
        if roof:
            ax.hlines(roof, j - 0.45, j + 0.45, colors="k", linestyles="--", linewidth=1,
                      label=None if labelled else "bandwidth roofline")
            labelled = True
    ax.set_ylabel("decode step (ms)")
    ax.set_title("decode step time")
    if len(systems) == 1:  # bars() left no room above the bars for the legend (one series)
        ax.set_ylim(top=1.15 * ax.get_ylim()[1])
    ax.legend(fontsize=7, loc="upper center", ncol=len(systems) + 1 if len(groups) > 2 else 1)


def _profile(ax: Any, r: dict, top: int = 8) -> None:
    """The GPU kernels that take the most device time per profiled decode step."""
    prof = r["profile"]
    kernels = sorted((k for k in prof["kernels"] if k.get("device_type", "CUDA") == "CUDA"),
                     key=lambda k: -k["self_device_time_total_us"])
    per_step = [k["self_device_time_total_us"] / prof["steps"] / 1e3 for k in kernels]
    names = [k["name"] if len(k["name"]) <= 34 else k["name"][:33] + "…" for k in kernels[:top]]
    values = per_step[:top] + ([sum(per_step[top:])] if len(kernels) > top else [])
    names += [f"{len(kernels) - top} other kernels"] if len(kernels) > top else []
    rects = ax.barh(range(len(values)), values, color="tab:gray")
    ax.bar_label(rects, labels=[f"{v:.2f}" for v in values], fontsize=6, padding=1)
    ax.set_yticks(range(len(values)), names, fontsize=6)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_xlabel("GPU time per decode step (ms)")
    ax.set_title(f"{r['system']} {r.get('workload', '')}: profiled decode steps (batch {prof.get('batch', '?')})",
                 fontsize=10)


def plot_kv(report: dict, path: str) -> Any:
    """Map and unmap throughput per layers-per-tensor G; decode step time with pre-mapped,
    on-demand and prefetched pages."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    rows = report["throughput"]
    groups = list(dict.fromkeys((r["G"], r["mode"]) for r in rows))  # (G, mode) in report order
    ops = list(dict.fromkeys(r["op"] for r in rows))
    value = {(r["G"], r["mode"], r["op"]): r["GB_per_s"] for r in rows}
    bars(axes[0], [f"G={g}\n{mode}" for g, mode in groups],
         {op: [value.get((g, mode, op)) for g, mode in groups] for op in ops}, fmt="{:.0f}")
    axes[0].set_ylabel("GB/s")
    axes[0].set_title("map / unmap throughput")
    decode = report["decode"]
    modes = (("premapped_ms", "pre-mapped"), ("on_demand_ms", "on demand"), ("prefetch_ms", "prefetched"))
    bars(axes[1], [f"G={r['G']}" for r in decode], {label: [r[key] for r in decode] for key, label in modes},
         fmt="{:.2f}")
    axes[1].set_ylabel("decode step (ms)")
    axes[1].set_title("decode step time by page mapping")
    fig.suptitle(f"KV benchmark on {report.get('device_name', '?')}")
    return save(fig, path)


def _ctx(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)


def plot_attention(report: dict, path: str) -> Any:
    """Decode attention: KV bytes read per second per kernel against the device's copy bandwidth;
    prefill attention: TFLOP/s per kernel."""
    plt = pyplot()
    rows, pre = report.get("rows") or [], report.get("prefill_rows") or []
    panels = (["decode"] if rows else []) + (["prefill"] if pre else [])
    if not panels:
        raise ValueError("this attention report has neither decode rows nor prefill rows")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), layout="constrained", squeeze=False)
    ax = dict(zip(panels, axes[0]))
    if rows:
        kernels = (("fa2", "FA2 varlen"), ("fa2_packed", "FA2, GQA packed"), ("triton", "Triton split-KV"))
        bars(ax["decode"], [f"{r['batch']} x {_ctx(r['context'])}\nG={r['G']}" for r in rows],
             {label: [r.get(f"{k}_TBps") for r in rows] for k, label in kernels if any(f"{k}_TBps" in r for r in rows)},
             fmt="{:.2f}")
        copy = report.get("copy_TBps")
        if copy:
            ax["decode"].axhline(copy, color="k", linestyle=":", linewidth=1,
                                 label=f"device copy, read + write ({copy:.2f} TB/s)")
        ax["decode"].legend(fontsize=7, loc="upper center", ncol=2)
        ax["decode"].set_xlabel("batch x context per row")
        ax["decode"].set_ylabel("KV bytes read / time (TB/s)")
        ax["decode"].set_title("decode attention bandwidth")
    if pre:
        bars(ax["prefill"], [f"{r['batch']} x {_ctx(r['query'])} new\n@ {_ctx(r['context'])} cached" for r in pre],
             {"FA2 varlen": [r.get("fa2_TFLOPs") for r in pre],
              "Triton prefill": [r.get("triton_TFLOPs") for r in pre]})
        ax["prefill"].set_xlabel("rows x new tokens @ cached tokens")
        ax["prefill"].set_ylabel("TFLOP/s (visible query-key pairs)")
        ax["prefill"].set_title("causal prefill attention")
    shape = report.get("shape", {})
    fig.suptitle(f"attention kernels on {device_name(report)}: {shape.get('heads', '?')} query / "
                 f"{shape.get('kv_heads', '?')} KV heads, D={shape.get('head_dim', '?')}, {shape.get('dtype', '')}")
    return save(fig, path)


def _size(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def plot_allreduce(report: dict, path: str) -> Any:
    """Time per all-reduce call against message size, one line per method, the chosen method
    ringed; the chosen method's speed-up over NCCL."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained", gridspec_kw={"width_ratios": [3, 2]})
    sizes = report["sizes"]
    methods = list(dict.fromkeys(m for s in sizes for m in s["methods"]))
    for m in methods:
        pts = [(s["bytes"], s["methods"][m]["us_per_call"]) for s in sizes if m in s["methods"]]
        axes[0].plot([b for b, _ in pts], [us for _, us in pts], "o-", label=m.replace("_", "-"))
    chosen = [(s["bytes"], s["methods"][s["chosen"]]["us_per_call"]) for s in sizes if s["chosen"] in s["methods"]]
    axes[0].plot([b for b, _ in chosen], [us for _, us in chosen], "o", markersize=12, markerfacecolor="none",
                 color="k", label="chosen at that size")
    log_scale(axes[0], "y")
    axes[0].set_ylabel("time per call (µs)")
    axes[0].set_title("all-reduce latency by method")
    axes[0].legend(fontsize=7)
    gain = [(s["bytes"], s["methods"]["nccl"]["us_per_call"] / s["methods"][s["chosen"]]["us_per_call"])
            for s in sizes if "nccl" in s["methods"] and s["chosen"] in s["methods"]]
    axes[1].plot([b for b, _ in gain], [g for _, g in gain], "o-", color="tab:green")
    axes[1].axhline(1, color="k", linestyle=":", linewidth=1)
    axes[1].set_ylabel("NCCL time / chosen method's time")
    axes[1].set_title("speed-up of the chosen method over NCCL")
    cfg = report.get("config", {})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([s["bytes"] for s in sizes], [_size(s["bytes"]) for s in sizes], fontsize=7, rotation=45)
        ax.minorticks_off()
        ax.set_xlabel(f"message size (bytes of [rows, {cfg.get('hidden', 'hidden')}])")
    fig.suptitle(f"all-reduce of [rows, {cfg.get('hidden', '?')}] {cfg.get('dtype', '')} over "
                 f"{report.get('tp', '?')} GPUs ({device_name(report)}): {cfg.get('calls', '?')} calls captured in "
                 "one CUDA graph, time per call")
    return save(fig, path)


def plot_tp(report: dict, path: str) -> Any:
    """Per TP size and control path: the head's control overhead per step (p50 bars, p90
    whiskers), output tokens/s, and the decode step with the share its all-reduces take."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    groups = report["groups"]
    names = [f"TP={g['tp']}\n{g['control']}" for g in groups]
    plans = list(dict.fromkeys(o["plan"] for g in groups for o in g["overhead"]))
    over = {(i, o["plan"]): o for i, g in enumerate(groups) for o in g["overhead"]}
    centres = bars(axes[0], names, {p: [over[(i, p)]["overhead_us_p50"] if (i, p) in over else None
                                        for i in range(len(groups))] for p in plans}, inside=True)
    for p, xs in centres.items():
        for i, x in enumerate(xs):
            if (i, p) in over:
                o = over[(i, p)]
                axes[0].errorbar(x, o["overhead_us_p50"], yerr=[[0], [o["overhead_us_p90"] - o["overhead_us_p50"]]],
                                 color="k", capsize=3, linewidth=0.8)
    axes[0].axhline(1000, color="k", linestyle=":", linewidth=1, label="1 ms")
    axes[0].legend(title="plan (whisker: p90)", fontsize=7, title_fontsize=7)
    axes[0].set_ylabel("control overhead per step, p50 (µs)")
    axes[0].set_title("head-to-workers overhead")
    bars(axes[1], names, {"output tokens/s": [g["throughput"]["output_tok_per_s"] for g in groups]})
    axes[1].set_ylabel("output tokens/s")
    axes[1].set_title("throughput")
    bars(axes[2], names, {"decode step p50": [g["throughput"]["decode_step_ms_p50"] for g in groups]}, fmt="{:.2f}")
    ar = [(g.get("all_reduce") or {}).get("ms_per_step") for g in groups]
    if any(ar):
        rects = axes[2].bar(range(len(groups)), [math.nan if a is None else a for a in ar], 0.8, fill=False,
                            hatch="//", edgecolor="k", linewidth=0, label="of which all-reduces")
        shares = [(g.get("all_reduce") or {}).get("share_of_decode_step") for g in groups]
        axes[2].bar_label(rects, label_type="center", fontsize=7, backgroundcolor="white",
                          labels=["" if a is None else f"{a:.2f} ms" + (f" ({sh:.0%})" if sh else "")
                                  for a, sh in zip(ar, shares)])
        axes[2].legend(fontsize=7)
    axes[2].set_ylabel("decode step, p50 (ms)")
    axes[2].set_title("decode step")
    cfg = report.get("config", {})
    fig.suptitle(f"tensor parallelism on {device_name(report)}: {cfg.get('num_requests', '?')} requests x "
                 f"({cfg.get('input_len', '?')} in, {cfg.get('output_len', '?')} out tokens)")
    return save(fig, path)
