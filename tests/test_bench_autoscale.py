"""The autoscaling benchmark: its phase parsing and analysis on given samples, and (marked long,
~95 s) a real ramp against `serve run` of the CPU config with fast autoscaling: 1 -> 2 -> 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vattn_ray.bench import autoscale

ROOT = Path(__file__).resolve().parents[1]


def test_phases_parse_and_bad_ones_say_what_to_write():
    assert autoscale.parse_phases("low:2:30, high:24:120,idle:0:150") == [
        autoscale.Phase("low", 2.0, 30.0), autoscale.Phase("high", 24.0, 120.0), autoscale.Phase("idle", 0.0, 150.0)]
    for bad, msg in (("low:2", "name:rate:seconds"), ("low:-1:3", "rate >= 0"), ("low:1:0", "seconds > 0"),
                     ("a:1:1,a:2:2", "twice"), ("", "no phases")):
        with pytest.raises(ValueError, match=msg):
            autoscale.parse_phases(bad)
    with pytest.raises(SystemExit):
        autoscale.parse_args(["--url", "http://x", "--phases", "high:1"])


PHASES = [{"name": "low", "rate": 1, "start_s": 0.0, "end_s": 10.0},
          {"name": "high", "rate": 8, "start_s": 10.0, "end_s": 30.0},
          {"name": "idle", "rate": 0, "start_s": 30.0, "end_s": 60.0}]


def _samples() -> list[dict]:
    out = []
    for i in range(240):  # 4 polls a second for 60 s
        t = i / 4
        if t < 18 or t >= 40 or i % 2 == 0:  # replica b exists from 18 s to 40 s
            out.append({"t": t, "replica": "a", "num_running": 3 if t < 30 else 0, "num_steps": 100 + i})
        else:
            # b answers polls from 18 s but serves only from 19 s (its steps grow then)
            out.append({"t": t, "replica": "b", "num_running": 0 if t < 19 else (2 if t < 30 else 0),
                        "num_steps": 5 if t < 19 else 5 + i})
    return out


def test_analysis_of_a_ramp():
    requests = [{"phase": "high", "sent_s": 10.0, "chunk_s": [10.5 + 0.1 * k for k in range(100)], "end_s": 20.4},
                {"phase": "high", "sent_s": 20.0, "chunk_s": [20.5 + 0.05 * k for k in range(100)], "end_s": 25.45}]
    a = autoscale.analyze(PHASES, _samples(), requests, gone_window_s=10.0)
    assert a["replicas_seen"] == ["a", "b"] and a["ramp_phase"] == "high" and a["idle_phase"] == "idle"
    assert a["serving_since_s"]["a"] == 0.0 and a["serving_since_s"]["b"] == pytest.approx(19.25)
    assert a["time_to_second_replica_s"] == pytest.approx(9.25)
    before, after = a["throughput_before"], a["throughput_after"]
    assert (before["from_s"], before["to_s"], after["to_s"]) == (10.0, pytest.approx(19.25), 30.0)
    # chunks of the first request before 19.25 s: 10.5 .. 19.2 -> 88 of them
    assert before["output_tokens_per_s"] == pytest.approx(88 / 9.25)
    assert after["output_tokens_per_s"] == pytest.approx((12 + 100) / 10.75)
    assert after["completed_per_s"] == pytest.approx(2 / 10.75)
    assert a["scaled_down"] is True and a["extra_replica_last_seen_s"] == pytest.approx(39.75)
    assert a["scale_down_s"] == pytest.approx(9.75)
    # The second request's 100 chunks carried 300 tokens (merged by a busy server): 3 per chunk.
    requests[1]["output_tokens"] = 300
    merged = autoscale.analyze(PHASES, _samples(), requests, gone_window_s=10.0)["throughput_after"]
    assert merged["output_tokens_per_s"] == pytest.approx((12 + 300) / 10.75)


def test_scale_down_that_stops_the_first_replica_is_seen():
    """Serve may stop the replica that was there first; the survivor is whichever answers last."""
    swapped = [{**s, "replica": "b"} if s["t"] >= 40 else s for s in _samples()]  # a stops at 40 s
    a = autoscale.analyze(PHASES, swapped, [], gone_window_s=10.0)
    assert a["scaled_down"] is True and a["extra_replica_last_seen_s"] == pytest.approx(39.5)


def test_analysis_when_nothing_scales():
    samples = [s for s in _samples() if s["replica"] == "a"]
    a = autoscale.analyze(PHASES, samples, [], gone_window_s=10.0)
    assert a["replicas_seen"] == ["a"] and a["time_to_second_replica_s"] is None
    assert a["throughput_before"]["to_s"] == 30.0 and a["throughput_after"]["output_tokens_per_s"] is None
    assert a["scale_down_s"] is None
    # A second replica still answering at the end is not counted as gone.
    late = _samples() + [{"t": 59.5, "replica": "b", "num_running": 0, "num_steps": 999}]
    assert autoscale.analyze(PHASES, late, [], gone_window_s=10.0)["scaled_down"] is False


@pytest.mark.long
def test_ramp_on_cpu_scales_out_and_back(tmp_path):
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    config["applications"][0]["args"]["autoscaling_config"] = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "metrics_interval_s": 0.5,
        "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 4}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "autoscale.json"
    rc = autoscale.main(["--config", str(path), "--phases", "low:1:3,high:8:35,idle:0:45", "--input-len", "16",
                         "--output-len", "256", "--gone-window", "5", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    a = data["analysis"]
    assert data["stop"]["returncode"] is not None
    assert len(a["replicas_seen"]) == 2, a
    # The second replica must serve inside the high phase: starting one (a Ray actor, an engine) on a
    # busy 2-core machine can take more than 20 s, so the phase is 35 s long.
    assert 0 < a["time_to_second_replica_s"] < 35, a
    assert a["throughput_after"]["output_tokens_per_s"] > 0
    assert a["scaled_down"] is True and a["scale_down_s"] is not None
    # Scaling out and back in loses nothing: every request completed with all its tokens.
    assert data["requests"] and all(r["error"] is None and len(r["chunk_s"]) >= 1 for r in data["requests"])
