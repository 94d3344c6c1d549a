"""`--plot` of the throughput and kv benchmarks on real (small) CPU runs, and redrawing a figure
from a report's JSON with `python -m vattn_ray.bench plots` (the serving figure is drawn by
tests/test_bench_serving.py, which has a server running)."""

from __future__ import annotations

import json

from vattn_ray.bench.__main__ import main as bench_main

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 10_000  # axes, lines and labels, not an empty canvas


def test_throughput_plot_shows_the_kv_pages_of_a_real_run(tmp_path):
    out, png = tmp_path / "throughput.json", tmp_path / "throughput.png"
    argv = ["throughput", "--device", "cpu", "--systems", "vattn", "--num-requests", "6", "--input-len", "40",
            "--output-len", "12", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
            "--stats-interval", "0", "--out", str(out), "--plot", str(png)]
    assert bench_main(argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    timeline = result["kv_timeline"]
    assert len(timeline) >= result["steps"] + 2  # before the run, after every step, after the run
    assert [s["t"] for s in timeline] == sorted(s["t"] for s in timeline)
    assert max(s["num_groups_mapped"] for s in timeline) > 0 and max(s["num_running"] for s in timeline) == 4
    assert any(s["num_running"] == 4 and s["num_waiting"] == 2 for s in timeline)  # six requests, four slots
    assert timeline[-1]["num_running"] == timeline[-1]["num_waiting"] == 0
    assert _is_png(png)
    again = tmp_path / "again.png"
    assert bench_main(["plots", str(out), "--out", str(again)]) == 0
    assert _is_png(again)


def test_kv_plot(tmp_path):
    out, png = tmp_path / "kv.json", tmp_path / "kv.png"
    argv = ["kv", "--device", "cpu", "--num-layers", "2", "--kv-heads", "1", "--head-dim", "64",
            "--page-bytes", "8192", "--layers-per-tensor", "1,2", "--map-mib", "1", "--reps", "1",
            "--batch", "3", "--context", "8", "--steps", "20", "--step-ms", "0.2", "--out", str(out),
            "--plot", str(png)]
    assert bench_main(argv) == 0
    assert _is_png(png)
    svg = tmp_path / "kv.svg"
    assert bench_main(["plots", str(out), "--out", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "decode step" in svg.read_text()
