"""Schema fuzzing: schemathesis generates requests from the app's own OpenAPI document (valid and
invalid ones: wrong types, out-of-range numbers, missing fields, odd strings) and sends them to
the app over the real engine (built-in tiny model, CPU). Zero 5xx, and the engine stays healthy
with its books intact.

The budget is bounded (`VATTN_RAY_FUZZ_EXAMPLES` cases per operation and mode, default 40), so
CI stays fast; raise it to search longer.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from deploy.server import OpenAIServer, create_app
from vattn_ray.async_engine import AsyncLLMEngine
from vattn_ray.config import EngineArgs

EXAMPLES = int(os.environ.get("VATTN_RAY_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def engine():
    # A short context keeps every generated request cheap; a small queue makes 429s reachable.
    engine = AsyncLLMEngine.from_engine_args(EngineArgs(
        model="builtin:tiny-llama", device="cpu", max_model_len=48, max_num_seqs=4,
        max_num_batched_tokens=64, max_queued_requests=16))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def app_schema(engine):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(OpenAIServer(engine, "tiny-llama")))


schema = schemathesis.pytest.from_fixture("app_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_no_generated_request_gets_a_5xx(case, engine):
    case.call_and_validate(checks=[not_a_server_error])
    engine.check_health()


def test_the_engine_is_healthy_and_consistent_after_fuzzing(engine):
    import asyncio

    engine.check_health()
    asyncio.run(engine.check_integrity())
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
