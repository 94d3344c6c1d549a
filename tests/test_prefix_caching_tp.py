"""Prefix caching at TP=2 on CPU (gloo, two Ray actors): both shards map the same pages for the same
slots, and greedy tokens equal those with caching off, also under preemption."""

from __future__ import annotations

import random

import pytest
import ray

from vattn_ray import LLM, SamplingParams
from vattn_ray.model.builder import build_random_checkpoint
from workers.worker import Worker

ENGINE = dict(device="cpu", dtype="float32", page_bytes=4096, max_model_len=128, tensor_parallel_size=2)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


def test_tp2_shards_share_the_same_pages_and_tokens_match(tmp_path):
    path = build_random_checkpoint(str(tmp_path / "llama"), "llama", seed=12)
    system = _tokens(40, 1)
    prompts = [system + _tokens(20 + i, 10 + i) for i in range(5)] + [system[:32]]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    results = {}
    for caching in (True, False):
        group_bytes = 2 * ENGINE["page_bytes"]  # one K and one V tensor of all layers (G = "auto")
        # A pool of 4 page groups (32 tokens each here), 3 per request: preemption while prefixes are shared.
        with LLM(model=path, enable_prefix_caching=caching, max_num_batched_tokens=24,
                 kv_cache_memory_bytes=4 * group_bytes, **ENGINE) as llm:
            assert llm.engine.layout.page_group_bytes == group_bytes
            outs = llm.generate(prompts, params)
            # Scheduler ids against each rank: a group shared in the books is one page group there.
            llm.engine.check_integrity()
            stats = llm.engine.executor.run_on_workers(Worker.kv_stats, None)
            assert [(s.groups_mapped, s.groups_free, s.groups_mapped_total, s.groups_unmapped_total)
                    for s in stats].count((stats[0].groups_mapped, stats[0].groups_free,
                                           stats[0].groups_mapped_total, stats[0].groups_unmapped_total)) == 2
            results[caching] = [o.outputs[0].token_ids for o in outs], llm.engine.stats()
    (on, stats_on), (off, _) = results[True], results[False]
    assert on == off
    assert stats_on["prefix_cache_hits"] > 0 and stats_on["num_preemptions"] > 0
