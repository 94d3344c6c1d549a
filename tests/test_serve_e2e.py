"""End to end, the way a user serves: ``serve run deploy/config.yaml`` in a subprocess (its own
fresh local Ray cluster), then the official `openai` client against the real engine and the
built-in tiny model. Only the HTTP port of the config is changed (to a free one).

Covers completion, chat, streaming to ``[DONE]``, 16 concurrent requests equal to the same greedy
requests one at a time, every kind of bad input, a client that leaves mid-stream (its request is
aborted and the running count drops back), and a clean shutdown with no process left behind.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
import yaml
from serve_run import ROOT, _free_port, _session_processes, _stop, _wait_healthy  # noqa: F401 - shared

CONFIG = ROOT / "deploy" / "config.yaml"
MODEL = "tiny-llama"
PROMPTS = [f"Request {i}: the quick brown fox {'jumps ' * (i % 5)}over the lazy dog" for i in range(16)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`serve run deploy/config.yaml` as shipped: (base URL, the `serve run` process)."""
    from serve_run import serve_run

    with serve_run(yaml.safe_load(CONFIG.read_text()), tmp_path_factory.mktemp("serve")) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    base, _ = served
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(client, prompt: str, max_tokens: int = 24):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)


def test_models_and_health(served, client):
    base, _ = served
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


def test_completion(client):
    c = greedy(client, "The capital of France is", max_tokens=16)
    (choice,) = c.choices
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= c.usage.completion_tokens <= 16
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert greedy(client, "The capital of France is", max_tokens=16).choices[0].text == choice.text


def test_chat(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens >= 1


def test_n_seed_and_logprobs(client):
    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, temperature=1.0,
                                  seed=123, logprobs=2)
    assert sorted(ch.index for ch in c.choices) == [0, 1]
    for ch in c.choices:
        assert len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs) > 0
        assert all(len(top) <= 2 for top in ch.logprobs.top_logprobs)
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, n=2,
                                      temperature=1.0, seed=123)
    assert [ch.text for ch in again.choices] == [ch.text for ch in c.choices]  # seeded: reproducible


def test_streaming_matches_the_whole_answer_and_ends_in_done(served, client):
    base, _ = served
    whole = greedy(client, "Streaming test prompt", max_tokens=20).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="Streaming test prompt", max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert chunks[-1].usage.completion_tokens >= 1
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_concurrent_requests_equal_one_at_a_time(client):
    alone = [greedy(client, p).choices[0].text for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: greedy(client, p).choices[0].text, PROMPTS))
    assert together == alone
    assert len(set(alone)) > 1, "different prompts should not all give the same text"


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 40, "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400, None),
])
def test_bad_input_gets_an_openai_error_not_a_500(served, path, body, status, param):
    base, _ = served
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(f"{base}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and len(err["message"]) > 10


def test_official_client_sees_the_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="word " * 40, max_tokens=500)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_a_client_leaving_mid_stream_frees_its_slot(served):
    base, _ = served

    def stats() -> dict:
        return httpx.get(f"{base}/stats", timeout=10).json()

    before = stats()
    body = {"model": MODEL, "prompt": "A long story:", "max_tokens": 480, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200
            # Keep the iterator referenced: dropping it would close the connection already.
            lines = r.iter_lines()
            data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
            assert len(data) == 3 and "[DONE]" not in data[-1]
            assert stats()["num_running"] == 1, "the request is generating while we read"
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = stats()
        if s["num_running"] == 0 and s["num_client_aborts"] > before["num_client_aborts"]:
            break
        time.sleep(0.2)
    assert s["num_client_aborts"] == before["num_client_aborts"] + 1, s
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    # Stopped early: running to the end takes one engine step per token (480), an abort fewer.
    # (The engine runs ahead of a slow reader, so "fewer" can be hundreds, never 480.)
    assert s["num_steps"] - before["num_steps"] < body["max_tokens"], s


def test_shutdown_is_clean(served):
    """Runs last: Ctrl-C ends `serve run`, which stops Serve and its Ray cluster, leaving nothing."""
    _, proc = served
    assert _stop(proc) == []
    assert proc.returncode is not None, "serve run did not exit on SIGINT"
