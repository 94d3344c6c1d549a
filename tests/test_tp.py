"""Tensor parallelism on Ray, on CPU (gloo): parity, lockstep KV, preemption, failures.

Every TP=2 engine here is a real `RayExecutor`: two Ray actors in a placement group driven through
a compiled graph, each with its own host-VMM KV cache. One Ray cluster serves the whole module;
each test starts and shuts down its own engine, so at most one group (2 CPUs) is alive at a time.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest
import ray
import torch

from vattn_ray import LLM, SamplingParams
from vattn_ray.async_engine import AsyncLLMEngine, EngineDeadError
from vattn_ray.config import EngineArgs
from vattn_ray.engine import LLMEngine, _agreed_layout
from vattn_ray.bench import pid_alive
from vattn_ray.executor import WorkerFailed
from vattn_ray.layout import KVLayout
from vattn_ray.model.builder import build_random_checkpoint
from workers.worker import Worker, WorkerInfo
from hf_reference import hf_greedy

PAGE = 4096  # small host pages: every prompt crosses page boundaries
MAX_TOKENS = 20
CLUSTER_CPUS = 4
ENGINE = dict(device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        "llama": build_random_checkpoint(str(root / "llama"), "llama", seed=7),  # 4 q / 2 kv heads
        "qwen3": build_random_checkpoint(str(root / "qwen3"), "qwen3", seed=8),  # q/k RMSNorm
        # One KV head for two ranks: each rank keeps a copy of it.
        "llama_kv1": build_random_checkpoint(str(root / "llama_kv1"), "llama", seed=9,
                                             num_key_value_heads=1),
        # 8 q / 4 kv heads: one KV head per rank at TP=4.
        "llama_kv4": build_random_checkpoint(str(root / "llama_kv4"), "llama", seed=11, hidden_size=128,
                                             num_attention_heads=8, num_key_value_heads=4),
        # 3 KV heads cannot be split over 2 ranks.
        "qwen2_kv3": build_random_checkpoint(str(root / "qwen2_kv3"), "qwen2", seed=10, hidden_size=96,
                                             num_attention_heads=6, num_key_value_heads=3),
    }


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return [o.outputs[0].token_ids for o in outs]


def _tp1_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    with LLM(model=path, **ENGINE) as llm:
        return _greedy(llm, prompts)


def _assert_shards_in_lockstep(llm: LLM) -> None:
    """Every shard's books match the scheduler, and all mapped and unmapped the same pages."""
    llm.engine.check_integrity()  # the scheduler's slot table against every rank's KV manager
    stats = llm.engine.executor.run_on_workers(Worker.kv_stats, None)
    assert len(stats) == llm.engine.config.parallel.tensor_parallel_size
    lockstep = [(s.groups_total, s.groups_mapped, s.groups_free, s.groups_mapped_total,
                 s.groups_unmapped_total) for s in stats]
    assert all(x == lockstep[0] for x in lockstep), f"shards diverged: {lockstep}"
    assert stats[0].groups_mapped_total > 0


def _wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _cluster_idle() -> bool:
    """Every CPU is free again: the group's placement group and actors are gone."""
    return ray.available_resources().get("CPU", 0) == CLUSTER_CPUS


# ---- parity ---------------------------------------------------------------------------------------
def test_llama_gqa_tp2_matches_tp1_and_transformers(ckpts):
    """4 query / 2 KV heads: each rank holds 2 query heads and 1 KV head; chunked prefill too."""
    path = ckpts["llama"]
    prompts = _prompts([5, 37, 70, 1, 129, 64], seed=0)
    with LLM(model=path, tensor_parallel_size=2, max_num_batched_tokens=64, **ENGINE) as llm:
        assert llm.engine.layout.num_kv_heads == 1  # the shard's layout: KV heads split
        ours = _greedy(llm, prompts)
        _assert_shards_in_lockstep(llm)
        assert llm.engine.stats()["num_steps"] > MAX_TOKENS  # 129 tokens in 64-token chunks
    assert ours == _tp1_greedy(path, prompts)
    assert ours == hf_greedy(path, prompts, MAX_TOKENS)


def test_llama_tp4_matches_tp1_and_transformers(ckpts):
    """Four ranks, one KV head each (the 70B shape's split at TP=8), with chunked prefill."""
    path = ckpts["llama_kv4"]
    prompts = _prompts([3, 41, 90, 17], seed=3)
    with LLM(model=path, tensor_parallel_size=4, max_num_batched_tokens=64, **ENGINE) as llm:
        assert llm.engine.layout.num_kv_heads == 1
        ours = _greedy(llm, prompts)
        _assert_shards_in_lockstep(llm)
    assert ours == _tp1_greedy(path, prompts)
    assert ours == hf_greedy(path, prompts, MAX_TOKENS)


def test_qwen3_tp2_under_forced_preemption_matches(ckpts):
    """A pool too small for all requests at once: both shards preempt together and still match."""
    path = ckpts["qwen3"]
    prompts = _prompts([60, 61, 62, 63, 64, 65], seed=2)
    # The shard's layout at TP=2 (1 KV head of 16 dims, both layers in one tensor, float32).
    # max_model_len 128: the engine refuses to start when one full-length request cannot fit.
    shard = KVLayout.build(num_layers=2, layers_per_tensor=2, num_kv_heads=1, head_dim=16, itemsize=4,
                           page_bytes=PAGE, max_slots=64, max_model_len=128)
    groups = int(2.5 * (65 + MAX_TOKENS) / shard.tokens_per_group) + 1  # ~2.5 requests at a time
    with LLM(model=path, tensor_parallel_size=2, kv_cache_memory_bytes=groups * shard.page_group_bytes,
             max_num_batched_tokens=512, **{**ENGINE, "max_model_len": 128}) as llm:
        assert llm.engine.layout == shard
        ours = _greedy(llm, prompts)
        _assert_shards_in_lockstep(llm)
        assert llm.engine.stats()["num_preemptions"] > 0
    assert ours == _tp1_greedy(path, prompts)
    assert ours == hf_greedy(path, prompts, MAX_TOKENS)


def test_fewer_kv_heads_than_ranks_replicates_the_kv_head(ckpts):
    """1 KV head, TP=2: both ranks keep (and page) a full copy of it."""
    path = ckpts["llama_kv1"]
    prompts = _prompts([9, 33, 100], seed=3)
    with LLM(model=path, tensor_parallel_size=2, **ENGINE) as llm:
        assert llm.engine.layout.num_kv_heads == 1
        ours = _greedy(llm, prompts)
        _assert_shards_in_lockstep(llm)
    assert ours == _tp1_greedy(path, prompts)
    assert ours == hf_greedy(path, prompts, MAX_TOKENS)


# ---- start-up ------------------------------------------------------------------------------------
def test_unsplittable_heads_fail_start_clearly_and_release_the_group(ckpts):
    with pytest.raises(WorkerFailed, match=r"num_key_value_heads=3 is not divisible by "
                                           r"tensor_parallel_size=2"):
        LLM(model=ckpts["qwen2_kv3"], tensor_parallel_size=2, **ENGINE)
    assert _wait_for(_cluster_idle), f"group not released: {ray.available_resources()}"


def _info(rank: int, layout: KVLayout, architecture: str = "LlamaForCausalLM") -> WorkerInfo:
    return WorkerInfo(rank, layout, capacity_groups=10, weight_bytes=1, kv_pool_bytes=1,
                      architecture=architecture, device_name="cpu")


def test_shards_that_disagree_on_layout_or_model_fail_start():
    def layout(kv_heads: int) -> KVLayout:
        return KVLayout.build(num_layers=2, layers_per_tensor=2, num_kv_heads=kv_heads, head_dim=16,
                              itemsize=4, page_bytes=PAGE, max_slots=8, max_model_len=64)

    assert _agreed_layout([_info(0, layout(1)), _info(1, layout(1))]) == layout(1)
    with pytest.raises(RuntimeError, match=r"shards disagree: .* rank 1 has"):
        _agreed_layout([_info(0, layout(1)), _info(1, layout(2))])
    with pytest.raises(RuntimeError, match=r"rank 1 has Qwen3ForCausalLM"):
        _agreed_layout([_info(0, layout(1)), _info(1, layout(1), "Qwen3ForCausalLM")])


# ---- failures ------------------------------------------------------------------------------------
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


# Run inside the rank's process through `run_on_workers` (pickled by value: tests/ is not on the
# workers' path). They wrap the worker's own methods; the engine under test is unchanged.
def _count_batches(worker) -> None:
    """Count the batches this rank runs."""
    worker.batches_run, run_batch = 0, worker._run_batch

    def counted(plan):
        worker.batches_run += 1
        return run_batch(plan)

    worker._run_batch = counted


def _refuse_grows(worker, n: int) -> None:
    """Refuse this rank's next `n` page-group grows, as an exhausted pool would."""
    from vattn_ray.scheduler.plan import KVFailure

    grow, left = worker.kv._grow, [n]

    def refused(op, have):
        if left[0] > 0:
            left[0] -= 1
            return KVFailure(worker.rank, op.slot, op.num_groups, "refused by the test")
        return grow(op, have)

    worker.kv._grow = refused


def _batches_run(worker) -> int:
    return worker.batches_run


def _raise_after(worker, batches: int) -> None:
    """This rank raises in its forward after `batches` more batches (peers wait in a collective)."""
    left, run_batch = [batches], worker._run_batch

    def run(plan):
        left[0] -= 1
        if left[0] < 0:
            raise RuntimeError("injected fault in the forward")
        return run_batch(plan)

    worker._run_batch = run


@pytest.fixture()
def by_value():
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_kv_failure_on_one_shard_makes_every_shard_skip_the_step(ckpts, by_value):
    """Rank 1 cannot map pages for a few steps: both ranks skip those steps together (neither
    waits in a collective for the other), the head re-plans, and the tokens do not change."""
    path = ckpts["llama"]
    prompts = _prompts([40, 50, 60], seed=6)
    with LLM(model=path, tensor_parallel_size=2, enable_prefetch=False, **ENGINE) as llm:
        ex = llm.engine.executor
        ex.run_on_workers(_count_batches)
        ex.run_on_workers(_inject_on_rank, 1, _refuse_grows, 3)
        ours = _greedy(llm, prompts)
        batches = ex.run_on_workers(_batches_run)
        stats = llm.engine.stats()
        llm.engine.check_integrity()  # every shard's page tables equal the scheduler's books
        # (Cumulative map/unmap counts differ: rank 0 mapped what rank 1 refused, then undid it.)
        now = [(s.groups_mapped, s.groups_free) for s in ex.run_on_workers(Worker.kv_stats, None)]
        assert now[0] == now[1], f"shards diverged: {now}"
    assert stats["num_kv_failures"] >= 3, stats
    assert batches[0] == batches[1], f"the shards ran different steps: {batches}"
    assert ours == _tp1_greedy(path, prompts)


def _inject_on_rank(worker, rank: int, fn, *args) -> None:
    if worker.rank == rank:
        fn(worker, *args)


def test_a_rank_that_raises_mid_step_is_named_promptly(ckpts, by_value):
    llm = LLM(model=ckpts["llama"], tensor_parallel_size=2, **ENGINE)
    pids = list(llm.engine.executor.pids)
    try:
        llm.engine.executor.run_on_workers(_inject_on_rank, 1, _raise_after, 4)
        t0 = time.monotonic()
        with pytest.raises(WorkerFailed, match=rf"rank 1 \(pid {pids[1]}\) raised: .*injected fault"):
            llm.generate(_prompts([30, 30], seed=7), LONG)
        assert time.monotonic() - t0 < 30
        with pytest.raises(WorkerFailed, match="unusable"):
            llm.generate(_prompts([5], seed=5), LONG)
    finally:
        llm.shutdown()
    assert _wait_for(_cluster_idle), f"group not released: {ray.available_resources()}"


def test_rank1_killed_mid_generate_raises_worker_failed_promptly(ckpts):
    llm = LLM(model=ckpts["llama"], tensor_parallel_size=2, **ENGINE)
    pids = list(llm.engine.executor.pids)
    killed_at: list[float] = []

    def kill_once_running() -> None:
        _wait_for(lambda: llm.engine.num_steps >= 5, timeout=60)
        killed_at.append(time.monotonic())
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Thread(target=kill_once_running)
    try:
        killer.start()
        with pytest.raises(WorkerFailed, match=rf"rank 1 \(pid {pids[1]}\) died"):
            llm.generate(_prompts([30, 30, 30, 30], seed=4), LONG)
        elapsed = time.monotonic() - killed_at[0]
        killer.join()
        assert llm.engine.num_steps < 150, "generate finished before the kill landed"
        assert elapsed < 30, f"WorkerFailed came {elapsed:.1f} s after the kill"
        # The group stays failed: the next call says so at once instead of planning on dead shards.
        t0 = time.monotonic()
        with pytest.raises(WorkerFailed, match="unusable"):
            llm.generate(_prompts([5], seed=5), LONG)
        assert time.monotonic() - t0 < 5
    finally:
        killer.join()
        llm.shutdown()
    assert _wait_for(lambda: not pid_alive(pids[0])), "rank 0 outlived shutdown"
    assert _wait_for(_cluster_idle), f"group not released: {ray.available_resources()}"


def test_rank1_killed_under_async_engine_fails_streams_and_health(ckpts):
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(
        EngineArgs(model=ckpts["llama_kv1"], tensor_parallel_size=2, **ENGINE)))
    pids = list(engine.engine.executor.pids)

    async def run() -> tuple[list, float]:
        streaming = asyncio.Event()

        async def stream(i: int) -> int:
            n = 0
            async for _ in engine.generate(_prompts([30], seed=10 + i)[0], LONG, f"req-{i}"):
                n += 1
                streaming.set()
            return n

        tasks = [asyncio.create_task(stream(i)) for i in range(4)]
        await asyncio.wait_for(streaming.wait(), 60)
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        # wait_for: a hung stream fails the test instead of hanging it.
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        return results, time.monotonic() - t0

    try:
        results, elapsed = asyncio.run(run())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert all(f"rank 1 (pid {pids[1]}) died" in str(r) for r in results), results
        assert elapsed < 30, f"streams failed {elapsed:.1f} s after the kill"
        with pytest.raises(EngineDeadError, match="rank 1"):
            engine.check_health()

        async def late_request() -> None:
            async for _ in engine.generate([5, 6, 7], LONG, "late"):
                pass

        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(late_request(), 10))
    finally:
        engine.shutdown()
    assert _wait_for(lambda: not pid_alive(pids[0])), "rank 0 outlived shutdown"
    assert _wait_for(_cluster_idle), f"group not released: {ray.available_resources()}"


def test_a_start_that_cannot_get_its_resources_removes_its_placement_group(ckpts, monkeypatch):
    from vattn_ray import ray_executor

    monkeypatch.setattr(ray_executor, "PLACEMENT_TIMEOUT_S", 2.0)
    blocker = ray.util.placement_group([{"CPU": CLUSTER_CPUS}])  # every CPU taken: feasible, not free
    ray.get(blocker.ready(), timeout=30)
    try:
        before = set(ray.util.placement_group_table())
        with pytest.raises(TimeoutError, match="not free within 2 s"):
            LLM(model=ckpts["llama"], tensor_parallel_size=2, **ENGINE)
        ours = [v for k, v in ray.util.placement_group_table().items() if k not in before]
        assert ours and all(g["state"] == "REMOVED" for g in ours), ours
    finally:
        ray.util.remove_placement_group(blocker)
    assert _wait_for(_cluster_idle), f"resources not released: {ray.available_resources()}"
