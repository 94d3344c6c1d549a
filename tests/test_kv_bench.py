"""The KV benchmark runs end to end on CPU with minimal sizes (so it cannot rot)."""

from __future__ import annotations

import json

from vattn_ray.bench.__main__ import main as bench_main


def test_kv_bench_runs_on_cpu_and_writes_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    argv = ["kv", "--device", "cpu", "--num-layers", "2", "--kv-heads", "1", "--head-dim", "64",
            "--page-bytes", "8192", "--layers-per-tensor", "1,2", "--map-mib", "1", "--reps", "1",
            "--batch", "3", "--context", "8", "--steps", "40", "--step-ms", "0.2", "--out", str(out)]
    assert bench_main(argv) == 0
    table = capsys.readouterr().out
    assert "| G | mode | op |" in table and "prefetch / pre-mapped" in table
    result = json.loads(out.read_text())
    assert {r["op"] for r in result["throughput"]} == {"map+access", "unmap"}
    assert len(result["throughput"]) == 2 * 2 * 2  # G values x modes x ops
    for row in result["throughput"]:
        assert row["GB_per_s"] > 0 and row["page_groups"] >= 1
    assert [r["G"] for r in result["decode"]] == [1, 2]
    for row in result["decode"]:
        assert row["grows_per_step"] > 0  # the loop really maps pages on demand
        assert row["premapped_ms"] > 0 and row["prefetch_ratio"] > 0


def test_unknown_benchmark_is_a_clear_error(capsys):
    assert bench_main(["nope"]) == 2
    assert "no benchmark named 'nope'" in capsys.readouterr().err
