"""Sampler: greedy, seeded reproducibility, top-k/top-p support, logprobs."""

from __future__ import annotations

import pytest
import torch

from vattn_ray.sampling import Sampler
from vattn_ray.sampling_params import SamplingParams
from vattn_ray.scheduler.plan import SeqChunk

V = 50


def chunks(n: int, num_generated: int = 0) -> list[SeqChunk]:
    return [SeqChunk(f"r{i}", i, 4, (1,), True, num_generated) for i in range(n)]


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax():
    x = logits(6)
    out = Sampler().sample(x, chunks(6), [SamplingParams(temperature=0.0)] * 6)
    assert [t.token_id for t in out] == x.argmax(-1).tolist()
    assert [t.req_id for t in out] == [f"r{i}" for i in range(6)]
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_seeded_draw_independent_of_batch_position_and_neighbours():
    row = logits(1, seed=5)[0]
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = Sampler(seed=0).sample(row[None], [SeqChunk("a", 0, 4, (1,), True, 7)], [p])[0].token_id
    batch = logits(5, seed=9)
    batch[3] = row
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0), SamplingParams(seed=99), p,
              SamplingParams(top_k=3)]
    cs = [SeqChunk(f"r{i}", i, 4, (1,), True, 7) for i in range(5)]
    out = Sampler(seed=42).sample(batch, cs, params)
    assert out[3].token_id == alone


def test_seeded_draws_vary_with_step_and_follow_the_distribution():
    row = logits(1, seed=2)[0]
    probs = row.softmax(-1)
    sampler = Sampler()
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sampler.sample(row[None], chunks(1, num_generated=k), [p])[0].token_id for k in range(3000)]
    again = [sampler.sample(row[None], chunks(1, num_generated=k), [p])[0].token_id for k in range(50)]
    assert again == draws[:50]  # reproducible per (seed, step)
    freq = torch.bincount(torch.tensor(draws), minlength=V).float() / len(draws)
    assert (freq - probs).abs().max() < 0.03  # and actually drawn from softmax(logits)


def test_unseeded_sampling_is_reproducible_per_sampler_seed():
    x = logits(8)
    params = [SamplingParams(temperature=1.0)] * 8
    a = [t.token_id for t in Sampler(seed=3).sample(x, chunks(8), params)]
    b = [t.token_id for t in Sampler(seed=3).sample(x, chunks(8), params)]
    assert a == b


@pytest.mark.parametrize("top_k", [1, 4])
def test_top_k_restricts_support(top_k):
    row = logits(1, seed=11)[0]
    allowed = set(row.topk(top_k).indices.tolist())
    sampler = Sampler()
    seen = {sampler.sample(row[None], chunks(1, k), [SamplingParams(temperature=5.0, top_k=top_k, seed=1)])[0].token_id
            for k in range(400)}
    assert seen == allowed  # only the top k, and (at a high temperature) all of them


def test_top_p_restricts_support_to_the_nucleus():
    row = torch.full((V,), -10.0)
    row[[3, 17, 40]] = torch.tensor([2.0, 1.5, 1.0])  # ~0.51, 0.31, 0.19 of the mass; rest ~0
    sampler = Sampler()
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=5)
    seen = {sampler.sample(row[None], chunks(1, k), [params])[0].token_id for k in range(400)}
    assert seen == {3, 17}  # 0.51 < 0.8, so the second token is needed; the third is not


def test_logprobs_from_unmodified_distribution():
    x = logits(3, seed=4)
    params = [SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=0.5, top_k=3, logprobs=2, seed=1),
              SamplingParams(temperature=1.0, logprobs=0)]
    out = Sampler().sample(x, chunks(3), params)
    ref = x.log_softmax(-1)
    for i, (tok, p) in enumerate(zip(out, params)):
        assert tok.logprob == pytest.approx(ref[i, tok.token_id].item(), abs=1e-5)
        vals, ids = ref[i].topk(p.logprobs)
        assert [t for t, _ in tok.top_logprobs] == ids.tolist()
        assert [v for _, v in tok.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-5)
    assert out[0].token_id == out[0].top_logprobs[0][0]  # greedy picks the most likely
    assert out[2].top_logprobs == ()


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logit rows"):
        Sampler().sample(logits(2), chunks(3), [SamplingParams()] * 3)
