"""`--plot` of the throughput and kv benchmarks on real (small) CPU runs; redrawing a figure from
a report's JSON with `python -m vattn_ray.bench plots`; and every report kind (serving, serving
comparison, throughput, kv, attention, all-reduce, TP, prefix caching, elastic memory) drawn from
small synthetic reports of its
benchmark's JSON structure (a serving figure of a real run is drawn by tests/test_bench_serving.py,
which has a server running)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from vattn_ray.bench import serving_compare
from vattn_ray.bench.__main__ import main as bench_main
from vattn_ray.bench.plots import PLOTTERS, kind_of

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


# ---- every report kind, drawn from small synthetic reports of the benchmarks' JSON structure ----

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _timeline(seconds: float, n: int = 20) -> list[dict]:
    return [{"t": round(seconds * i / (n - 1), 4), "num_running": min(i, 8), "num_waiting": max(8 - i, 0),
             "num_groups_mapped": 10 * i, "num_groups_free": 400 - 10 * i, "num_groups_idle": 0,
             "kv_fragmentation": 0.1} for i in range(n)]


def _stats(values: list[float]) -> dict:
    xs = sorted(values)
    return {"mean": sum(xs) / len(xs), "p50": xs[len(xs) // 2], "p99": xs[-1]}


def _serving(system: str, rates=(2.0, 8.0), per_request=True, timeline=True, slow=1.0, seed=0) -> dict:
    rng = random.Random(seed)
    results = []
    for rate in rates:
        ttft = [slow * rng.uniform(0.02, 0.05) * rate for _ in range(20)]
        itl = [slow * rng.uniform(0.005, 0.01) for _ in range(200)]
        r = {"rate": rate, "sent": 20, "completed": 20, "failed": 0, "offered_rate": rate * 0.9,
             "request_throughput": rate * 0.95, "output_tokens_per_s": rate * 120.0, "load_sha256": f"{seed}-{rate}",
             "ttft_ms": _stats([1e3 * x for x in ttft]), "itl_ms": _stats([1e3 * x for x in itl]),
             "tpot_ms": _stats([1e3 * x for x in itl]), "e2e_ms": _stats([1e3 * x + 800 for x in ttft])}
        if per_request:
            r["requests"] = [{"arrival_s": i / rate, "ttft_s": t, "e2e_s": t + 0.8} for i, t in enumerate(ttft)]
            r["itl_s"] = itl
        if timeline:
            r["kv_timeline"] = _timeline(20 / rate)
        results.append(r)
    return {"config": {"url": "http://127.0.0.1:8000", "model": "m", "system": system, "input_len": 512,
                       "output_len": 128}, "results": results}


def _throughput() -> dict:
    fixed = {"system": "vattn", "tp": 1, "workload": "fixed", "kind": "throughput", "seconds": 10.0,
             "output_tokens_per_s": 6000.0, "decode_batch": 256, "decode_step_ms_median": 16.9,
             "decode_step_ms_p10": 16.0, "decode_step_ms_p90": 17.8, "roofline_step_ms": 12.7,
             # samples after the run's end: later jobs of the same engine, not this run's
             "kv_timeline": _timeline(10.0) + [{**_timeline(10.0)[5], "t": 14.0}],
             "profile": {"steps": 3, "batch": 256, "kernels": [
                 {"name": f"kernel_{i}", "device_type": "CUDA", "self_device_time_total_us": 3000.0 / (i + 1)}
                 for i in range(12)] + [{"name": "aten::argmax", "device_type": "CPU",
                                         "self_device_time_total_us": 9e9}]}}
    decode = [{"system": s, "tp": 1, "workload": "decode-b8-ctx4096", "kind": "decode_latency", "batch": 8,
               "context": 4096, "output_tokens_per_s": 1300.0, "decode_step_ms": ms, "roofline_step_ms": 4.5}
              for s, ms in (("vllm", 6.0), ("vattn", 5.8))]
    prefill = [{"system": s, "tp": 1, "workload": "prefill", "kind": "throughput", "output_tokens_per_s": 4.5,
                "prefill_tflops_per_s": t} for s, t in (("vllm", 606.0), ("vattn", 582.0))]
    vllm_fixed = {"system": "vllm", "tp": 1, "workload": "fixed", "kind": "throughput", "output_tokens_per_s": 5900.0}
    return {"config": {"num_requests": 256, "input_len": 1024, "output_len": 256, "tp": 1},
            "device": {"name": "NVIDIA H200"}, "results": [vllm_fixed, *prefill, *decode, fixed]}


def _kv() -> dict:
    return {"device_name": "NVIDIA H200",
            "throughput": [{"G": g, "mode": "bulk", "op": op, "GB_per_s": 80.0 + g} for g in (1, 32)
                           for op in ("map+access", "unmap")],
            "decode": [{"G": g, "premapped_ms": 4.7, "on_demand_ms": 4.8, "prefetch_ms": 4.7} for g in (1, 32)]}


def _attention(decode=True) -> dict:
    rows = [{"batch": b, "context": 1024, "G": 32, "fa2_TBps": 2.0, "fa2_packed_TBps": 2.1, "triton_TBps": 4.0}
            for b in (32, 256)]
    prefill = [{"batch": 1, "query": 8192, "context": 0, "fa2_TFLOPs": 320.0, "triton_TFLOPs": 473.0}]
    return {"device": {"name": "NVIDIA H200"}, "copy_TBps": 4.27, "rows": rows if decode else [],
            "prefill_rows": prefill, "shape": {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}}


def _allreduce() -> dict:
    sizes = []
    for rows in (1, 256, 4096):
        methods = {"nccl": {"us_per_call": 17.0 + rows / 30}}
        if rows < 4096:
            methods |= {"one_shot": {"us_per_call": 7.5 + rows / 20}, "two_shot": {"us_per_call": 8.7 + rows / 40}}
        chosen = "nccl" if rows == 4096 else min(("one_shot", "two_shot"), key=lambda m: methods[m]["us_per_call"])
        sizes.append({"rows": rows, "bytes": rows * 8192, "chosen": chosen, "methods": methods})
    return {"benchmark": "allreduce", "config": {"hidden": 4096, "dtype": "bfloat16", "calls": 64}, "tp": 2,
            "device": {"name": "NVIDIA H200"}, "symmetric_memory": True, "sizes": sizes}


def _tp() -> dict:
    def group(tp, control, us, step, ar=None):
        g = {"tp": tp, "control": control,
             "overhead": [{"plan": p, "overhead_us_p50": us * k, "overhead_us_p90": us * k * 1.3}
                          for p, k in (("empty", 1), ("one token", 1.5))],
             "throughput": {"output_tok_per_s": 4000.0 * tp ** 0.5, "decode_step_ms_p50": step}}
        if ar:
            g["all_reduce"] = {"ms_per_step": ar, "share_of_decode_step": ar / step}
        return g

    return {"device_name": "NVIDIA H200", "config": {"num_requests": 128, "input_len": 512, "output_len": 128},
            "groups": [group(1, "in-process", 0.3, 13.2), group(2, "compiled graph", 250.0, 12.2, 1.7)]}


def _prefix(unavailable=False) -> dict:
    rng = random.Random(0)
    results = []
    for w, n, scale in (("shared", 30, 5.0), ("multiturn", 16, 0.3)):
        for system, slow in (("vattn", 1.0), ("vattn-nocache", 4.0), ("vllm", 1.1)):
            rec = {"system": system, "tp": 1, "workload": w, "kind": "schedule"}
            if unavailable and system == "vllm":
                results.append({**rec, "output_tokens_per_s": None, "unavailable": "vllm is not importable"})
                continue
            sent = [i * 0.01 for i in range(n)]
            first = [s + slow * scale * rng.uniform(0.1, 1.0) for s in sent]
            done = [f + 2.0 for f in first]
            ttft = sorted(1e3 * (f - s) for s, f in zip(sent, first))
            results.append({**rec, "requests": n, "seconds": max(done), "output_tokens_per_s": 128 * n / max(done),
                            "ttft_p50_ms": ttft[n // 2], "ttft_p99_ms": ttft[-1],
                            "per_request": {"sent_at": sent, "first_token_at": first, "finished_at": done,
                                            "output_tokens": [128] * n, "cached_tokens": [0] * n}})
    return {"config": {"dtype": "bfloat16", "tp": 1}, "device": {"name": "NVIDIA H200", "count": 1},
            "jobs": {"shared": {"requests": 30}, "multiturn": {"requests": 16}}, "results": results}


def _elastic() -> dict:
    def run(ttft_ms, missing, tput, events):
        return {"sent": 340, "completed": 340 - 2 * missing, "burst_requests": 265, "ttft_p50_burst_ms": ttft_ms,
                "ttft_p99_burst_ms": 4 * ttft_ms, "burst_without_first_token": missing, "seconds": 99.9,
                "output_tokens_per_s": tput, "preemptions": 2 * missing, "events": events}

    merge = {"event": "merge", "reason": "KV usage 97%", "duration_s": 1.2, "requests_recomputed": 53, "t_s": 11.5}
    split = {"event": "split", "reason": "KV usage 40%", "duration_s": 3.6, "restore_s": 0.31, "t_s": 70.0}
    return {"benchmark": "elastic", "device": {"name": "NVIDIA H200", "count": 2},
            "argv": {"rate": 2.0, "burst_factor": 5.0, "bursts": [5.0], "burst_s": 25.0, "duration_s": 60.0},
            "without_elasticity": run(43000.0, 68, 1000.0, []),
            "with_elasticity": run(580.0, 0, 1650.0, [merge, split]),
            "restore": {"restore_s_max": 0.31}}


def _axes_of(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


CASES = {  # name: (report, its kind, axes in the figure with the twin axes)
    "serving": (_serving("vattn"), "serving", 6),
    "serving_percentiles": (_serving("vattn", per_request=False, timeline=False), "serving", 4),
    "throughput": (_throughput(), "throughput", 6),
    "kv": (_kv(), "kv", 2),
    "attention": (_attention(), "attention", 2),
    "attention_prefill_only": (_attention(decode=False), "attention", 1),
    "allreduce": (_allreduce(), "allreduce", 2),
    "tp": (_tp(), "tp", 3),
    "prefix": (_prefix(), "prefix", 3),
    "prefix_peer_unavailable": (_prefix(unavailable=True), "prefix", 3),
    "elastic": (_elastic(), "elastic", 3),
}


@pytest.mark.parametrize("name", CASES)
def test_every_report_kind_is_recognised_and_drawn(tmp_path, name):
    report, kind, n_axes = CASES[name]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    png = tmp_path / f"{name}.png"
    assert bench_main(["plots", str(path), "--out", str(png)]) == 0
    assert _is_png(png)
    assert kind_of(report) == kind
    fig = PLOTTERS[kind](report, str(tmp_path / "again.png"))
    assert len(fig.axes) == n_axes
    for ax in fig.axes:
        assert "no " not in " ".join(t.get_text() for t in ax.texts)  # no panel stands empty


def test_serving_figure_says_how_it_draws_latencies(tmp_path):
    cdfs = _axes_of(PLOTTERS["serving"](_serving("vattn"), str(tmp_path / "a.png")))
    ttft = cdfs["time to first token CDF"]
    assert len(ttft.lines) == 2 and ttft.get_xscale() == "log"  # one CDF per rate
    ys = ttft.lines[0].get_ydata()
    assert len(ys) == 20 and ys[-1] == 1.0 and list(ys) == sorted(ys)
    assert "server KV memory over the run (rates one after the other)" in cdfs
    report = _serving("vattn", per_request=False, timeline=False)
    fig = PLOTTERS["serving"](report, str(tmp_path / "b.png"))
    assert "no per-request samples" in fig.get_suptitle()
    itl = _axes_of(fig)["inter-token latency: p50 and p99"]
    assert [line.get_label() for line in itl.lines] == ["p50", "p99"]
    assert list(itl.lines[1].get_ydata()) == [r["itl_ms"]["p99"] for r in report["results"]]


def test_serving_comparison_draws_both_systems_cdfs_from_kept_quantiles(tmp_path):
    cmp = serving_compare.combine([_serving("vattn"), _serving("vllm", slow=3.0)])
    entry = cmp["systems"]["vllm"]["rates"][0]
    itl = sorted(1e3 * x for x in _serving("vllm", slow=3.0)["results"][0]["itl_s"])
    q = entry["itl_ms_quantiles"]
    assert len(q) == serving_compare.QUANTILES + 1 and q == sorted(q)
    assert q[0] == round(itl[0], 3) and q[-1] == round(itl[-1], 3)
    path, png = tmp_path / "serving_compare.json", tmp_path / "cmp.png"
    path.write_text(json.dumps(cmp))
    assert bench_main(["plots", str(path), "--out", str(png)]) == 0 and _is_png(png)
    fig = PLOTTERS["serving_comparison"](cmp, str(tmp_path / "again.png"))
    assert len(fig.axes) == 5
    panels = _axes_of(fig)
    assert len(panels["throughput vs request rate"].lines) == 2  # one line per system
    for title in ("time to first token CDF, every system at every rate",
                  "inter-token latency CDF, every system at every rate"):
        lines = panels[title].lines
        assert sorted(line.get_label() for line in lines) == ["vattn 2", "vattn 8", "vllm 2", "vllm 8"]
        assert {line.get_linestyle() for line in lines} == {"-", "--"}  # the system's line style
    slow = next(line for line in panels["inter-token latency CDF, every system at every rate"].lines
                if line.get_label() == "vllm 2")
    assert list(slow.get_xdata()) == q and slow.get_ydata()[-1] == 1.0


def test_throughput_figure_keeps_each_run_to_its_own_kv_samples(tmp_path):
    report = _throughput()
    panels = _axes_of(PLOTTERS["throughput"](report, str(tmp_path / "t.png")))
    kv = panels["vattn fixed: KV page groups over the run"]
    assert max(kv.lines[0].get_xdata()) == 10.0  # the sample at 14 s belongs to a later job
    step = panels["decode step time"]
    assert {t.get_text() for t in step.get_xticklabels()} == {
        "batch 8\n4096 ctx\n(decode-only)", "fixed run\nmedian step\n(batch 256)"}
    prof = panels["vattn fixed: profiled decode steps (batch 256)"]
    labels = [t.get_text() for t in prof.get_yticklabels()]
    assert labels[0] == "kernel_0" and labels[-1] == "4 other kernels"  # CPU rows left out
    assert math.isclose(prof.patches[0].get_width(), 1.0)  # 3000 µs over 3 steps


def test_prefix_figure_draws_every_measured_system_and_names_the_missing_ones(tmp_path):
    report = _prefix(unavailable=True)
    fig = PLOTTERS["prefix"](report, str(tmp_path / "p.png"))
    panels = _axes_of(fig)
    for w, n in (("shared", 30), ("multiturn", 16)):
        ttft = panels[f"{w}: time to first token CDF ({n} requests)"]
        assert ttft.get_xscale() == "log"
        assert [line.get_label().split(" (")[0] for line in ttft.lines] == ["vattn", "vattn-nocache"]
        mine = next(r for r in report["results"] if r["workload"] == w and r["system"] == "vattn")
        pr = mine["per_request"]
        assert sorted(ttft.lines[0].get_xdata()) == sorted(f - s for s, f in zip(pr["sent_at"], pr["first_token_at"]))
    tput = panels["throughput"]
    assert len(tput.patches) == 4  # two workloads x the two systems measured
    labels = {t.get_text() for t in tput.texts}
    assert f"{report['results'][0]['output_tokens_per_s']:,.0f}" in labels
    assert "not measured, left out: vllm shared (vllm is not importable)" in fig.get_suptitle()
    assert "left out" not in PLOTTERS["prefix"](_prefix(), str(tmp_path / "q.png")).get_suptitle()


def test_elastic_figure_marks_lower_bounds_and_the_pairs_state(tmp_path):
    panels = _axes_of(PLOTTERS["elastic"](_elastic(), str(tmp_path / "e.png")))
    ttft = panels["TTFT of the requests that arrived in the burst"]
    assert ttft.get_yscale() == "log"
    labels = [t.get_text() for t in ttft.texts]
    assert labels == ["≥ 43.00 s", "≥ 172.00 s", "0.58 s", "2.32 s"]  # only the pass with missing first tokens
    legend = [t.get_text() for t in ttft.get_legend().get_texts()]
    assert "lower bounds: 68 of 265 burst requests had no first token" in legend[0]
    tput = panels["throughput"]
    assert [p.get_height() for p in tput.patches] == [1000.0, 1650.0]
    time = panels["the pair's state during each pass"]
    merged = [c for c in time.collections if c.get_label() == "merged: one pipeline"]
    (box,) = merged[0].get_paths()
    xs = box.vertices[:, 0]
    assert math.isclose(xs.min(), 11.5) and math.isclose(xs.max(), 70.0 - 3.6)  # from merge's end to split's start
    notes = " ".join(t.get_text() for t in time.texts)
    assert "merge 1.20 s, 53 recomputed" in notes and "restore 0.31 s" in notes


def test_unknown_report_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a report of a benchmark with a figure"):
        kind_of({"prompts": 8, "token_agreement": 1.0})


def test_every_committed_figure_has_its_report_next_to_it_and_is_on_the_benchmarks_page():
    pngs = sorted(RESULTS.glob("*.png"))
    assert pngs
    for png in pngs:
        report = json.loads(png.with_suffix(".json").read_text())
        assert kind_of(report) in PLOTTERS
    page = (RESULTS.parent / "benchmarks.md").read_text()
    linked = set(re.findall(r"\]\(results/([\w.-]+\.png)\)", page))
    assert linked == {png.name for png in pngs}  # no figure unlinked, no link to a missing figure
    words = " ".join(page.split())  # captions wrap their commands
    for name in linked:  # the page names the command that drew each figure
        run = name.removesuffix(".png")
        assert f"python -m vattn_ray.bench plots docs/results/{run}.json --out docs/results/{run}.png" in words
