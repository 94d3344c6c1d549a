"""What a hostile client can send the HTTP layer: oversized bodies (413), deep nesting, unknown and
unsupported fields, out-of-range numbers (400 naming the field), a full queue (429 + Retry-After),
the API key (401), and a huge prompt that must not stall /health or another stream.

Over the stand-in engine of tests/test_serve_http.py (fast, no model); the real engine's side of
these limits is in tests/test_engine_hardening.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from deploy.auth import API_KEY_ENV, resolve_api_key
from deploy.limits import MAX_JSON_DEPTH, MAX_LOGIT_BIAS, MAX_PROMPTS, MAX_STOP
from deploy.server import OpenAIServer, create_app
from vattn_ray.scheduler.request import QueueFull
from test_serve_http import MODEL, AlphabetEngine, assert_error, make_tokenizer

LIMIT = 64 << 10


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def engine(tokenizer):
    return AlphabetEngine(tokenizer)


@pytest.fixture
def client(engine):
    with TestClient(create_app(OpenAIServer(engine, MODEL, max_request_bytes=LIMIT)),
                    raise_server_exceptions=False) as c:
        yield c


def post(client, body: dict, path: str = "/v1/completions"):
    return client.post(path, json=body)


# ---- size and shape -------------------------------------------------------------------------------
def test_a_body_past_the_limit_is_413_declared_or_streamed(client):
    big = json.dumps({"prompt": "x" * (LIMIT + 10)}).encode()
    assert_error(client.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                 413, None, f"at most {LIMIT}", code="request_too_large")

    def chunks():  # no Content-Length: counted while read
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, None, "max_request_bytes", code="request_too_large")
    assert client.get("/health").status_code == 200


def test_deep_json_nesting_is_400_not_500(client):
    deep = b'{"prompt": "x", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_error(client.post("/v1/completions", content=deep, headers={"content-type": "application/json"}),
                 400, None, "not valid JSON", "recursion limit")
    nested: object = "x"
    for _ in range(MAX_JSON_DEPTH + 1):
        nested = [nested]
    r = post(client, {"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": nested}]},
             "/v1/chat/completions")
    assert_error(r, 400, "messages.0", f"deeper than {MAX_JSON_DEPTH} levels")


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "stop": ["s"] * (MAX_STOP + 1)}, "stop", ["at most"]),
    ({"prompt": ["x"] * (MAX_PROMPTS + 1)}, "prompt", ["at most"]),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias", ["at most"]),
    ({"prompt": "x", "logit_bias": {"hello": 1}}, "logit_bias", ["not a token id"]),
    ({"prompt": "x", "logit_bias": {"5": 500}}, "logit_bias", ["[-100, 100]"]),
    ({"prompt": "x", "seed": 1 << 64}, "seed", ["less than or equal"]),
    ({"prompt": "x", "top_k": 9223372036854775808}, "top_k", ["less than or equal"]),
    ({"prompt": "x", "top_k": True}, "top_k", ["valid integer"]),
    ({"prompt": [1, -2]}, "prompt.1", ["greater than or equal to 0"]),
    ({"prompt": "x", "stop_token_ids": [1 << 40]}, "stop_token_ids.0", ["less than or equal"]),
    ({"prompt": "x", "min_p": 2}, "min_p", ["min_p must be"]),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", ["repetition_penalty must be"]),
])
def test_out_of_range_values_are_400_naming_the_field(client, body, param, words):
    assert_error(post(client, body), 400, param, *words)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_floats_are_400(client, literal):
    body = b'{"prompt": "x", "temperature": ' + literal + b"}"
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("temperature", None), r.text


# ---- fields this server does not implement -----------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("priority", 3), ("use_beam_search", True), ("guided_json", {"type": "object"}), ("guided_regex", "a+"),
    ("best_of", 3), ("prompt_logprobs", 1), ("tool_choice", "auto"), ("include_stop_str_in_output", True),
])
def test_unsupported_fields_that_would_change_the_result_are_400(client, field, value):
    assert_error(post(client, {"prompt": "x", field: value}), 400, field, "not supported")


def test_unknown_fields_are_400_and_harmless_ones_pass(client):
    assert_error(post(client, {"prompt": "x", "temprature": 0.5}), 400, "temprature", "unknown field")
    ok = {"prompt": "x", "max_tokens": 2, "user": "u1", "metadata": {"k": "v"}, "priority": 0,
          "use_beam_search": False, "skip_special_tokens": True, "best_of": 1}
    assert post(client, ok).status_code == 200
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "store": False,
            "tool_choice": "none", "parallel_tool_calls": True}
    assert post(client, chat, "/v1/chat/completions").status_code == 200
    assert_error(post(client, {**chat, "guided_choice": ["a"]}, "/v1/chat/completions"), 400, "guided_choice")


def test_implemented_sampling_fields_reach_the_engine(client, engine):
    body = {"prompt": "x", "max_tokens": 2, "presence_penalty": 0.5, "frequency_penalty": -0.25,
            "repetition_penalty": 1.1, "min_p": 0.05, "logit_bias": {"7": -3.5}, "min_tokens": 1}
    assert post(client, body).status_code == 200
    (params,) = engine.params.values()
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty, params.min_p,
            params.logit_bias, params.min_tokens) == (0.5, -0.25, 1.1, 0.05, ((7, -3.5),), 1)


# ---- backpressure ---------------------------------------------------------------------------------
class FullEngine(AlphabetEngine):
    async def generate(self, prompt, params, request_id):
        raise QueueFull("64 requests are waiting for this server (max_queued_requests=64); retry later")
        yield  # an async generator, like the engine's


def test_a_full_queue_is_429_with_retry_after(tokenizer):
    with TestClient(create_app(OpenAIServer(FullEngine(tokenizer), MODEL)), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "max_queued_requests=64" in err["message"]


# ---- the API key ----------------------------------------------------------------------------------
def test_api_key_guards_v1_and_stats_but_not_health(engine, monkeypatch):
    with TestClient(create_app(OpenAIServer(engine, MODEL), api_key="s3cret"), raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200
        for path in ("/v1/models", "/stats"):
            r = c.get(path)
            assert_error(r, 401, None, "missing API key", code="invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
            assert_error(c.get(path, headers={"Authorization": "Bearer nope"}), 401, None, "incorrect API key",
                         code="invalid_api_key")
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 401
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("arg") == "arg"
    monkeypatch.setenv(API_KEY_ENV, "")
    assert resolve_api_key(None) is None


# ---- nothing slow on the event loop ---------------------------------------------------------------------
def test_a_huge_prompt_stalls_neither_health_nor_another_stream():
    """A prompt that takes seconds to tokenize (the real tiny-llama tokenizer, a context window
    large enough that the text is not refused outright) while /health is polled and another
    request streams: both keep their pace."""
    from vattn_ray.config import resolve_model_path
    from vattn_ray.engine import load_tokenizer

    tok = load_tokenizer(resolve_model_path("builtin:tiny-llama"))
    engine = AlphabetEngine(tok, step_s=0.02)
    engine.config.scheduler.max_model_len = 1 << 22
    server = OpenAIServer(engine, MODEL, max_request_bytes=8 << 20)
    unit = "the quick brown fox jumps over the lazy dog. "
    with TestClient(create_app(server), raise_server_exceptions=False) as c:
        sample = unit * 4500  # ~200 kB: how fast this machine tokenizes
        t0 = time.monotonic()
        server.tokenizer.encode(sample)
        per_char = (time.monotonic() - t0) / len(sample)
        # About 2 s of tokenizing (at least 1.8 MB), within the 8 MiB body limit.
        reps = max(40000, min(int(2.0 / (per_char * len(unit))) + 1, (7 << 20) // len(unit)))
        text = unit * reps
        encode_s = per_char * len(text)
        assert encode_s > 1.0, f"tokenizing takes only {encode_s:.1f} s here; use a longer prompt"
        result = {}

        def huge() -> None:
            result["status"] = c.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).status_code

        gaps: list[float] = []

        def stream() -> None:
            with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 150, "stream": True}) as r:
                last = time.monotonic()
                for _ in r.iter_lines():
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

        threads = [threading.Thread(target=huge), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        health: list[float] = []
        while threads[0].is_alive():
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.05)
        for t in threads:
            t.join()
    assert result["status"] == 200  # the stand-in's context window holds it: served, not refused
    assert len(health) > 10, "the huge request was tokenized while /health was polled"
    # On the event loop the whole tokenization would stall both; off it, only the GIL-bound tail
    # (turning ids into a Python list) can delay them a little.
    assert max(health) < 0.4 * encode_s, f"/health took up to {max(health):.2f} s (tokenizing: {encode_s:.1f} s)"
    assert max(gaps[1:]) < 0.4 * encode_s, f"the other stream stalled for {max(gaps[1:]):.2f} s"


def test_text_that_can_never_fit_is_refused_without_tokenizing(client, engine):
    server_limit = 64 * 4 * 4  # max_model_len x the test vocabulary's longest entry (4 bytes) x 4
    r = post(client, {"prompt": "y" * (server_limit + 1)})
    assert_error(r, 400, "prompt", "far more than this model's maximum context length",
                 code="context_length_exceeded")
    r = post(client, {"model": MODEL, "messages": [{"role": "user", "content": "y" * (server_limit + 1)}]},
             "/v1/chat/completions")
    assert_error(r, 400, "messages", code="context_length_exceeded")
