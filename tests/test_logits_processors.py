"""Logits processing (vattn_ray/logits_processors.py): parity with transformers' processors, vLLM's
meaning of presence/frequency penalties, min_tokens masking EOS, and greedy parity end to end with
transformers' `generate` (repetition_penalty) and with a reference greedy loop over transformers'
model (every feature at once)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

from vattn_ray import LLM, SamplingParams
from vattn_ray.logits_processors import TokenHistory, process_logits
from vattn_ray.model.builder import build_random_checkpoint
from vattn_ray.sampling import Sampler
from vattn_ray.scheduler.plan import SeqChunk
from hf_reference import hf_greedy, hf_model

V = 64
SLOTS, SLOT_TOKENS = 4, 32


def history_of(seqs: dict[str, tuple[int, list[int], list[int]]], params: dict[str, SamplingParams],
               eos=(1,)) -> tuple[TokenHistory, list[SeqChunk]]:
    """A history fed the way a worker feeds it: the prompt as two chunks, then each output token
    sampled and fed back; returns the history and each request's next sampling chunk."""
    h = TokenHistory(SLOTS, SLOT_TOKENS, torch.device("cpu"))
    chunks = []
    for req_id, (slot, prompt, output) in seqs.items():
        h.add(req_id, params[req_id], eos)
        half = len(prompt) // 2
        h.record_inputs([SeqChunk(req_id, slot, 0, tuple(prompt[:half]), False)])
        h.record_inputs([SeqChunk(req_id, slot, half, tuple(prompt[half:]), True, 0)])
        pos = len(prompt)
        for k, tok in enumerate(output):
            h.record_sampled([SeqChunk(req_id, slot, pos - 1, (0,), True, k)], torch.tensor([tok]))
            pos += 1
        chunks.append(SeqChunk(req_id, slot, pos - 1, (output[-1] if output else prompt[-1],), True,
                               len(output)))
    return h, chunks


def rand_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_nothing_to_do_returns_the_same_tensor():
    x = rand_logits(3)
    out = process_logits(x, [SeqChunk(f"r{i}", i, 0, (1,), True) for i in range(3)], [SamplingParams()] * 3, None)
    assert out is x


def test_repetition_penalty_matches_transformers():
    rng = random.Random(0)
    seqs = {f"r{i}": (i, [rng.randrange(V) for _ in range(9)], [rng.randrange(V) for _ in range(i * 3)])
            for i in range(3)}
    params = {r: SamplingParams(repetition_penalty=pen) for r, pen in zip(seqs, (1.3, 0.7, 2.0))}
    h, chunks = history_of(seqs, params)
    x = rand_logits(3, seed=1)
    ours = process_logits(x, chunks, [params[c.req_id] for c in chunks], h)
    for row, (req_id, (_, prompt, output)) in enumerate(seqs.items()):
        ref = RepetitionPenaltyLogitsProcessor(params[req_id].repetition_penalty)(
            torch.tensor([prompt + output]), x[row:row + 1].clone())
        torch.testing.assert_close(ours[row], ref[0])
    assert not torch.equal(ours, x) and torch.equal(x, rand_logits(3, seed=1)), "input left untouched"


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    prompt, output = [5, 6, 7, 7], [7, 9, 9, 9, 11]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    h, chunks = history_of({"r": (2, prompt, output)}, {"r": params})
    x = rand_logits(1, seed=2)
    ours = process_logits(x, chunks, [params], h)
    ref = x.clone()
    for tok, count in Counter(output).items():  # vLLM / OpenAI: logit -= f * count + p * (count > 0)
        ref[0, tok] -= 0.25 * count + 0.5
    torch.testing.assert_close(ours, ref)
    assert ours[0, 5] == x[0, 5] and ours[0, 6] == x[0, 6], "prompt tokens are not penalised"


@pytest.mark.parametrize("min_p, temperature", [(0.05, 1.0), (0.2, 0.7), (0.5, 1.5)])
def test_min_p_keeps_what_transformers_keeps(min_p, temperature):
    x = rand_logits(4, seed=3)
    params = [SamplingParams(min_p=min_p, temperature=temperature)] * 4
    ours = process_logits(x, [SeqChunk(f"r{i}", i, 0, (1,), True) for i in range(4)], params, None)
    ref = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, x.clone()))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert 1 <= int((~torch.isinf(ours)).sum(-1).min()) < V
    kept = ~torch.isinf(ours)
    assert torch.equal(ours[kept], x[kept]), "kept tokens keep their logits (temperature is the sampler's)"


def test_min_p_leaves_greedy_rows_alone():
    x = rand_logits(1, seed=4)
    assert torch.equal(process_logits(x, [SeqChunk("r", 0, 0, (1,), True)],
                                      [SamplingParams(min_p=0.9, temperature=0.0)], None), x)


def test_logit_bias_adds_and_ignores_ids_past_the_vocabulary():
    x = rand_logits(2, seed=5)
    params = [SamplingParams(logit_bias={3: 10.0, 7: -100.0, V + 5: 50.0}), SamplingParams()]
    ours = process_logits(x, [SeqChunk("a", 0, 0, (1,), True), SeqChunk("b", 1, 0, (1,), True)], params, None)
    ref = x.clone()
    ref[0, 3] += 10.0
    ref[0, 7] -= 100.0
    torch.testing.assert_close(ours, ref)


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos, stop = 1, 9
    x = torch.zeros(1, V)
    x[0, eos], x[0, stop], x[0, 4] = 10.0, 9.0, 8.0  # EOS, then the stop id, are the most likely
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop])
    h = TokenHistory(SLOTS, SLOT_TOKENS, torch.device("cpu"))
    h.add("r", params, (eos,))
    sampler = Sampler()
    picks = [sampler.sample(x, [SeqChunk("r", 0, 5 + k, (2,), True, k)], [params], h)[0].token_id
             for k in range(5)]
    assert picks == [4, 4, 4, eos, eos]
    ignore = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=[stop])
    h.add("i", ignore, (eos,))
    # ignore_eos: EOS is an ordinary token, only the stop id is held back.
    assert sampler.sample(x, [SeqChunk("i", 1, 5, (2,), True, 0)], [ignore], h)[0].token_id == eos


def test_history_follows_recompute_after_preemption():
    """A recomputed request is fed again from position 0 (maybe in another slot): counts stay exact."""
    params = SamplingParams(frequency_penalty=1.0)
    h = TokenHistory(SLOTS, SLOT_TOKENS, torch.device("cpu"))
    h.add("r", params)
    h.record_inputs([SeqChunk("r", 0, 0, (3, 4), True, 0)])
    h.record_sampled([SeqChunk("r", 0, 0, (3, 4), True, 0)], torch.tensor([8]))
    h.record_inputs([SeqChunk("r", 0, 2, (8,), True, 1)])
    h.record_sampled([SeqChunk("r", 0, 2, (8,), True, 1)], torch.tensor([8]))
    # Preempted, then recomputed in slot 3: prompt and both outputs in one chunk.
    h.record_inputs([SeqChunk("r", 3, 0, (3, 4, 8, 8), True, 2)])
    counts, seen = h.counts([SeqChunk("r", 3, 0, (3, 4, 8, 8), True, 2)], V)
    assert counts[0, 8] == 2 and counts.sum() == 2
    assert seen[0, [3, 4, 8]].all() and seen.sum() == 3
    h.forget(["r"])
    assert not h.tracked


# ---- end to end: the real engine against transformers -------------------------------------
PAGE = 4096


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_random_checkpoint(str(tmp_path_factory.mktemp("lp") / "llama"), "llama", seed=7)


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _reference_greedy(path: str, prompt: list[int], p: SamplingParams, eos: set[int], vocab: int) -> list[int]:
    """Greedy over transformers' logits with each feature written out plainly (vLLM's order)."""
    model = hf_model(path)
    ids, out = list(prompt), []
    while len(out) < p.max_tokens:
        with torch.no_grad():
            x = model(torch.tensor([ids])).logits[0, -1].float()[:vocab].clone()
        for tok, bias in p.logit_bias:
            x[tok] += bias
        if len(out) < p.min_tokens:
            x[list(eos | set(p.stop_token_ids))] = float("-inf")
        for tok in set(ids):
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
        for tok, count in Counter(out).items():
            x[tok] -= p.frequency_penalty * count + p.presence_penalty
        tok = int(x.argmax())
        ids.append(tok)
        out.append(tok)
        if tok in eos:
            break
    return out


def test_greedy_with_repetition_penalty_equals_transformers_generate(llama):
    llm = LLM(model=llama, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256,
              max_num_batched_tokens=16)  # chunked prefill: the history is fed in pieces
    try:
        vocab = llm.engine.vocab_size
        prompts = _prompts(vocab, [5, 37, 2], seed=1)
        p = SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.8)
        ours = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
        assert ours == hf_greedy(llama, prompts, 16, repetition_penalty=1.8)
        plain = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))]
        assert plain != ours, "the penalty changes the output of this model"
        llm.engine.check_integrity()
    finally:
        llm.shutdown()


def test_every_feature_at_once_equals_a_reference_greedy_loop_under_preemption(llama):
    probe = LLM(model=llama, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256)
    group, per_group = probe.engine.layout.page_group_bytes, probe.engine.layout.tokens_per_group
    probe.shutdown()
    # A pool for about two requests at a time: the others are preempted and recomputed.
    # (max_model_len 64: the engine refuses to start when one full-length request cannot fit.)
    llm = LLM(model=llama, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=64,
              kv_cache_memory_bytes=(int(1.6 * 60 / per_group) + 1) * group)
    try:
        eos = set(llm.engine.eos_token_ids)
        vocab = llm.engine.vocab_size
        prompts = _prompts(vocab, [30, 33, 36, 39], seed=2)
        params = [SamplingParams(max_tokens=14, temperature=0.0, repetition_penalty=1.2, presence_penalty=0.4,
                                 frequency_penalty=0.3, logit_bias={prompts[i][0]: 3.0, 40 + i: -50.0},
                                 min_tokens=4, min_p=0.3) for i in range(4)]
        outs = llm.generate(prompts, params)
        assert llm.engine.stats()["num_preemptions"] > 0
        for prompt, p, o in zip(prompts, params, outs):
            assert o.outputs[0].token_ids == _reference_greedy(llama, prompt, p, eos, vocab)
        llm.engine.check_integrity()
    finally:
        llm.shutdown()


def test_min_tokens_holds_back_eos_end_to_end(llama):
    llm = LLM(model=llama, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=256)
    try:
        eos = llm.engine.eos_token_ids[0]
        # A +100 bias makes EOS the greedy pick at every step: min_tokens alone holds it back.
        p = SamplingParams(max_tokens=10, temperature=0.0, min_tokens=5, logit_bias={eos: 100.0})
        [out] = llm.generate([[5, 6, 7]], p)
        ids = out.outputs[0].token_ids
        assert len(ids) == 6 and eos not in ids[:5] and ids[5] == eos and out.outputs[0].finish_reason == "stop"
        [early] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0.0, logit_bias={eos: 100.0}))
        assert early.outputs[0].token_ids == [eos]
    finally:
        llm.shutdown()
