"""The TP benchmark runs end to end on CPU with minimal sizes (so it cannot rot)."""

from __future__ import annotations

import json

import ray

from vattn_ray.bench.__main__ import main as bench_main


def test_tp_bench_runs_on_cpu_and_writes_json(tmp_path, capsys):
    out = tmp_path / "tp.json"
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        argv = ["tp", "--device", "cpu", "--tp", "1,2", "--overhead-steps", "5", "--num-requests", "3",
                "--input-len", "8", "--output-len", "4", "--allreduce-iters", "1", "--out", str(out)]
        assert bench_main(argv) == 0
        assert ray.is_initialized()  # the bench leaves a cluster it did not start alone
    finally:
        ray.shutdown()
    table = capsys.readouterr().out
    assert "| TP | control path | plan |" in table and "| compiled graph | one token |" in table
    result = json.loads(out.read_text())
    groups = result["groups"]
    assert [(g["tp"], g["control"]) for g in groups] == [(1, "in-process"), (2, "compiled graph"),
                                                         (2, "actor calls")]
    for g in groups:
        assert [o["plan"] for o in g["overhead"]] == ["empty", "one token"]
        for o in g["overhead"]:
            # The workers' execute runs inside the head's round trip, so the difference is >= 0.
            assert o["round_trip_us_p50"] >= o["worker_us_p50"] > 0
            assert o["overhead_us_p50"] >= 0
        t = g["throughput"]
        assert t["requests"] == 3 and t["output_tok_per_s"] > 0
        assert t["decode_steps"] >= 3 and t["decode_batch_p50"] == 3  # 4 tokens: 1 prefill + 3 decode
        assert ("all_reduce" in g) == (g["tp"] > 1)
    ar = groups[1]["all_reduce"]
    assert ar["shape"] == [3, 64] and ar["per_step"] == 4 and ar["ms_per_step"] > 0
