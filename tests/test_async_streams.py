"""The async engine's streams under load: a reader that falls behind reads what waited for it as one
output (nothing lost, nothing changed), and an event loop never waits for the engine's lock.

The real engine on the built-in tiny model (CPU).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vattn_ray import LLM, SamplingParams
from vattn_ray.async_engine import AsyncLLMEngine, merge_outputs
from vattn_ray.config import EngineArgs
from vattn_ray.outputs import CompletionOutput, RequestOutput
from vattn_ray.sampling_params import RequestOutputKind

MODEL = "builtin:tiny-llama"
ENGINE = dict(device="cpu", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128)
PROMPT = [5, 6, 7, 8, 9]
TOKENS = 40


@pytest.fixture(scope="module")
def engine():
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(model=MODEL, **ENGINE))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    llm = LLM(model=MODEL, **ENGINE)
    try:
        [out] = llm.generate([PROMPT], SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=2))
        return out.outputs[0]
    finally:
        llm.shutdown()


def params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=2, **kw)


def test_a_slow_reader_gets_every_token_in_fewer_outputs(engine, reference):
    async def read_slowly():
        outs = []
        async for out in engine.generate(PROMPT, params(output_kind=RequestOutputKind.DELTA), "slow"):
            outs.append(out)
            time.sleep(0.05)  # blocks the event loop: the engine's outputs pile up meanwhile
        return outs

    outs = asyncio.run(read_slowly())
    ids = [t for o in outs for t in o.outputs[0].delta_token_ids]
    assert ids == reference.token_ids
    assert [t for o in outs for t in o.outputs[0].token_ids] == reference.token_ids
    assert "".join(o.outputs[0].delta_text for o in outs) == reference.text
    assert [lp for o in outs for lp in o.outputs[0].logprobs] == reference.logprobs
    assert len(outs) < TOKENS, "outputs that waited for the reader were not merged"
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert not engine.engine.has_unfinished_requests()


def test_a_cumulative_slow_reader_sees_the_latest_state_and_every_delta(engine, reference):
    async def read_slowly():
        outs = []
        async for out in engine.generate(PROMPT, params(), "slow-cumulative"):
            outs.append(out)
            time.sleep(0.05)
        return outs

    outs = asyncio.run(read_slowly())
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == reference.token_ids
    for o in outs:  # cumulative: each output holds everything so far
        n = len(o.outputs[0].token_ids)
        assert o.outputs[0].token_ids == reference.token_ids[:n]
    assert outs[-1].outputs[0].text == reference.text


def test_the_event_loop_never_waits_for_the_engine_lock(engine, reference):
    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with engine._lock:  # what a long step's output processing looks like to the event loop
            held.set()
            release.wait(timeout=10)

    async def scenario():
        threading.Thread(target=hold_the_lock, daemon=True).start()
        while not held.is_set():
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        stream = engine.generate(PROMPT, params(output_kind=RequestOutputKind.DELTA), "while-locked")
        first = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.05)
        await engine.abort("never-added")
        blocked = time.monotonic() - t0
        assert not first.done()  # admitted only once the loop thread gets the lock
        release.set()
        out = await asyncio.wait_for(first, timeout=30)
        ids = list(out.outputs[0].delta_token_ids)
        async for out in stream:
            ids += out.outputs[0].delta_token_ids
        return blocked, ids

    blocked, ids = asyncio.run(scenario())
    assert blocked < 0.5, f"the event loop was held {blocked:.2f} s by the engine lock"
    assert ids == reference.token_ids


def test_a_refused_request_raises_at_its_first_output_and_the_engine_serves_on(engine, reference):
    async def scenario():
        with pytest.raises(ValueError, match="prompt token id"):
            async for _ in engine.generate([5, 10**9], params(), "refused"):
                pass
        return [t async for out in engine.generate(PROMPT, params(output_kind=RequestOutputKind.DELTA), "ok")
                for t in out.outputs[0].delta_token_ids]

    assert asyncio.run(scenario()) == reference.token_ids


def test_merge_outputs_joins_the_new_pieces_of_every_sequence():
    def out(step: int, finished: bool = False) -> RequestOutput:
        seqs = [CompletionOutput(index=i, text=f"t{step}{i}", token_ids=[10 * step + i],
                                 logprobs=[{10 * step + i: -1.0}], cumulative_logprob=-float(step),
                                 finish_reason="length" if finished else None,
                                 delta_text=f"t{step}{i}", delta_token_ids=[10 * step + i])
                for i in range(2)]
        return RequestOutput("r", None, [1], seqs, finished, {"step": step})

    merged = merge_outputs(merge_outputs(out(1), out(2), RequestOutputKind.DELTA), out(3, True),
                           RequestOutputKind.DELTA)
    assert merged.finished and merged.metrics == {"step": 3}
    for i, o in enumerate(merged.outputs):
        assert o.token_ids == o.delta_token_ids == [10 + i, 20 + i, 30 + i]
        assert o.text == o.delta_text == f"t1{i}t2{i}t3{i}"
        assert o.logprobs == [{10 + i: -1.0}, {20 + i: -1.0}, {30 + i: -1.0}]
        assert o.cumulative_logprob == -3.0 and o.finish_reason == "length"
    cumulative = merge_outputs(out(1), out(2), RequestOutputKind.CUMULATIVE)
    assert cumulative.outputs[0].token_ids == [20] and cumulative.outputs[0].delta_token_ids == [10, 20]


def test_warm_up_leaves_nothing_behind(reference):
    llm = LLM(model=MODEL, **ENGINE)
    try:
        assert llm.engine.warm_up() >= 0.0
        assert not llm.engine.has_unfinished_requests() and not llm.engine._in_flight
        llm.engine.check_integrity()
        assert llm.engine.stats()["num_running"] == 0
        [out] = llm.generate([PROMPT], SamplingParams(max_tokens=TOKENS, temperature=0.0, logprobs=2))
        assert out.outputs[0].token_ids == reference.token_ids
    finally:
        llm.shutdown()
