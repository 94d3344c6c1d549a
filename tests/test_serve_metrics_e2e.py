"""End to end, as a user serves: ``serve run deploy/config.yaml`` (a fresh local Ray cluster), traffic
through the official `openai` client, then the vLLM-named metrics read two ways, the app's
``GET /metrics`` and Ray's own metrics exporter, and checked against what the responses returned.
Also over real HTTP: ``response_format`` JSON schema output that validates, /tokenize, /detokenize.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict

import httpx
import jsonschema
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serve_run import serve_run
from test_serve_e2e import CONFIG, MODEL

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "n"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # A short temp root of our own: Ray's socket paths must stay short, and its session directory
    # tells where this cluster's metrics exporter listens.
    ray_tmp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")
    try:
        with serve_run(yaml.safe_load(CONFIG.read_text()), tmp_path_factory.mktemp("serve"),
                       {"RAY_TMPDIR": ray_tmp}) as (base, _):
            yield base, ray_tmp
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def traffic(served):
    """Send a mix of requests; what their responses say they used."""
    base, _ = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    seen = {"completion": 0, "prompt_per_seq": 0, "seqs": 0}

    def count(usage, n: int = 1) -> None:
        seen["completion"] += usage.completion_tokens
        seen["prompt_per_seq"] += usage.prompt_tokens * n  # each of n sequences is a request, as in vLLM
        seen["seqs"] += n

    for i in range(3):
        count(client.completions.create(model=MODEL, prompt=f"Request {i}: tell me", max_tokens=6 + i,
                                        temperature=0).usage)
    count(client.completions.create(model=MODEL, prompt="Twice", max_tokens=5, n=2, temperature=1.0, seed=1).usage, 2)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=7,
                                            stream=True, stream_options={"include_usage": True})
    count([c for c in stream][-1].usage)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Answer in JSON"}], max_tokens=300, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    count(chat.usage)
    seen["json"] = chat.choices[0]
    return seen


def test_json_schema_output_validates(traffic):
    choice = traffic["json"]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_tokenize_and_detokenize(served):
    base, _ = served
    tok = httpx.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "Hello world"}, timeout=30).json()
    assert tok["count"] == len(tok["tokens"]) > 1 and tok["max_model_len"] == 512
    back = httpx.post(f"{base}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}, timeout=30).json()
    assert back["prompt"] == "<|bos|>Hello world"  # the BOS /tokenize added comes back, as in vLLM


def _samples(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over the series of our model}."""
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model_name") == MODEL:
                out[s.name] += s.value
    return out


def test_metrics_route_matches_the_responses(served, traffic):
    base, _ = served
    m = _samples(httpx.get(f"{base}/metrics", timeout=30).text)
    assert m["vllm:generation_tokens_total"] == traffic["completion"]
    assert m["vllm:prompt_tokens_total"] == traffic["prompt_per_seq"]
    seqs = traffic["seqs"]
    assert m["vllm:request_success_total"] == seqs
    assert m["vllm:time_to_first_token_seconds_count"] == m["vllm:e2e_request_latency_seconds_count"] == seqs
    assert m["vllm:inter_token_latency_seconds_count"] == traffic["completion"] - seqs
    assert m["vllm:request_generation_tokens_sum"] == traffic["completion"]
    assert 0 < m["vllm:time_to_first_token_seconds_sum"] < m["vllm:e2e_request_latency_seconds_sum"]
    # Everything finished: nothing runs, no KV held by a request; pages stay mapped for reuse.
    assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0
    assert m["vattn:kv_page_groups_mapped"] == m["vattn:kv_page_groups_idle"] > 0
    assert m["vattn:kv_page_groups_mapped"] + m["vattn:kv_page_groups_free"] == m["vattn:kv_page_groups_capacity"]
    assert m["vattn:kv_page_group_maps_total"] - m["vattn:kv_page_group_unmaps_total"] == m["vattn:kv_page_groups_mapped"]
    assert m["vllm:num_preemptions_total"] == 0 and m["vllm:prefix_cache_hits_total"] == 0


def _ray_exporter_port(ray_tmp: str) -> int:
    (path,) = glob.glob(os.path.join(ray_tmp, "ray", "session_latest", "metrics_export_port_*"))
    with open(path) as f:
        return int(f.read().strip())


def test_rays_exporter_has_the_same_values(served, traffic):
    base, ray_tmp = served
    expected = _samples(httpx.get(f"{base}/metrics", timeout=30).text)
    url = f"http://127.0.0.1:{_ray_exporter_port(ray_tmp)}/metrics"
    want = {"ray_vllm_generation_tokens_total": expected["vllm:generation_tokens_total"],
            "ray_vllm_prompt_tokens_total": expected["vllm:prompt_tokens_total"],
            "ray_vllm_request_success_total": traffic["seqs"],
            "ray_vllm_time_to_first_token_seconds_count": traffic["seqs"],
            "ray_vllm_inter_token_latency_seconds_count": traffic["completion"] - traffic["seqs"],
            "ray_vllm_num_requests_running": 0,
            "ray_vattn_kv_page_group_maps_total": expected["vattn:kv_page_group_maps_total"]}
    deadline = time.monotonic() + 60  # Ray's agent exports every few seconds
    while True:
        got = _samples(httpx.get(url, timeout=30).text)
        if all(got.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert {k: got.get(k) for k in want} == want
    text = httpx.get(url, timeout=30).text
    assert 'ReplicaId="' in text and 'ReplicaId=""' not in text.split("ray_vllm_generation_tokens_total{")[1].split("}")[0]
