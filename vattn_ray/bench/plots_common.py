"""Pieces every benchmark figure shares: matplotlib set up for files, grouped bars, CDFs and the
KV-pages-over-time panel (see `vattn_ray.bench.plots` for the figures themselves)."""

from __future__ import annotations

import math
import os
from typing import Any


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: benchmark machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str) -> Any:
    """Write `fig` to `path` (the format from its suffix), free it, and hand it back for checks."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return fig


def bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], fmt: str = "{:,.0f}",
         inside: bool = False) -> dict:
    """One bar per series in each group, each labelled with its value (`inside` the bar where
    whiskers are drawn over its top); None leaves a gap.

    Returns each series' bar centres, for whiskers or marks drawn over the bars.
    """
    n = max(len(series), 1)
    width = 0.8 / n
    centres = {}
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(groups))]
        rects = ax.bar(xs, [math.nan if v is None else v for v in values], width, label=name)
        ax.bar_label(rects, labels=["" if v is None else fmt.format(v) for v in values], fontsize=6, padding=1,
                     label_type="center" if inside else "edge")
        centres[name] = xs
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.margins(y=0.12)  # room for the value labels above the tallest bar
    if len(series) > 1:  # the legend goes in room left above the bars
        ax.set_ylim(top=1.25 * ax.get_ylim()[1])
        ax.legend(fontsize=7, loc="upper center", ncol=min(len(series), max(1, len(groups))))
    return centres


def cdf(ax: Any, values: list[float], label: str, quantiles: bool = False, **style: Any) -> None:
    """Empirical CDF of `values`; with `quantiles` the values are evenly spaced quantiles
    (levels 0, 1/n, ..., 1) rather than the samples themselves."""
    xs = sorted(values)
    if not xs:
        return
    n = len(xs)
    ys = [i / (n - 1) if n > 1 else 1.0 for i in range(n)] if quantiles else [(i + 1) / n for i in range(n)]
    ax.plot(xs, ys, label=label, **style)


def log_scale(ax: Any, axis: str = "x") -> None:
    """A log axis of latencies labelled with plain numbers (20, 50, 100 ms rather than 10^1.3)."""
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    class _PlainLog(LogFormatter):
        """LogFormatter's choice of which minor ticks to label, written as 0.2 rather than 2e-01."""

        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    getattr(ax, f"set_{axis}scale")("log")
    target = getattr(ax, f"{axis}axis")
    target.set_major_formatter(ScalarFormatter())
    target.set_minor_formatter(_PlainLog(minor_thresholds=(2, 0.5)))  # a few labelled minor ticks
    ax.tick_params(axis=axis, which="minor", labelsize=6)


def note_if_empty(ax: Any, what: str) -> None:
    """Older reports lack some samples: say so on the panel instead of drawing nothing."""
    if not ax.lines and not ax.patches:
        ax.text(0.5, 0.5, f"no {what} in this report", ha="center", va="center", transform=ax.transAxes)


def kv_timeline(ax: Any, timeline: list[dict], title: str) -> None:
    """Page groups mapped / free / idle (left axis) and running / waiting requests (right axis)."""
    ax.set_title(title)
    if not timeline:
        note_if_empty(ax, "KV samples")
        return
    t = [s["t"] for s in timeline]
    for key, label in (("num_groups_mapped", "mapped"), ("num_groups_free", "free"),
                       ("num_groups_idle", "idle (kept for reuse)")):
        ax.plot(t, [s.get(key) for s in timeline], label=label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV page groups")
    right = ax.twinx()
    right.plot(t, [s.get("num_running") for s in timeline], "k--", linewidth=0.8, label="running")
    right.plot(t, [s.get("num_waiting") for s in timeline], "k:", linewidth=0.8, label="waiting")
    right.set_ylabel("requests")
    lines, more = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left", bbox_to_anchor=(1.07, 1))


def device_name(report: dict) -> str:
    """The GPU (or "cpu") a report was measured on, whichever way its benchmark records it."""
    device = report.get("device") or report.get("device_name") or ""
    return device.get("name", "") if isinstance(device, dict) else str(device)
