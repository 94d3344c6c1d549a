"""The serving benchmark (`python -m vattn_ray.bench serving`) against the real app.

`serve run deploy/config.yaml` on a free port (the `served` fixture of test_serve_e2e: a fresh
local Ray cluster in its own session, checked for leftover processes at teardown), then the
benchmark's `main` at one low Poisson rate with short prompts and outputs.
"""

from __future__ import annotations

import json
import math
import random
import time

import httpx
import pytest
from test_serve_e2e import MODEL, _stop, served  # noqa: F401 - `served` is a fixture used here

from vattn_ray.bench import serving

INPUT_LEN, OUTPUT_LEN, RATE, DURATION = 32, 16, 4.0, 3.0


def _finite_positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_poisson_arrivals_are_seeded_and_have_the_rate():
    a = serving.poisson_arrivals(10.0, random.Random(7), num_requests=4000)
    assert a == serving.poisson_arrivals(10.0, random.Random(7), num_requests=4000)
    assert a != serving.poisson_arrivals(10.0, random.Random(8), num_requests=4000)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert 0.95 * 0.1 < a[-1] / len(a) < 1.05 * 0.1  # mean gap 1/rate (std of the mean ~1.6%)
    d = serving.poisson_arrivals(10.0, random.Random(7), duration_s=5.0)
    assert d == a[:len(d)] and d[-1] < 5.0 <= a[len(d)]


def test_benchmark_at_one_rate(served, tmp_path, capsys):  # noqa: F811
    base, _ = served
    out, png = tmp_path / "serving.json", tmp_path / "serving.png"
    t0 = time.monotonic()
    rc = serving.main(["--url", base, "--model", MODEL, "--model-path", "builtin:tiny-llama",
                       "--rates", str(RATE), "--duration", str(DURATION), "--input-len", str(INPUT_LEN),
                       "--output-len", str(OUTPUT_LEN), "--timeout", "60", "--out", str(out),
                       "--stats-interval", "0.05", "--plot", str(png)])
    elapsed = time.monotonic() - t0
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["warmup"]["usage_in_stream"] is True
    (r,) = report["results"]
    assert r["rate"] == RATE
    assert r["sent"] >= 3 and r["completed"] == r["sent"] and r["failed"] == 0, r["errors"]
    assert r["output_len_short"] == 0
    assert r["output_tokens"] == r["sent"] * OUTPUT_LEN and r["prompt_tokens"] == r["sent"] * INPUT_LEN
    for q in r["requests"]:
        assert q["error"] is None and q["finish_reason"] == "length"
        assert q["output_tokens"] == OUTPUT_LEN and q["prompt_tokens"] == INPUT_LEN
        assert 1 <= q["chunks"] <= OUTPUT_LEN
        assert 0 < q["ttft_s"] < q["e2e_s"]
        assert 0 <= q["arrival_s"] < DURATION and q["sent_s"] >= q["arrival_s"]
    arrivals = [q["arrival_s"] for q in r["requests"]]
    assert arrivals == sorted(arrivals)
    for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        s = r[metric]
        assert all(_finite_positive(s[k]) for k in ("mean", "p50", "p99")), (metric, s)
        assert s["p50"] <= s["p99"]
    assert r["e2e_ms"]["p50"] >= r["ttft_ms"]["p50"]
    # open loop: the arrivals span ~DURATION, and the rate's figures cover it
    assert arrivals[-1] < r["duration_s"] < elapsed
    assert r["request_throughput"] == pytest.approx(r["completed"] / r["duration_s"])
    assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
    assert r["peak_in_flight"] >= 1
    # The figure's data: every inter-token gap, and the server's KV books sampled during the rate.
    assert len(r["itl_s"]) == sum(q["chunks"] - 1 for q in r["requests"])
    timeline = r["kv_timeline"]
    assert len(timeline) >= DURATION / 0.05 / 4
    # The samples saw the requests: one running, or the KV books moving (a tiny model's requests
    # last a few tens of milliseconds on CPU, so a sample may fall between them all).
    books = {(s["num_groups_mapped"], s["num_groups_idle"]) for s in timeline}
    assert max(s["num_running"] for s in timeline) >= 1 or len(books) > 1, timeline
    assert max(s["num_groups_mapped"] for s in timeline) > 0
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| rate | sent | ok | failed |" in table
    assert f"| {RATE:g} | {r['sent']} | {r['sent']} | 0 |" in table


def test_requests_still_running_at_the_timeout_are_cancelled_and_counted(served, tmp_path):  # noqa: F811
    base, _ = served
    out = tmp_path / "serving.json"
    t0 = time.monotonic()
    # 480 tokens each (the whole context of the tiny model), but only 0.05 s after the last arrival.
    rc = serving.main(["--url", base, "--model", MODEL, "--vocab-size", "512", "--rates", "8",
                       "--duration", "1", "--input-len", "32", "--output-len", "480", "--timeout", "0.05",
                       "--out", str(out)])
    assert rc == 0
    assert time.monotonic() - t0 < 30
    (r,) = json.loads(out.read_text())["results"]
    assert r["failed"] >= 1 and r["completed"] + r["failed"] == r["sent"]
    failed = [q for q in r["requests"] if q["error"] is not None]
    assert len(failed) == r["failed"]
    assert all("cancelled" in q["error"] for q in failed), r["errors"]
    # The cancelled streams were closed, so the server aborts them: nothing is left running.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = httpx.get(f"{base}/stats", timeout=10).json()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats


def test_a_failing_warmup_stops_the_benchmark(served, tmp_path, capsys):  # noqa: F811
    base, _ = served
    out = tmp_path / "serving.json"
    rc = serving.main(["--url", base, "--model", "no-such-model", "--vocab-size", "512", "--rates", "2",
                       "--duration", "1", "--out", str(out)])
    assert rc == 1
    assert "warm-up request failed: HTTP 404" in capsys.readouterr().err
    assert not out.exists()


def test_shutdown_is_clean(served):  # noqa: F811
    """Runs last: Ctrl-C ends `serve run` and its Ray cluster, leaving no process behind."""
    _, proc = served
    assert _stop(proc) == []
    assert proc.returncode is not None
