"""The engine's one step loop: planning one step ahead must change nothing a user can observe.

Runs the real engine (tiny Llama, float32, host VMM pages) with `async_scheduling` on and off and
compares every token, finish reason and stop; checks the order of outputs, abort while a step is
in flight, and the three output kinds.
"""

from __future__ import annotations

import random

import pytest

from vattn_ray import LLM, SamplingParams
from vattn_ray.engine import LLMEngine
from vattn_ray.config import EngineArgs
from vattn_ray.model.builder import build_random_checkpoint
from vattn_ray.sampling_params import RequestOutputKind

PAGE = 4096


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_random_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), "llama", seed=3)


def _engine(path: str, **kw) -> LLMEngine:
    args = dict(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=192,
                max_num_seqs=4, max_num_batched_tokens=48)
    args.update(kw)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 200) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def _run(path: str, prompts, params, **kw):
    llm = LLM(model=path, device="cpu", dtype="float32", page_bytes=PAGE, max_model_len=192,
              max_num_seqs=4, max_num_batched_tokens=48, **kw)
    try:
        outs = llm.generate(prompts, params)
        llm.engine.check_integrity()
        return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text) for c in o.outputs] for o in outs]
    finally:
        llm.shutdown()


def test_planning_ahead_gives_the_same_outputs(checkpoint):
    prompts = _prompts(9, seed=1)
    # r1's own second greedy token, so a stop token ends it early.
    second = _run(checkpoint, prompts[1:2], SamplingParams(max_tokens=4, temperature=0))[0][0][0][1]
    # A mix of what ends requests: length, a stop token the model emits early, a seeded random
    # sampler with n=2, a tight max_tokens; 9 requests over 4 slots forces slot reuse.
    params = [SamplingParams(max_tokens=12, temperature=0),
              SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[second]),
              SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=11, n=2),
              SamplingParams(max_tokens=1, temperature=0)] * 2 + [SamplingParams(max_tokens=20, temperature=0)]
    ahead = _run(checkpoint, prompts, params, async_scheduling=True)
    serial = _run(checkpoint, prompts, params, async_scheduling=False)
    assert ahead == serial
    assert ahead[1][0][1] == "stop" and ahead[3][0][1] == "length"


def test_the_engine_plans_ahead_and_drains(checkpoint):
    engine = _engine(checkpoint)
    try:
        engine.add_request("a", _prompts(1)[0], SamplingParams(max_tokens=5, temperature=0))
        assert engine.step() == []  # the first step is launched, not waited for
        plans = []
        engine.step_observers.append(plans.append)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
        # One decode of "a" was planned ahead of the step that ended it: it is still in flight.
        assert engine.has_work()
        assert engine.drain() == []  # its result belongs to a finished request: no output
        engine.check_integrity()
        for _ in range(3):  # the workers still hear that "a" is done, then all is quiet
            assert engine.step() == []
        assert not engine.has_work()
    finally:
        engine.shutdown()


def test_abort_while_a_step_is_in_flight(checkpoint):
    engine = _engine(checkpoint)
    try:
        prompts = _prompts(3, seed=5)
        params = SamplingParams(max_tokens=8, temperature=0, output_kind=RequestOutputKind.DELTA)
        for i, p in enumerate(prompts[:2]):
            engine.add_request(f"r{i}", p, params)
        engine.step()
        engine.step()  # two steps launched, one taken in
        aborted = engine.abort_request("r0")
        assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        engine.add_request("r2", prompts[2], params)  # may reuse r0's slot while r0's step runs
        got: dict[str, list[int]] = {"r1": [], "r2": []}
        while engine.has_unfinished_requests():
            for o in engine.step():
                assert o.request_id != "r0", "an aborted request produced output"
                got[o.request_id] += o.outputs[0].token_ids
        engine.check_integrity()
    finally:
        engine.shutdown()
    # The survivors are unaffected by the abort: same tokens as when run alone.
    alone = _run(checkpoint, prompts[1:], SamplingParams(max_tokens=8, temperature=0))
    assert [got["r1"], got["r2"]] == [alone[0][0][0], alone[1][0][0]]


def test_output_kinds(checkpoint):
    prompt = _prompts(1, seed=9)[0]
    streams = {}
    for kind in RequestOutputKind:
        engine = _engine(checkpoint)
        try:
            engine.add_request("r", prompt, SamplingParams(max_tokens=10, temperature=0, output_kind=kind))
            outs = []
            while engine.has_unfinished_requests():
                outs += engine.step()
            streams[kind] = outs
        finally:
            engine.shutdown()
    final = streams[RequestOutputKind.CUMULATIVE][-1].outputs[0]
    assert len(streams[RequestOutputKind.FINAL_ONLY]) == 1
    only = streams[RequestOutputKind.FINAL_ONLY][0].outputs[0]
    assert (only.token_ids, only.text) == (final.token_ids, final.text)
    deltas = [o.outputs[0] for o in streams[RequestOutputKind.DELTA]]
    assert len(deltas) == len(streams[RequestOutputKind.CUMULATIVE]) > 1
    assert sum((d.token_ids for d in deltas), []) == final.token_ids
    assert "".join(d.text for d in deltas) == final.text
    assert all(d.token_ids == d.delta_token_ids for d in deltas)
