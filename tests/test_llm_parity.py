"""End-to-end parity: `vattn_ray.LLM` greedy tokens == transformers' greedy `generate`.

Same random float32 weights, loaded through each side's own loader. Small host pages (4 KiB) so
every prompt crosses page boundaries; the scheduler, the virtual KV cache, the model and the
sampler are all the real ones.
"""

from __future__ import annotations

import random

import pytest
import torch

from vattn_ray import LLM, SamplingParams
from vattn_ray.model.builder import build_random_checkpoint
from hf_reference import hf_greedy

PAGE = 4096
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: build_random_checkpoint(str(root / fam), fam, seed=7) for fam in
            ("llama", "mistral", "qwen2", "qwen3")}


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def run_llm(path: str, prompts, max_model_len: int = 256, **kwargs):
    llm = LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=max_model_len,
              **kwargs)
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        llm.engine.check_integrity()
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()
    finally:
        llm.shutdown()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_families_match_transformers(checkpoints, family):
    path = checkpoints[family]
    vocab = vocab_of(path)
    prompts = _prompts(vocab, [5, 37, 70, 1, 129])
    ours, _ = run_llm(path, prompts, max_num_seqs=8, max_num_batched_tokens=64)
    assert ours == hf_greedy(path, prompts, MAX_TOKENS)


@pytest.mark.parametrize("layers_per_tensor", [1, 2, "auto"])
@pytest.mark.parametrize("chunked", [True, False])
def test_layouts_and_chunking(checkpoints, layers_per_tensor, chunked):
    path = checkpoints["llama"]
    prompts = _prompts(vocab_of(path), [3, 44, 90, 17], seed=1)
    budget = 16 if chunked else 256  # a 16-token budget splits every long prompt across steps
    ours, stats = run_llm(path, prompts, kv_layers_per_tensor=layers_per_tensor,
                          enable_chunked_prefill=chunked, max_num_batched_tokens=budget)
    assert ours == hf_greedy(path, prompts, MAX_TOKENS)
    assert stats["num_steps"] >= MAX_TOKENS


def test_preemption_by_tiny_pool_keeps_tokens(checkpoints):
    """A pool too small for all requests at once forces preemption and recompute."""
    path = checkpoints["qwen3"]
    prompts = _prompts(vocab_of(path), [60, 61, 62, 63, 64, 65], seed=2)
    probe = LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256)
    group_bytes = probe.engine.layout.page_group_bytes
    tokens_per_group = probe.engine.layout.tokens_per_group
    probe.shutdown()
    # Room for about two and a half requests at full length: six must take turns.
    groups = int(2.5 * (65 + MAX_TOKENS) / tokens_per_group) + 1
    # max_model_len 128: the engine refuses to start when one full-length request cannot fit.
    ours, stats = run_llm(path, prompts, max_model_len=128, kv_cache_memory_bytes=groups * group_bytes,
                          max_num_batched_tokens=512)
    assert stats["num_preemptions"] > 0
    assert ours == hf_greedy(path, prompts, MAX_TOKENS)


def test_text_prompts_and_stop(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256)
    try:
        tok = llm.get_tokenizer()
        [full] = llm.generate("the cat sat on the mat", SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        text = full.outputs[0].text
        assert full.prompt_token_ids == tok.encode("the cat sat on the mat")
        assert text == tok.decode(full.outputs[0].token_ids, skip_special_tokens=True)
        # Stop on a piece of the greedy text: output ends right before it, reason "stop".
        if len(text.strip()) >= 4:
            cut = text.find(text.strip()[2:4])
            stop = text[cut:cut + 2]
            [short] = llm.generate("the cat sat on the mat",
                                   SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[stop]))
            assert short.outputs[0].text == text[:text.find(stop)]
            assert short.outputs[0].finish_reason == "stop"
            assert short.outputs[0].stop_reason == stop
        # A stop token ends the output at that token (it is included in token_ids, like vLLM).
        ids = full.outputs[0].token_ids
        [by_id] = llm.generate("the cat sat on the mat",
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=[ids[3]]))
        k = ids.index(ids[3])
        assert by_id.outputs[0].token_ids == ids[:k + 1]
        assert by_id.outputs[0].finish_reason == "stop"
        llm.engine.check_integrity()
    finally:
        llm.shutdown()


def test_seeded_sampling_is_reproducible(checkpoints):
    path = checkpoints["mistral"]
    llm = LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256)
    try:
        prompts = _prompts(vocab_of(path), [9, 30, 2], seed=3)
        p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
        a = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
        b = [o.outputs[0].token_ids for o in llm.generate(list(reversed(prompts)), p)][::-1]
        assert a == b  # same seed, different batch positions: same tokens
        n2 = llm.generate(prompts[0], SamplingParams(max_tokens=12, temperature=1.0, seed=5, n=2))[0]
        assert len(n2.outputs) == 2 and [o.index for o in n2.outputs] == [0, 1]
        assert n2.outputs[0].token_ids != n2.outputs[1].token_ids  # seeds 5 and 6
    finally:
        llm.shutdown()


def test_bad_requests_raise_clear_errors(checkpoints):
    path = checkpoints["llama"]
    llm = LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=64)
    try:
        with pytest.raises(ValueError, match="max_model_len"):
            llm.generate([[5] * 60], SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match="empty"):
            llm.generate([[]], SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=-1)
        # The engine still serves after rejecting.
        [ok] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))
        assert len(ok.outputs[0].token_ids) == 4 or ok.outputs[0].finish_reason == "stop"
    finally:
        llm.shutdown()


def vocab_of(path: str) -> int:
    from vattn_ray.config import read_hf_config

    return int(read_hf_config(path)["vocab_size"])


def test_fragmentation_stat_matches_the_shard(checkpoints):
    """The head's fragmentation figure (from the scheduler's books) equals the KV manager's own."""
    path = checkpoints["llama"]
    llm = LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256)
    try:
        engine = llm.engine
        for i, n in enumerate((37, 5, 90)):
            engine.add_request(f"f{i}", [7] * n, SamplingParams(max_tokens=8, temperature=0))
        engine.step()
        engine.step()
        stats = engine.stats()
        live = {engine.scheduler._requests[r].slot: engine.scheduler._requests[r].num_computed
                for r in ("f0", "f1", "f2")}
        shard = engine.executor.kv_stats(live)
        assert stats["live_tokens"] == sum(live.values()) > 0
        assert 0.0 < stats["kv_fragmentation"] < 1.0
        assert abs(stats["kv_fragmentation"] - shard.fragmentation) < 1e-9
    finally:
        llm.shutdown()
