"""`python -m vattn_ray.bench head`: the step loop's host work per step and the detokeniser per token,
on the built-in tiny model (CPU)."""

from __future__ import annotations

import json

from vattn_ray.bench import head


def test_head_benchmark_reports_the_step_loop_and_both_decoders(tmp_path):
    out = tmp_path / "head.json"
    assert head.main(["--batch", "4", "--rounds", "1", "--output-len", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["steps"] >= 6 and report["decode_stream_used"] is True
    assert 0 < report["process_ms_per_step"]["p50"] <= report["process_ms_per_step"]["p90"]
    assert report["detok_us_per_token"]["decode_stream"] > 0 and report["detok_us_per_token"]["window_decode"] > 0
    assert report["provenance"]["versions"]["git"]
