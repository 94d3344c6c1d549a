"""The TP benchmark runs end to end on CPU with minimal sizes (so it cannot rot)."""

from __future__ import annotations

import json

import pytest
import ray

from vattn_ray.bench.__main__ import main as bench_main


def test_tp_bench_runs_on_cpu_and_writes_json(tmp_path, capsys):
    out = tmp_path / "tp.json"
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        argv = ["tp", "--device", "cpu", "--tp", "1,2", "--overhead-steps", "5", "--num-requests", "3",
                "--input-len", "8", "--output-len", "4", "--allreduce-iters", "1", "--allreduce-rows", "1,2",
                "--out", str(out)]
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
    for g in groups:
        assert g["system"] == "vattn" and g["tp"] in (1, 2) and g["workload"] == "fixed 3x8/4"
        assert g["output_tokens_per_s"] == g["throughput"]["output_tok_per_s"]
        assert ("all_reduce_sweep" in g) == (g["tp"] > 1)
    sweep = groups[1]["all_reduce_sweep"]
    assert sweep["per_step"] == 4 and [r["rows"] for r in sweep["rows"]] == [1, 2]
    for r in sweep["rows"]:
        assert r["shape"] == [r["rows"], 64] and r["dtype"] == "float32" and r["nccl_us"] > 0
    # The model's own all-reduce (gloo on CPU) is timed next to torch.distributed's, same results.
    assert sweep["project_all_reduce"] is True and all(r["project_us"] > 0 for r in sweep["rows"])
    ratios = result["decode_step_vs_tp1"]
    assert [(q["tp"], q["control"]) for q in ratios] == [(2, "compiled graph"), (2, "actor calls")]
    base = groups[0]["throughput"]["decode_step_ms_p50"]
    for q, g in zip(ratios, groups[1:]):
        assert q["decode_step_over_tp1"] == g["throughput"]["decode_step_ms_p50"] / base
    assert "| TP | control path | shape | NCCL |" in table and "| step / TP=1 |" in table


def test_all_reduce_sweep_compares_the_project_hook_with_torch(monkeypatch):
    """With the hook pointed at an all-reduce, the sweep times it and checks it against torch's."""
    import torch
    import torch.distributed as dist

    from vattn_ray.bench import tp

    class W:  # the attributes of a worker the sweep reads, in a one-rank gloo group
        dtype, device, rank = torch.float32, torch.device("cpu"), 0
        group = None

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        off_by = 0.5
        monkeypatch.setattr(tp, "project_all_reduce", lambda worker: (lambda x: x + off_by))
        rows = tp.sweep_all_reduce(W(), [1, 4], 8, per_step=2, iters=1)
    finally:
        dist.destroy_process_group()
    assert [r["rows"] for r in rows] == [1, 4]
    for r in rows:
        assert r["nccl_us"] > 0 and r["project_us"] > 0
        assert r["max_abs_diff_vs_nccl"] == pytest.approx(off_by, abs=1e-5)  # a wrong one shows
