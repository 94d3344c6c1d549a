"""Elastic memory on CPU: paged weights lent to the KV cache, two replicas merged into a pipeline
over gloo and split again, the merge/split policy.

Both replicas run in this process (TP=1 each, host-VMM pages); the pipeline's hidden states and the
restored layers travel over a real two-member gloo group between them.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from torch import nn

from vattn_ray import LLM, SamplingParams
from vattn_ray.config import EngineArgs
from vattn_ray.elastic import (ElasticConfig, ElasticCoordinator, ElasticPair, ReplicaLoad,
                               start_coordinator)
from vattn_ray.elastic.pages import DevicePages, HeldPool
from vattn_ray.elastic.weights import PagedWeights
from vattn_ray.kvcache.host import HostVMM
from vattn_ray.model.builder import build_random_checkpoint

PAGE = 4096
MAX_TOKENS = 24
# 40 page groups of 8 tokens a replica: a dozen requests overflow it.
ENGINE = dict(device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256, max_num_seqs=8,
              kv_cache_memory_bytes=40 * 2 * PAGE)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_random_checkpoint(str(tmp_path_factory.mktemp("elastic") / "llama"), "llama", seed=11,
                                   num_hidden_layers=4)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(8, 60))] for _ in range(n)]


def _greedy_params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Greedy outputs of one ordinary engine (no pair, no paging of weights)."""
    prompts = _prompts(12, seed=5)
    with LLM(model=ckpt, **ENGINE) as llm:
        outs = llm.generate(prompts, _greedy_params())
    return prompts, [o.outputs[0].token_ids for o in outs]


def _run(pair: ElasticPair, prompts, at_step=None) -> dict[str, list[int]]:
    """Serve `prompts`; `at_step[n]` is called before step n (forced transitions)."""
    for i, p in enumerate(prompts):
        pair.add_request(f"r{i}", p, _greedy_params())
    done: dict[str, list[int]] = {}
    step = 0
    while pair.has_work():
        if at_step and step in at_step:
            at_step[step]()
        for req in pair.step():
            if req.finished:
                assert req.finish_reason == "length", (req.request_id, req.finish_reason)
                done[req.request_id] = list(req.token_ids)
        step += 1
        assert step < 2000, "the pair stopped making progress"
    return done


def _check(pair: ElasticPair, stage_layers) -> None:
    ranks = pair.check_integrity()
    assert [r["layers"] for r in ranks] == stage_layers
    for r in ranks:
        assert sum(n for h, n in r["pages"].items() if h.startswith("layer.")) > 0


def test_weights_on_pages_lend_to_kv_and_come_back():
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64)) for _ in range(4))
    x = torch.randn(3, 64)
    want = [layer(x) for layer in layers]
    originals = [[p.detach().clone() for p in layer.parameters()] for layer in layers]
    pages = DevicePages(HostVMM(page_bytes=PAGE))
    weights = PagedWeights(layers, pages)
    try:
        per_layer = weights.pages_per_layer[0]
        assert all(torch.equal(layer(x), w) for layer, w in zip(layers, want))  # same math on pages
        assert pages.num_free == 0
        freed = weights.drop([2, 3])
        assert freed == 2 * per_layer and pages.num_free == freed
        kv = HeldPool(pages, freed)  # the KV cache takes exactly the pages the layers gave up
        holders = {**weights.holders(), "kv": kv.ids()}
        pages.check_integrity(holders)
        weights.check_integrity()
        with pytest.raises(RuntimeError, match="needs"):
            weights.remap([2])  # the KV cache still holds every free page
        kv.close()
        assert weights.remap([2, 3]) == 2 * per_layer
        for layer, params in zip(list(layers)[2:], originals[2:]):  # refill, as a peer would
            for p, o in zip(layer.parameters(), params):
                p.data.copy_(o)
        weights.check_integrity()
        assert all(torch.equal(layer(x), w) for layer, w in zip(layers, want))
        next(layers[3].parameters()).data.view(-1)[0] += 1.0  # a changed byte is caught
        with pytest.raises(AssertionError, match="layer 3"):
            weights.check_integrity()
        pages.check_integrity(weights.holders())
    finally:
        weights.close()
        pages.close()


@pytest.mark.parametrize("where", ["in-process", "ray-workers"])
def test_merge_and_split_mid_run_keep_greedy_outputs(ckpt, reference, where):
    """`ray-workers`: each replica's worker is a Ray actor (its own process, as on the GPUs), the
    two start at once, and the pair's link runs between the two processes."""
    prompts, want = reference
    if where == "ray-workers":
        import ray

        ray.init(num_cpus=2, include_dashboard=False)
    try:
        _merge_and_split_mid_run(ckpt, prompts, want, ray_workers=where == "ray-workers")
    finally:
        if where == "ray-workers":
            ray.shutdown()


def _merge_and_split_mid_run(ckpt, prompts, want, ray_workers: bool) -> None:
    pair = ElasticPair(EngineArgs(model=ckpt, **ENGINE), ElasticConfig(enabled=False), ray_workers=ray_workers)
    events = {}

    def merge():
        events["merge"] = pair.merge("test")
        _check(pair, [(0, 2), (2, 4)])

    def split():
        events["split"] = pair.split("test")
        _check(pair, [(0, 4), (0, 4)])

    try:
        if ray_workers:
            pids = [pid for e in pair.replicas for pid in e.executor.pids]
            assert len(set(pids)) == 2 and os.getpid() not in pids
        _check(pair, [(0, 4), (0, 4)])
        done = _run(pair, prompts, {6: merge, 20: split, 30: merge})
        assert sorted(done) == sorted(f"r{i}" for i in range(len(prompts)))  # none lost
        assert [done[f"r{i}"] for i in range(len(prompts))] == want
        m, s = events["merge"], events["split"]
        assert m["requests_recomputed"] > 0 and s["requests_recomputed"] > 0
        # Merged, each stage holds half the layers' KV a token and the lent weight pages.
        assert m["tokens_per_group_after"] == 2 * m["tokens_per_group_before"]
        assert m["kv_groups_after"] > max(m["kv_groups_before"])
        assert m["pages_lent"][0] > 0 and s["pages_taken"] == m["pages_lent"]
        assert s["restore_bytes"] > 0 and s["restore_s"] >= 0
        assert pair.metrics()["merges"] == 2 and pair.metrics()["splits"] == 1
        _check(pair, [(0, 2), (2, 4)])
    finally:
        pair.shutdown()


def test_resumed_requests_yield_to_new_ones_at_a_merge(ckpt, reference):
    """At a merge, requests still waiting for their first token go to the head at once; those that
    already have tokens are recomputed after them, and every output is still the greedy one."""
    prompts, want = reference
    pair = ElasticPair(EngineArgs(model=ckpt, **{**ENGINE, "max_num_batched_tokens": 64}),
                       ElasticConfig(enabled=False))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    try:
        for i, p in enumerate(prompts[:6]):
            pair.add_request(f"r{i}", p, params)
        while not all(r.token_ids for r in pair.requests.values()):
            pair.step()
        for i, p in enumerate(prompts[6:], start=6):
            pair.add_request(f"r{i}", p, params)
        pair.merge("test")
        fresh = {r.request_id for r in pair.requests.values() if r.first_token_time is None}
        resumed = set(pair.requests) - fresh
        assert len(fresh) == 6 and len(resumed) == 6
        assert all((pair.requests[r].engine is pair.head) == (r in fresh) for r in pair.requests)
        progress_at: dict[str, int] = {}  # step at which each request first produced a token after the merge
        done, step = {}, 0
        while pair.has_work():
            for req in pair.step():
                progress_at.setdefault(req.request_id, step)
                if req.finished:
                    done[req.request_id] = req
            step += 1
        assert max(progress_at[r] for r in fresh) <= min(progress_at[r] for r in resumed)
        assert [done[f"r{i}"].token_ids for i in range(len(prompts))] == want
        for req in done.values():  # one log-probability entry per token, across the move
            assert len(req.logprobs) == MAX_TOKENS
            assert all(tok in entry for tok, entry in zip(req.token_ids, req.logprobs))
        pair.check_integrity()
    finally:
        pair.shutdown()


@pytest.mark.parametrize("where", ["in-process", "ray-actor"])
def test_burst_merges_then_splits_by_policy(ckpt, reference, where):
    prompts, want = reference
    cfg = ElasticConfig(merge_kv_usage=0.6, split_kv_usage=0.5, falling_checks=2, check_interval_s=0.0,
                        min_merged_s=0.0, min_split_s=0.0)
    coordinator = None
    if where == "ray-actor":
        import ray

        ray.init(num_cpus=1, include_dashboard=False)
        coordinator = start_coordinator(cfg, name="elastic-test")
    pair = ElasticPair(EngineArgs(model=ckpt, **ENGINE), cfg, coordinator=coordinator)
    try:
        done = _run(pair, prompts)
        assert [done[f"r{i}"] for i in range(len(prompts))] == want
        kinds = [e["event"] for e in pair.events]
        assert kinds[:2] == ["merge", "split"], kinds  # the burst merged the pair, its end split it
        assert "KV usage" in pair.events[0]["reason"]
        assert pair.coordinator.events() == pair.events
        pair.check_integrity()
    finally:
        pair.shutdown()
        if coordinator is not None:
            ray.shutdown()


def test_bench_smoke(ckpt, tmp_path):
    """The bursty-trace benchmark at tiny scale: both passes serve every request, the elastic one
    merges and splits, and the JSON has what the GPU run reports."""
    from vattn_ray.bench import elastic as bench

    out = tmp_path / "elastic.json"
    assert bench.main(["--model", ckpt, "--device", "cpu", "--dtype", "float32", "--page-bytes", str(PAGE),
                       "--max-model-len", "256", "--max-num-seqs", "16", "--max-num-batched-tokens", "512",
                       "--kv-cache-memory-bytes", str(40 * 2 * PAGE), "--rate", "3", "--bursts", "1",
                       "--burst-s", "2", "--duration-s", "4", "--drain-s", "60", "--input-len", "60",
                       "--output-len", "100", "--check-interval-s", "0.05", "--min-state-s", "0.2",
                       "--merge-usage", "0.6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["git_commit"] and result["device"]["type"] == "cpu"
    assert {"torch", "python", "git"} <= set(result["versions"])
    for side in ("with_elasticity", "without_elasticity"):
        r = result[side]
        assert r["sent"] == r["completed"] == result["requests_in_trace"] > 0
        assert r["burst_without_first_token"] == 0 and not r["trace_cut"]
        for key in ("ttft_p99_burst_ms", "ttft_p50_burst_ms", "output_tokens_per_s"):
            assert r[key] > 0, (side, key)
    assert result["without_elasticity"]["merges"] == 0
    w = result["with_elasticity"]
    assert w["merges"] >= 1 and w["splits"] >= 1 and len(w["restore_s"]) == w["splits"]
    assert w["kv_tokens_merged"][0] > w["kv_tokens_before_merge"][0]
    # The warm-up merged and split once too; every restore is in `restore`.
    assert [e["event"] for e in result["warm_up"]["events"]] == ["merge", "split"]
    assert len(result["restore"]["restore_s"]) == 1 + w["splits"]
    assert set(result["done_when"]) == {"ttft_p99_burst_ratio_le_0.2", "throughput_ratio_ge_0.95", "restore_lt_2s"}
    assert result["replica"]["kv_tokens"] == 320 and result["replica"]["ranks"][0]["kv_page_groups"] == 40
    assert {"build", "engine_start", "warm_up", "without_elasticity", "with_elasticity", "total"} <= set(
        result["timings_s"])


def test_requests_that_cannot_fit_a_replica_are_refused(ckpt):
    pair = ElasticPair(EngineArgs(model=ckpt, **ENGINE), ElasticConfig(enabled=False))
    try:
        pair.merge()
        with pytest.raises(ValueError, match="a replica holds"):
            pair.add_request("big", list(range(3, 200)), SamplingParams(max_tokens=250 - 197 + 200))
        with pytest.raises(ValueError, match="n=1"):
            pair.add_request("n2", [5, 6], SamplingParams(max_tokens=4, n=2))
    finally:
        pair.shutdown()


def _load(cap: int, used: int, waiting: int) -> ReplicaLoad:
    return ReplicaLoad(cap, used, waiting)


def test_policy_merges_only_when_both_replicas_are_full_and_work_waits():
    c = ElasticCoordinator(ElasticConfig(min_split_s=0.0, min_merged_s=0.0))
    assert c.observe([_load(100, 96, 10), _load(100, 97, 50)], merged=False, now=1.0).action == "merge"
    assert c.observe([_load(100, 96, 10), _load(100, 80, 50)], merged=False, now=1.0) is None  # B has room
    assert c.observe([_load(100, 96, 2), _load(100, 97, 50)], merged=False, now=1.0) is None  # A's queue fits
    off = ElasticCoordinator(ElasticConfig(enabled=False))
    assert off.observe([_load(100, 100, 99)] * 2, merged=False, now=1.0) is None


def test_policy_splits_when_usage_is_low_and_falling_and_holds_states():
    c = ElasticCoordinator(ElasticConfig(falling_checks=2, min_merged_s=10.0, min_split_s=10.0))
    c.record({"event": "merge", "monotonic": 0.0})
    assert c.observe([_load(200, 90, 0)], merged=True, now=1.0) is None
    assert c.observe([_load(200, 80, 0)], merged=True, now=2.0) is None
    assert c.observe([_load(200, 70, 0)], merged=True, now=3.0) is None  # falling, but held 10 s
    assert c.observe([_load(200, 60, 0)], merged=True, now=11.0).action == "split"
    c2 = ElasticCoordinator(ElasticConfig(falling_checks=2, min_merged_s=0.0))
    for now, used in ((1.0, 60), (2.0, 70), (3.0, 65)):  # low but rising: stay merged
        assert c2.observe([_load(200, used, 0)], merged=True, now=now) is None
    assert c2.observe([_load(200, 50, 3)], merged=True, now=4.0) is None  # work still waits
    idle = ElasticCoordinator(ElasticConfig(falling_checks=2, min_merged_s=0.0))
    decisions = [idle.observe([_load(200, 0, 0)], merged=True, now=t) for t in (1.0, 2.0, 3.0)]
    assert decisions[:2] == [None, None] and decisions[2].action == "split"  # an idle pair splits
    c.record({"event": "split", "monotonic": 11.0})
    assert c.observe([_load(100, 100, 99)] * 2, merged=False, now=15.0) is None  # held after split
    assert c.observe([_load(100, 100, 99)] * 2, merged=False, now=22.0).action == "merge"
    with pytest.raises(ValueError):
        ElasticConfig(merge_kv_usage=0.4, split_kv_usage=0.5)
