"""GPU, 2 devices: elastic memory between two TP=1 replicas (Ray actors, one GPU each, NCCL pair link).

- float32, tiny shape: greedy outputs across a merge and a split in the middle of running requests
  equal those of the same pair never merged; page and weight integrity after every transition.
- bf16, a wider 8-layer shape: the agreement with the never-merged run is measured and stated
  (tokens before the first divergence / all tokens), and must be high.
- Restore: the bytes and seconds of copying the dropped layers back from the peer, with GB/s.
Results go to $VATTN_RESULTS_DIR/elastic_parity.json when that variable is set.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import ray
import torch

from vattn_ray import SamplingParams
from vattn_ray.config import EngineArgs
from vattn_ray.elastic import ElasticConfig, ElasticPair
from vattn_ray.model.builder import build_random_checkpoint
from vattn_ray.ray_executor import WORKER_ENV

MAX_TOKENS = 48


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    assert torch.cuda.device_count() >= 2, "elastic GPU tests need 2 GPUs (the 2xH200 machine)"
    ray.init(include_dashboard=False, runtime_env={"env_vars": WORKER_ENV})
    yield
    ray.shutdown()


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(16, 400))] for _ in range(n)]


def _serve(pair: ElasticPair, prompts, transitions: dict) -> list[list[int]]:
    for i, p in enumerate(prompts):
        pair.add_request(f"r{i}", p, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    done, step = {}, 0
    while pair.has_work():
        if step in transitions:
            transitions[step]()
            pair.check_integrity()
        for req in pair.step():
            if req.finished:
                assert req.finish_reason == "length"
                done[req.request_id] = list(req.token_ids)
        step += 1
    assert sorted(done) == sorted(f"r{i}" for i in range(len(prompts))), "a request was lost"
    return [done[f"r{i}"] for i in range(len(prompts))]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / sum(len(x) for x in a)


def _run(path: str, dtype: str, n: int, vocab: int) -> dict:
    args = EngineArgs(model=path, device="cuda", dtype=dtype, max_model_len=1024, max_num_seqs=32,
                      gpu_memory_utilization=0.5)
    pair = ElasticPair(args, ElasticConfig(enabled=False), ray_workers=True)
    try:
        prompts = _prompts(n, vocab, seed=1)
        plain = _serve(pair, prompts, {})
        events = []
        elastic = _serve(pair, prompts, {5: lambda: events.append(pair.merge("test")),
                                         25: lambda: events.append(pair.split("test")),
                                         40: lambda: events.append(pair.merge("test"))})
        pair.split("end")
        pair.check_integrity()
    finally:
        pair.shutdown()
    split = [e for e in events if e["event"] == "split"][0]
    merge = events[0]
    return {"dtype": dtype, "requests": n, "agreement": _agreement(plain, elastic),
            "identical_requests": sum(x == y for x, y in zip(plain, elastic)),
            "merge_s": merge["duration_s"], "split_s": split["duration_s"], "restore_s": split["restore_s"],
            "restore_bytes": split["restore_bytes"],
            "restore_gb_per_s": split["restore_bytes"] / max(split["restore_s"], 1e-9) / 1e9,
            "kv_tokens_before": sum(merge["kv_groups_before"]) * merge["tokens_per_group_before"],
            "kv_tokens_merged": merge["kv_groups_after"] * merge["tokens_per_group_after"]}


def _save(name: str, result: dict) -> None:
    print(json.dumps(result, indent=2))
    out = os.environ.get("VATTN_RESULTS_DIR")
    if out:
        path = os.path.join(out, "elastic_parity.json")
        data = json.load(open(path)) if os.path.isfile(path) else {}
        data[name] = result
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


def test_float32_greedy_identical_across_merge_and_split(tmp_path):
    path = build_random_checkpoint(str(tmp_path / "tiny"), "llama", seed=4, num_hidden_layers=4)
    result = _run(path, "float32", 24, 512)
    _save("float32_tiny", result)
    assert result["identical_requests"] == result["requests"], result
    assert result["kv_tokens_merged"] > result["kv_tokens_before"]


def test_bf16_agreement_and_restore_time(tmp_path):
    path = build_random_checkpoint(str(tmp_path / "wide"), "llama", seed=5, preset="llama-3-8b",
                                   dtype="bfloat16", num_hidden_layers=8, vocab_size=32000)
    result = _run(path, "bfloat16", 32, 32000)
    _save("bf16_8b_width_8_layers", result)
    # bf16 rounding differs with batch composition (recomputed prefills); near-ties may flip.
    assert result["agreement"] >= 0.9, result
    assert result["restore_gb_per_s"] > 20, result  # NVLink; a host round trip would be far slower
