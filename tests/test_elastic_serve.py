"""An elastic pair behind the serving engine (vattn_ray/elastic/serving.py) and the HTTP app, in this
process: streams that run through a forced merge and split give the greedy tokens of an ordinary
engine, integrity holds after each transition, stats and metrics show the transitions, stop strings
and output kinds behave as the ordinary engine's, requests the pair cannot serve get a 400, and a
bad ``elastic:`` block is refused with a message naming the knob. Both replicas run here (TP=1
each, host-VMM pages, gloo between them); `test_elastic_serve_e2e.py` serves it through `serve run`.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deploy.args import AppArgs
from deploy.server import OpenAIServer, create_app
from vattn_ray import LLM, SamplingParams
from vattn_ray.config import EngineArgs
from vattn_ray.elastic import ElasticConfig, ElasticPair
from vattn_ray.elastic.serving import AsyncElasticEngine, PairEngine, TransitionConflict
from vattn_ray.model.builder import build_random_checkpoint
from vattn_ray.sampling_params import RequestOutputKind
from vattn_ray.scheduler.request import QueueFull

PAGE = 4096
MAX_TOKENS = 32
ENGINE = {"device": "cpu", "dtype": "float32", "page_bytes": PAGE, "max_model_len": 256, "max_num_seqs": 8,
          "kv_cache_memory_bytes": 40 * 2 * PAGE}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_random_checkpoint(str(tmp_path_factory.mktemp("elastic-serve") / "llama"), "llama", seed=11,
                                   num_hidden_layers=4)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(8, 40))] for _ in range(8)]


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def reference(ckpt, prompts):
    """Token ids and text of an ordinary engine (elastic off) for the same greedy requests."""
    with LLM(model=ckpt, **ENGINE) as llm:
        outs = llm.generate(prompts, _greedy())
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs]


@pytest.fixture(scope="module")
def engine(ckpt):
    pair = ElasticPair(EngineArgs(model=ckpt, **ENGINE), ElasticConfig(enabled=False))
    engine = AsyncElasticEngine(PairEngine(pair))
    yield engine
    engine.shutdown()


async def _stream(engine, rid: str, prompt, params, seen: list[int]) -> tuple[list[int], str, str]:
    text = ""
    async for out in engine.generate(prompt, params, rid):
        o = out.outputs[0]
        seen.extend(o.delta_token_ids)
        text += o.delta_text
        reason = o.finish_reason
    return seen, text, reason


async def _until(cond, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "no progress"
        await asyncio.sleep(0.005)


def test_streams_run_through_a_merge_and_a_split_unchanged(engine, prompts, reference):
    async def scenario():
        seen = [[] for _ in prompts]
        tasks = [asyncio.create_task(_stream(engine, f"s{i}", p, _greedy(output_kind=RequestOutputKind.DELTA),
                                             seen[i])) for i, p in enumerate(prompts)]
        await _until(lambda: all(len(s) >= 2 for s in seen))
        at_merge = [len(s) for s in seen]
        merge = await engine.transition("merge")
        await engine.check_integrity()
        await _until(lambda: sum(map(len, seen)) > sum(at_merge) + 8)
        split = await engine.transition("split")
        await engine.check_integrity()
        return merge, split, at_merge, await asyncio.gather(*tasks)

    merge, split, at_merge, results = asyncio.run(scenario())
    assert all(0 < n < MAX_TOKENS for n in at_merge), at_merge  # every stream was mid-way at the merge
    assert merge["requests_recomputed"] == len(prompts) and split["requests_recomputed"] > 0
    assert [(ids, text) for ids, text, _ in results] == reference
    assert all(reason == "length" for _, _, reason in results)
    stats = engine.stats()["elastic"]
    assert (stats["merges"], stats["splits"], stats["state"]) == (1, 1, "split")
    assert [e["event"] for e in stats["events"]] == ["merge", "split"] and stats["restore_s"][0] >= 0
    with pytest.raises(TransitionConflict, match="split already"):
        asyncio.run(engine.transition("split"))


def test_stop_strings_across_a_merge_and_output_kinds_match_the_ordinary_engine(engine, ckpt, prompts,
                                                                                 reference):
    """A stop string is looked for in the whole text (across a transition too), the text cut before
    it, the request ended: the same cut as an ordinary engine's. FINAL_ONLY sends one output,
    CUMULATIVE the whole text each time, with one log-probability entry a token."""
    _, text = reference[3]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    with LLM(model=ckpt, **ENGINE) as llm:
        want = llm.generate([prompts[3]], _greedy(stop=[stop]))[0].outputs[0]

    async def scenario():
        seen: list[int] = []
        task = asyncio.create_task(_stream(engine, "stop", prompts[3],
                                           _greedy(stop=[stop], output_kind=RequestOutputKind.DELTA), seen))
        await _until(lambda: len(seen) >= 2)
        merge = await engine.transition("merge")
        stopped = await task
        await engine.transition("split")
        finals = [out async for out in engine.generate(
            prompts[2], _greedy(output_kind=RequestOutputKind.FINAL_ONLY), "final")]
        cumulative = [out async for out in engine.generate(
            prompts[0], _greedy(output_kind=RequestOutputKind.CUMULATIVE, logprobs=1), "cum")]
        return merge, stopped, finals, cumulative

    merge, (got_ids, got_text, reason), finals, cumulative = asyncio.run(scenario())
    assert merge["requests_recomputed"] == 1  # the stop request was moved mid-way
    assert (got_ids, got_text, reason) == (want.token_ids, want.text, "stop")
    (final,) = finals
    assert (final.outputs[0].token_ids, final.outputs[0].text) == reference[2]
    last = cumulative[-1].outputs[0]
    assert len(cumulative) > 1 and (last.token_ids, last.text) == reference[0]
    assert len(last.logprobs) == MAX_TOKENS and all(t in e for t, e in zip(last.token_ids, last.logprobs))


def test_http_refuses_what_a_pair_cannot_serve_and_reports_transitions(engine, prompts):
    server = OpenAIServer(engine, "pair")
    with TestClient(create_app(server)) as client:
        body = {"model": "pair", "prompt": prompts[0], "max_tokens": 4}
        r = client.post("/v1/completions", json={**body, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert "elastic pair" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={**body, "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "structured output" in r.json()["error"]["message"], r.text
        assert client.post("/elastic/split").status_code == 409
        merge = client.post("/elastic/merge")
        assert merge.status_code == 200 and merge.json()["event"] == "merge"
        r = client.post("/v1/completions", json={**body, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        stats = client.get("/stats", params={"check_integrity": True}).json()
        assert stats["integrity"] == "ok" and stats["elastic"]["state"] == "merged"
        metrics = client.get("/metrics").text
        assert 'vattn:elastic_merged{model_name="pair"} 1.0' in metrics
        assert "vattn:elastic_merges_total" in metrics and "vattn:kv_capacity_tokens" in metrics
        assert client.post("/elastic/split").status_code == 200
        metrics = client.get("/metrics").text
        assert 'vattn:elastic_merged{model_name="pair"} 0.0' in metrics
        assert "vattn:elastic_restore_seconds_count" in metrics


@pytest.mark.parametrize("block, words", [
    ({"merge_kv_usage": 0.4}, "split_kv_usage (0.5) < merge_kv_usage (0.4)"),
    ({"merge_at": 0.9}, "elastic.merge_at"),
    ({"min_merged_s": "soon"}, "elastic.min_merged_s"),
    ({"falling_checks": 0}, "falling_checks must be >= 1"),
])
def test_a_bad_elastic_block_is_refused_naming_the_knob(block, words):
    with pytest.raises(ValidationError, match="elastic") as info:
        AppArgs(elastic=block)
    assert words in str(info.value)
    assert AppArgs(elastic={}).elastic == ElasticConfig()  # {}: every default


def test_the_waiting_bound_is_the_pairs_and_a_merge_takes_every_waiting_request(ckpt, prompts):
    """`max_queued_requests` bounds the pair's requests without a token (twice the value: two
    replicas' worth), not each engine's: a merge puts both replicas' waiting requests on one head."""
    pair = ElasticPair(EngineArgs(model=ckpt, **ENGINE, max_queued_requests=2), ElasticConfig(enabled=False))
    try:
        for i in range(4):
            pair.add_request(f"q{i}", prompts[i], _greedy())
        with pytest.raises(QueueFull, match="twice max_queued_requests=2"):
            pair.add_request("q4", prompts[4], _greedy())
        assert pair.merge("test")["requests_recomputed"] == 4  # one head takes all four
        while pair.has_work():
            pair.step()
        pair.check_integrity()
    finally:
        pair.shutdown()
