"""Prefix caching: pages really shared, greedy tokens unchanged, counts exact, usage and metrics.

The engines run the real scheduler, host-VMM KV cache (4 KiB pages: 16 tokens a page group for
these checkpoints) and model, in float32 on CPU; parity is against the same engine with caching
off and against transformers.
"""

from __future__ import annotations

import random

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from deploy.server import OpenAIServer, create_app
from vattn_ray import LLM, SamplingParams
from vattn_ray.async_engine import AsyncLLMEngine
from vattn_ray.config import EngineArgs
from vattn_ray.kvcache import HostVMM, KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.model.builder import build_random_checkpoint
from vattn_ray.scheduler import KVOp
from hf_reference import hf_greedy

PAGE = 4096
MAX_TOKENS = 12
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    return {fam: build_random_checkpoint(str(root / fam), fam, seed=11) for fam in FAMILIES}


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def _llm(path: str, caching: bool, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 256)
    return LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, enable_prefix_caching=caching,
               **kwargs)


def _greedy(llm: LLM, prompts, max_tokens: int = MAX_TOKENS, n: int = 1):
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, n=n))
    return outs


# ---- the host twin maps one physical page at two addresses -----------------------------------------
def test_two_slots_share_one_physical_page():
    layout = KVLayout.build(num_layers=2, layers_per_tensor=2, num_kv_heads=2, head_dim=16, itemsize=4,
                            page_bytes=PAGE, max_slots=3, max_model_len=64)
    t = layout.page_bytes // layout.token_bytes
    with KVManager(layout, HostVMM(page_bytes=PAGE), 6, torch.float32) as kv:
        assert kv.apply([KVOp(0, 2)]) == []
        k0, v0 = kv.layer_kv(1)
        k0[0, :2 * t] = torch.arange(2 * t, dtype=torch.float32)[:, None, None]
        assert kv.apply([KVOp(1, 1, share_from=0), KVOp(1, 2)]) == []
        assert kv.free_groups() == 6 - 3, "the shared group is one page group of the pool"
        assert kv.shares_pages(0, 1, 0) and not kv.shares_pages(0, 1, 1)
        assert torch.equal(k0[1, :t], k0[0, :t]), "slot 1 reads what slot 0 wrote"
        k0[1, 3] = -7.0  # one write through slot 1's address ...
        assert torch.all(k0[0, 3] == -7.0), "... is visible at slot 0's"
        kv.check_integrity({0: ("a", "b"), 1: ("a", "c")})
        with pytest.raises(AssertionError, match="keeps apart"):
            kv.check_integrity({0: ("a", "b"), 1: ("c", "d")})
        with pytest.raises(AssertionError, match="shares as id"):
            kv.check_integrity({0: ("a", "b"), 1: ("b", "c")})
        assert kv.apply([KVOp(1, 1, share_from=0)]) == [], "idempotent"
        kv.check_integrity({0: ("a", "b"), 1: ("a",)})
        assert kv.apply([KVOp(0, 0)]) == []  # the source goes: the page stays for slot 1
        assert kv.free_groups() == 6 - 1 and kv.is_shared(1, 0) is False
        assert k0[1, 3, 0, 0].item() == -7.0 and k0[1, 5, 0, 0].item() == 5.0
        failures = kv.apply([KVOp(2, 2, share_from=1)])  # slot 1 holds one group only
        assert len(failures) == 1 and "holds 1 page groups" in failures[0].reason
        kv.apply([KVOp(1, 0)])
        kv.check_integrity({})
        assert kv.free_groups() == 6


# ---- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical_with_and_without_caching(checkpoints, family):
    """A shared system prompt, the same prompt twice, a prompt that is another's prefix, one that is
    exactly page-group aligned; chunked prefill (24-token budget) splits the long ones."""
    path = checkpoints[family]
    system = _tokens(40, seed=1)
    prompts = [system + _tokens(9, 2), system + _tokens(21, 3), system + _tokens(9, 2), system[:32],
               system[:20] + _tokens(30, 4), _tokens(7, 5)]
    results = {}
    for caching in (True, False):
        with _llm(path, caching, max_num_batched_tokens=24, max_num_seqs=4) as llm:
            outs = _greedy(llm, prompts)
            llm.engine.check_integrity()
            results[caching] = ([o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs],
                                llm.engine.stats())
    (on, cached_on, stats_on), (off, cached_off, stats_off) = results[True], results[False]
    assert on == off == hf_greedy(path, prompts, MAX_TOKENS)
    assert stats_on["prefix_cache_hits"] > 0 and cached_off == [0] * len(prompts)
    assert stats_off["prefix_cache_hits"] == 0 and stats_off["prefix_cache_queries"] > 0
    assert all(c % 16 == 0 for c in cached_on)
    assert cached_on[2] == 48, "the repeated prompt (49 tokens) reuses its 3 full groups"
    assert cached_on[3] == 16, "a 32-token prompt recomputes its last group: it must sample"


def test_multi_turn_reuses_generated_tokens(checkpoints):
    """The second turn's prompt is the first turn's prompt + reply + new tokens: all full groups of
    the first conversation, generated tokens included, come from the cache."""
    path = checkpoints["llama"]
    turn1 = _tokens(30, 6)
    with _llm(path, True) as llm:
        reply = _greedy(llm, [turn1], max_tokens=20)[0].outputs[0].token_ids
        turn2 = turn1 + reply + _tokens(5, 7)
        out = _greedy(llm, [turn2])[0]
        llm.engine.check_integrity()
    # The first turn's KV holds 30 + 20 - 1 tokens: 3 full groups (48 tokens), two of them
    # generated tokens' groups in part.
    assert out.num_cached_tokens == 48
    with _llm(path, False) as llm:
        assert _greedy(llm, [turn2])[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_n_children_share_the_prompt(checkpoints):
    """n = 3 children: the first prefills the prompt; the other two map its pages."""
    path = checkpoints["qwen3"]
    prompt = _tokens(50, 8)
    computed = []
    with _llm(path, True, max_num_batched_tokens=256) as llm:
        llm.engine.step_observers.append(lambda rec: computed.append(rec.num_tokens))
        out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, n=3))[0]
        stats = llm.engine.stats()
        llm.engine.check_integrity()
    assert stats["prefix_cache_hits"] == 2 * 48 and stats["prefix_cache_queries"] == 3 * 50
    # 50 prompt tokens once, 2 x 2 uncached ones, and 3 decodes of each of the 3 children.
    assert sum(computed) == 50 + 2 * 2 + 3 * 3
    assert out.num_cached_tokens == 0 and len({tuple(o.token_ids) for o in out.outputs}) == 1


def test_preempting_a_request_whose_prefix_is_shared(checkpoints):
    """A pool that holds about two requests: six sharing a system prompt take turns, with
    preemption, cached groups evicted and the shared prefix kept while others map it."""
    path = checkpoints["mistral"]
    system = _tokens(48, 9)
    prompts = [system + _tokens(10 + i, 20 + i) for i in range(6)]
    results = {}
    for caching in (True, False):
        probe = _llm(path, caching, max_model_len=128)
        group_bytes = probe.engine.layout.page_group_bytes
        probe.shutdown()
        groups = 2 * (-(-(64 + 24) // 16)) + 1  # room for about two requests at full length
        with _llm(path, caching, max_model_len=128, kv_cache_memory_bytes=groups * group_bytes,
                  max_num_batched_tokens=512) as llm:
            toks = [o.outputs[0].token_ids for o in _greedy(llm, prompts, max_tokens=24)]
            llm.engine.check_integrity()
            results[caching] = toks, llm.engine.stats()
    (on, stats_on), (off, stats_off) = results[True], results[False]
    assert on == off
    assert stats_on["num_preemptions"] > 0 and stats_on["prefix_cache_hits"] > 0


# ---- usage and metrics --------------------------------------------------------------------------------
def test_usage_and_metrics_report_cached_tokens(checkpoints):
    args = EngineArgs(model=checkpoints["llama"], device="cpu", dtype="float32", page_bytes=PAGE,
                      max_model_len=256)
    engine = AsyncLLMEngine.from_engine_args(args)
    try:
        with TestClient(create_app(OpenAIServer(engine, "m")), raise_server_exceptions=False) as client:
            prompt = _tokens(40, 10)
            usages = []
            for _ in range(2):
                r = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 3,
                                                          "temperature": 0})
                assert r.status_code == 200, r.text
                usages.append(r.json()["usage"])
            assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
            assert usages[1]["prompt_tokens_details"] == {"cached_tokens": 32}
            assert usages[1]["prompt_tokens"] == 40
            text = client.get("/metrics").text
        samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples["vllm:prefix_cache_queries_total"] == 80
        assert samples["vllm:prefix_cache_hits_total"] == 32
    finally:
        engine.shutdown()
