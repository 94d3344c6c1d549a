"""No input stops the engine: what it cannot run is refused for that request only, the offline
`LLM` and the async engine keep serving, a stuck step is caught by the watchdog (health turns red,
in-flight requests get a clear error), and shutdown never frees the workers under a running step.

The real engine on the built-in tiny model (CPU). A stuck device is simulated by making the
executor's `submit` wait on an event: the engine, the async loop and the watchdog are the real ones.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.server import OpenAIServer, create_app
from vattn_ray import LLM, SamplingParams
from vattn_ray.async_engine import AsyncLLMEngine, EngineDeadError
from vattn_ray.config import EngineArgs
from vattn_ray.watchdog import StepWatchdog

MODEL = "builtin:tiny-llama"
ENGINE = dict(device="cpu", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128)
HUGE_TOP_K = 9223372036854775808  # 2**63: "Overflow when unpacking long long" inside a step


@pytest.fixture(scope="module")
def llm():
    llm = LLM(model=MODEL, **ENGINE)
    yield llm
    llm.shutdown()


def greedy(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def test_top_k_past_int64_is_refused_and_the_offline_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="top_k"):
        llm.generate([[5, 6, 7]], SamplingParams(top_k=HUGE_TOP_K, top_p=0.5, temperature=1.0))
    [ok] = llm.generate([[5, 6, 7]], greedy())
    assert len(ok.outputs[0].token_ids) == 4
    assert not llm.engine.has_unfinished_requests()


def test_ids_outside_the_vocabulary_are_refused(llm):
    vocab = llm.engine.vocab_size
    for params in (SamplingParams(stop_token_ids=[vocab]), SamplingParams(logit_bias={vocab + 3: 1.0})):
        with pytest.raises(ValueError, match=f"outside the vocabulary \\[0, {vocab}\\)"):
            llm.generate([[5, 6]], params)
    with pytest.raises(ValueError, match="prompt token id"):
        llm.generate([[5, vocab]], greedy())
    assert llm.generate([[5, 6]], greedy())[0].finished


def test_prompts_admitted_before_a_refused_one_are_not_left_in_the_engine(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[5, 6, 7], [8, 9], []], greedy(8))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.stats.num_waiting == 0 and llm.engine.scheduler.stats.num_running == 0
    steps = llm.engine.num_steps
    [out] = llm.generate([[1, 2, 3]], greedy(3))
    assert llm.engine.num_steps - steps == 3, "only the new request ran"
    llm.engine.check_integrity()


_ints = st.one_of(st.integers(-3, 40), st.integers(-(1 << 70), 1 << 70), st.booleans(), st.none())
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.none(), st.text(max_size=2))
_fields = {
    "max_tokens": _ints, "temperature": _floats, "top_p": _floats, "top_k": _ints, "seed": _ints,
    "min_tokens": _ints, "logprobs": _ints, "n": st.integers(-1, 3), "repetition_penalty": _floats,
    "presence_penalty": _floats, "frequency_penalty": _floats, "min_p": _floats,
    "stop_token_ids": st.lists(_ints, max_size=3),
    "logit_bias": st.dictionaries(st.one_of(_ints, st.text(max_size=3)), _floats, max_size=3),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2)),
    "ignore_eos": st.booleans(),
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional=_fields))
def test_any_sampling_values_are_refused_or_served(llm, kwargs):
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError):
        params = None
    if params is not None and params.max_tokens <= 24:
        try:
            [out] = llm.generate([[3, 4, 5, 6]], params)
            assert out.finished
        except ValueError:
            pass  # refused by the engine (e.g. an id outside the vocabulary): that request only
    [ok] = llm.generate([[3, 4]], greedy(2))
    assert ok.finished and not llm.engine.has_unfinished_requests()


# ---- the async engine: what a replica runs ----------------------------------------------------
class StuckDevice:
    """Makes the executor's next steps wait until released (a hung device or collective)."""

    def __init__(self, executor) -> None:
        self.executor, self.real = executor, executor.submit
        self.stuck = threading.Event()
        self.release = threading.Event()
        self.running = 0
        self.shutdown_during_step = False
        executor.submit = self.submit
        real_shutdown = executor.shutdown

        def shutdown() -> None:
            self.shutdown_during_step |= self.running > 0
            real_shutdown()

        executor.shutdown = shutdown

    def submit(self, plan):
        self.running += 1
        try:
            if self.stuck.is_set():
                self.release.wait(timeout=60)
            return self.real(plan)
        finally:
            self.running -= 1


def async_engine(**kw) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_engine_args(EngineArgs(model=MODEL, **{**ENGINE, **kw}))


async def _collect(engine: AsyncLLMEngine, rid: str, max_tokens: int):
    outs = []
    async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                 ignore_eos=True), rid):
        outs.append(out)
    return outs


def test_watchdog_fails_a_stuck_step_and_turns_health_red():
    engine = async_engine(step_timeout_s=1.0)
    device = StuckDevice(engine.engine.executor)
    try:
        async def scenario():
            first = await _collect(engine, "warm", 3)  # healthy: steps finish
            assert first[-1].finished
            await asyncio.sleep(1.5)  # idle longer than the timeout: still healthy
            engine.check_health()
            device.stuck.set()
            t0 = time.monotonic()
            with pytest.raises(EngineDeadError, match="stuck.*step_timeout_s=1"):
                await _collect(engine, "victim", 50)
            return time.monotonic() - t0

        waited = asyncio.run(scenario())
        assert 1.0 <= waited < 4.0, f"the stuck request was failed after {waited:.1f} s"
        with pytest.raises(EngineDeadError, match="stuck"):
            engine.check_health()
    finally:
        device.release.set()
        engine.shutdown()


def test_in_flight_http_requests_of_a_stuck_engine_get_503():
    engine = async_engine(step_timeout_s=1.0)
    device = StuckDevice(engine.engine.executor)
    try:
        with TestClient(create_app(OpenAIServer(engine, "tiny-llama")), raise_server_exceptions=False) as c:
            assert c.get("/health").status_code == 200
            device.stuck.set()
            r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 20, "ignore_eos": True})
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "engine_unavailable" and "stuck" in err["message"]
            health = c.get("/health")
            assert health.status_code == 503 and "stuck" in health.json()["error"]
    finally:
        device.release.set()
        engine.shutdown()


def test_huge_top_k_over_http_is_a_400_and_the_engine_keeps_serving():
    engine = async_engine()
    try:
        with TestClient(create_app(OpenAIServer(engine, "tiny-llama")), raise_server_exceptions=False) as c:
            r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "top_k": HUGE_TOP_K,
                                                "top_p": 0.5, "temperature": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
            ok = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
            assert ok.status_code == 200 and c.get("/health").status_code == 200
    finally:
        engine.shutdown()


def test_shutdown_fails_streams_and_never_frees_workers_under_a_running_step():
    engine = async_engine()
    device = StuckDevice(engine.engine.executor)

    async def scenario():
        device.stuck.set()
        task = asyncio.create_task(_collect(engine, "r", 50))
        while device.running == 0:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, lambda: engine.shutdown(timeout_s=0.5))
        took = time.monotonic() - t0
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(task, timeout=5)
        return took

    try:
        took = asyncio.run(scenario())
        assert took < 3.0
        assert not device.shutdown_during_step, "the workers were released while a step ran"
        with pytest.raises(EngineDeadError):
            engine.check_health()
    finally:
        device.release.set()
    # Once the step is over the loop exits and releases the workers itself.
    engine._thread.join(timeout=10)
    assert not engine._thread.is_alive() and engine.engine.executor.worker is None
    engine.shutdown()  # a second call is a no-op


def test_shutdown_of_an_idle_engine_releases_the_workers():
    engine = async_engine()
    asyncio.run(_collect(engine, "r", 2))
    engine.shutdown()
    assert engine.engine.executor.worker is None


def test_watchdog_rule_idle_progress_and_stall():
    now = [100.0]
    dog = StepWatchdog(10.0, clock=lambda: now[0])
    assert dog.stalled(False, last_step_end=0.0) is None  # idle for long: fine
    now[0] = 105.0
    assert dog.stalled(True, last_step_end=0.0) is None  # work just arrived: the clock starts now
    now[0] = 114.0
    assert dog.stalled(True, last_step_end=0.0) is None
    assert dog.stalled(True, last_step_end=113.0) is None  # steps finish: progress
    now[0] = 123.5
    assert "no step finished in 10 s" in dog.stalled(True, last_step_end=113.0)
    assert dog.stalled(False, last_step_end=113.0) is None  # work gone (e.g. aborted): fine again
