"""The throughput bench (`python -m vattn_ray.bench throughput`) end to end on CPU, its workloads,
its cost formulas and the vLLM peer's process protocol (on a machine without vLLM)."""

from __future__ import annotations

import importlib.util
import json
import random
import statistics

import pytest
import torch

from vattn_ray.bench import hf_baselines, vllm_peer
from vattn_ray.bench.__main__ import main as bench_main
from vattn_ray.bench.costs import ModelCosts
from vattn_ray.bench.throughput import make_record, ratios
from vattn_ray.bench.workloads import (MIXED_OUTPUT_MEDIAN, MIXED_OUTPUT_P99, MIXED_PROMPT_MEDIAN,
                                       MIXED_PROMPT_P99, Job, decode_latency_job, fixed_job, mixed_job,
                                       mixed_lengths, percentile)
from vattn_ray.config import resolve_model_path

REQUIRED = ("system", "tp", "workload", "kind", "output_tokens_per_s")
NO_VLLM = importlib.util.find_spec("vllm") is None


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model_path("builtin:tiny-llama")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny):
    """One bench run: vattn (profiled) and vllm on every workload."""
    assert NO_VLLM, "these tests describe a machine without vLLM (the CPU CI machine)"
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    argv = ["throughput", "--model", tiny, "--systems", "vattn,vllm", "--workloads", "fixed,mixed,prefill",
            "--num-requests", "4", "--input-len", "24", "--output-len", "30", "--mixed-requests", "6",
            "--mixed-max-len", "48", "--prefill-requests", "2", "--prefill-len", "96",
            "--decode-latency", "1,3", "--decode-context", "40", "--decode-steps", "40",
            "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--profile", "--profile-steps", "2",
            "--out", str(out)]
    assert bench_main(argv) == 0
    return json.loads(out.read_text()), out


def _records(report, system):
    return {r["workload"]: r for r in report["results"] if r["system"] == system}


def test_vattn_records_have_every_field(run):
    report, _ = run
    ours = _records(report, "vattn")
    assert set(ours) == {"fixed", "mixed", "prefill", "decode-b1-ctx40", "decode-b3-ctx40"}
    for r in report["results"]:
        assert all(k in r for k in REQUIRED), r
        assert r["tp"] == 1
    for name in ("fixed", "mixed", "prefill"):
        r = ours[name]
        assert r["kind"] == "throughput" and "error" not in r
        assert r["output_tokens"] == r["output_tokens_expected"] == report["jobs"][name]["output_tokens"]
        assert r["requests"] == report["jobs"][name]["requests"]
        assert r["seconds"] > 0 and r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["seconds"])
        assert r["total_tokens_per_s"] == pytest.approx((r["prompt_tokens"] + r["output_tokens"]) / r["seconds"])
    assert ours["fixed"]["decode_batch"] == 4 and ours["fixed"]["decode_step_ms_median"] > 0
    assert ours["prefill"]["prefill_flops"] > 0 and ours["prefill"]["prefill_tflops_per_s"] > 0
    for b in (1, 3):
        r = ours[f"decode-b{b}-ctx40"]
        short, long = r["lead_steps"] + 1, r["lead_steps"] + r["steps"] + 1
        assert (r["batch"], r["context"], r["steps"]) == (b, 40, 40)
        assert r["output_tokens_short"] == b * short and r["output_tokens_long"] == b * long
        assert r["decode_step_ms"] > 0 and r["output_tokens_per_s"] == pytest.approx(b / r["decode_step_ms"] * 1e3)
        assert r["decode_step_ms_observed"] > 0 and r["decode_steps_observed"] >= r["steps"]
    assert report["engine_start_s"]["vattn"] > 0


def test_report_records_versions_device_and_jobs(run):
    report, _ = run
    v = report["versions"]["vattn"]
    assert v["vattn_ray"] and v["torch"] == torch.__version__ and v["transformers"]
    git = v["git"]
    assert (git["commit"] and len(git["commit"]) == 40) or git.get("reason")
    assert report["device"]["type"] == "cpu" and report["hbm_copy_bytes_per_s"] is None
    assert report["jobs"]["fixed"]["requests"] == 4 and report["jobs"]["mixed"]["requests"] == 6
    assert report["config"]["max_model_len"] == max(40 + report["jobs"]["decode-b3-ctx40"]["lead_steps"] + 41, 96 + 1)
    assert set(report["methods"]) >= {"throughput", "decode_latency", "prefill"}


def test_vllm_is_reported_unavailable_not_faked(run):
    report, out = run
    peer = _records(report, "vllm")
    assert set(peer) == set(_records(report, "vattn"))
    for r in peer.values():
        assert r["output_tokens_per_s"] is None and "vllm is not importable" in r["unavailable"]
        assert "seconds" not in r and "decode_step_ms" not in r
        assert r["same_job_sha256"] is True  # the child read exactly the prompts and lengths we ran
    assert report["versions"]["vllm"]["available"] is False
    assert report["ratios"] == {}
    peer_file = json.loads(out.with_name("throughput.vllm-peer.json").read_text())
    assert peer_file["available"] is False and set(peer_file["received"]) == set(report["jobs"])


def test_hf_baseline_runs_uniform_workloads_only(tmp_path, tiny):
    out = tmp_path / "hf.json"
    argv = ["throughput", "--model", tiny, "--systems", "vattn,hf", "--workloads", "fixed", "--num-requests", "2",
            "--input-len", "8", "--output-len", "3", "--decode-latency", "1", "--decode-context", "8",
            "--decode-steps", "2", "--max-num-seqs", "4", "--out", str(out)]
    assert bench_main(argv) == 0
    hf = _records(json.loads(out.read_text()), "hf")
    assert hf["fixed"]["output_tokens"] == 2 * 3 and hf["fixed"]["ratio_vs_vattn"] > 0
    assert hf["fixed"]["label"].startswith("transformers generate")
    assert "throughput workloads only" in hf["decode-b1-ctx8"]["skipped"]
    assert hf_baselines.uniform(fixed_job(3, 5, 2, vocab=512)) is None
    assert "uniform" in hf_baselines.uniform(mixed_job(20, vocab=512, max_len=8192))


def test_profile_kernel_table_is_in_the_json(run):
    report, _ = run
    prof = _records(report, "vattn")["fixed"]["profile"]
    assert prof["steps"] == 2 and prof["batch"] == 4
    assert isinstance(prof["table"], str) and prof["kernels"]
    top = max(prof["kernels"], key=lambda k: k["self_cpu_time_total_us"])
    assert top["name"] in prof["table"] and top["count"] > 0


def test_mixed_lengths_match_their_stated_distribution():
    lens, outs = mixed_lengths(random.Random(0), 10_000, 8192)
    assert (lens, outs) == mixed_lengths(random.Random(0), 10_000, 8192)
    assert (lens, outs) != mixed_lengths(random.Random(1), 10_000, 8192)
    # Standard errors at 10k samples: ~1.3% for the medians, ~4% for the 99th percentiles.
    assert statistics.median(lens) == pytest.approx(MIXED_PROMPT_MEDIAN, rel=0.05)
    assert percentile(lens, 99) == pytest.approx(MIXED_PROMPT_P99, rel=0.12)
    assert statistics.median(outs) == pytest.approx(MIXED_OUTPUT_MEDIAN, rel=0.05)
    assert percentile(outs, 99) == pytest.approx(MIXED_OUTPUT_P99, rel=0.12)
    assert min(lens) >= 1 and min(outs) >= 1 and max(a + b for a, b in zip(lens, outs)) <= 8192


def test_mixed_job_is_seeded_and_clipped():
    a, b = mixed_job(50, vocab=512, max_len=256, seed=3), mixed_job(50, vocab=512, max_len=256, seed=3)
    assert a == b and a != mixed_job(50, vocab=512, max_len=256, seed=4)
    assert [len(p) for p in a.prompts] == mixed_lengths(random.Random(3), 50, 256)[0]
    assert a.max_len <= 256 and all(10 <= t < 502 for p in a.prompts for t in p)


def test_decode_latency_lead_in_covers_the_batch_prefill():
    job = decode_latency_job(64, 4096, 256, vocab=1000, chunk_tokens=8192)
    assert job.lead_steps == 32 + 16 and job.decode_max_tokens == (49, 305)
    assert job.max_len == 4096 + 305


def test_checkpoint_costs_match_transformers(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    costs = ModelCosts.from_checkpoint(tiny, "float32")
    assert costs.params == sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    assert costs.embedding_params == embed and costs.lm_head_params == model.lm_head.weight.numel()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    lens = [5, 7]
    pairs = 5 * 6 // 2 + 7 * 8 // 2
    expect = (2 * (costs.params - 2 * embed) * 12 + 2 * cfg.vocab_size * cfg.hidden_size * 2
              + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * pairs)
    assert costs.prefill_flops(lens) == expect
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    assert costs.decode_bytes(10) == (costs.params - embed) * 4 + 10 * kv


def test_records_and_ratios_use_one_formula_for_both_systems(tiny):
    costs = ModelCosts.from_checkpoint(tiny, "float32")
    fixed = fixed_job(2, 8, 4, vocab=512)
    dec = Job("decode-b2-ctx8", "decode_latency", fixed.prompts, [1, 1], steps=10, lead_steps=3)
    meas = {"vattn": ({"seconds": 2.0, "requests": 2, "prompt_tokens": 16, "output_tokens": 8},
                      {"seconds_short": 1.0, "seconds_long": 1.5}),
            "vllm": ({"seconds": 4.0, "requests": 2, "prompt_tokens": 16, "output_tokens": 8},
                     {"seconds_short": 1.0, "seconds_long": 2.0})}
    recs = [make_record(s, 1, job, m, costs, bw=1e12) for s, ms in meas.items() for job, m in zip((fixed, dec), ms)]
    assert recs[0]["output_tokens_per_s"] == 4.0 and recs[0]["total_tokens_per_s"] == 12.0
    assert recs[1]["decode_step_ms"] == pytest.approx(50.0) and recs[3]["decode_step_ms"] == pytest.approx(100.0)
    assert recs[1]["output_tokens_per_s"] == pytest.approx(2 / 0.05)
    assert recs[1]["roofline_step_ms"] == pytest.approx(costs.decode_bytes(2 * (8 + 3 + 5.5)) / 1e12 * 1e3)
    q = ratios(recs)
    assert q["fixed"]["vattn_over_vllm"] == pytest.approx(2.0)
    assert q["decode-b2-ctx8"]["vattn_over_vllm"] == pytest.approx(2.0)
    assert make_record("vllm", 1, fixed, {"error": "boom"}, costs, None)["output_tokens_per_s"] is None
    noisy = make_record("vattn", 1, dec, {"seconds_short": 1.0, "seconds_long": 0.9}, costs, None)
    assert noisy["output_tokens_per_s"] is None and "--decode-steps" in noisy["error"]


def test_peer_arguments_round_trip():
    engine = {"dtype": "bfloat16", "tensor_parallel_size": 2, "max_num_seqs": 256, "max_model_len": 8193,
              "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.85, "seed": 7}
    args = vllm_peer.parse_args(["--jobs", "j.json", "--out", "o.json", "--model", "/m",
                                 *vllm_peer.engine_argv(engine)])
    assert {k: getattr(args, k) for k in engine} == engine
    assert (args.jobs, args.out, args.model) == ("j.json", "o.json", "/m")
    with pytest.raises(SystemExit):
        vllm_peer.parse_args(["--jobs", "j.json", "--out", "o.json"])  # no checkpoint


def test_peer_process_without_vllm_reports_unavailable(tmp_path, tiny):
    assert NO_VLLM
    job = fixed_job(3, 5, 2, vocab=512)
    out = tmp_path / "peer.json"
    res = vllm_peer.launch([job.to_dict()], {"model": tiny, "max_num_seqs": 4}, str(out), timeout_s=120)
    assert res["available"] is False and "vllm" in res["reason"] and "error" not in res
    assert res["received"] == {"fixed": job.summary()["sha256"]}
    assert json.loads(out.read_text()) == res


def test_peer_env_is_sourced_in_the_child_and_failures_are_errors(tmp_path, tiny):
    job = fixed_job(1, 5, 2, vocab=512)
    env = tmp_path / "env.sh"
    env.write_text("exit 7\n")
    res = vllm_peer.launch([job.to_dict()], {"model": tiny}, str(tmp_path / "a.json"), peer_env=str(env))
    assert "status 7" in res["error"] and res.get("available") is not False
    res = vllm_peer.launch([job.to_dict()], {"model": tiny}, str(tmp_path / "b.json"),
                           peer_env=str(tmp_path / "missing.sh"))
    assert "does not exist" in res["error"]
