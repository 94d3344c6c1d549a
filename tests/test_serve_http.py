"""The OpenAI HTTP layer (deploy/server.py) over an injected stand-in engine: request validation,
error bodies, SSE framing, usage, n, logprobs. Fast: no Ray, no model.

The stand-in engine writes the alphabet (choice i starts at letter i), so every expected text is
known; the real engine is exercised by tests/test_serve_e2e.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

from deploy.protocol import ChatCompletionRequest, CompletionRequest
from deploy.server import OpenAIServer, create_app
from vattn_ray.async_engine import EngineDeadError
from vattn_ray.outputs import CompletionOutput, RequestOutput

MODEL = "tiny-test"
MAX_MODEL_LEN = 64
REFUSED_TOKEN = ord("~")  # a prompt starting with "~" is refused by the stand-in engine


def make_tokenizer():
    """A real Hugging Face tokenizer (byte level, BOS added, with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    return hf


class AlphabetEngine:
    """Implements the AsyncLLMEngine surface the server uses; generates letters deterministically."""

    def __init__(self, tokenizer, step_s: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_model_len=MAX_MODEL_LEN, max_num_seqs=8))
        self.step_s = step_s
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.prompts: dict[str, list[int]] = {}
        self.params: dict[str, object] = {}
        self.healthy = True

    def letter_id(self, step: int, index: int) -> int:
        return self.tokenizer.convert_tokens_to_ids(chr(ord("a") + (step + index) % 26))

    async def generate(self, prompt, params, request_id):
        if not self.healthy:
            raise EngineDeadError("engine loop stopped: worker died")
        ids = list(prompt)
        if self.tokenizer.decode(ids[:4], skip_special_tokens=True).startswith(chr(REFUSED_TOKEN)):
            raise ValueError("prompt starts with '~', which this engine refuses; remove it")
        self.prompts[request_id], self.params[request_id] = ids, params
        self.running.add(request_id)
        outs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                for i in range(params.n)]
        try:
            for step in range(params.max_tokens):
                await asyncio.sleep(self.step_s)
                last = step == params.max_tokens - 1
                for o in outs:
                    tid = self.letter_id(step, o.index)
                    piece = self.tokenizer.decode([tid])
                    o.token_ids.append(tid)
                    o.text += piece
                    o.delta_token_ids, o.delta_text = [tid], piece
                    if o.logprobs is not None:
                        alternatives = {self.letter_id(step, o.index + j): -1.0 - j for j in range(1, params.logprobs + 1)}
                        o.logprobs.append({tid: -0.25, **alternatives})
                    o.finish_reason = "length" if last else None
                yield RequestOutput(request_id, None, ids,
                                    [dataclasses.replace(o, token_ids=list(o.token_ids)) for o in outs],
                                    finished=last)
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_groups_mapped": 3,
                "kv_groups_free": 5, "kv_fragmentation": 0.25, "num_preemptions": 0}

    def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("engine loop died")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def engine(tokenizer):
    return AlphabetEngine(tokenizer)


@pytest.fixture
def server(engine):
    return OpenAIServer(engine, MODEL)


@pytest.fixture
def client(server):
    with TestClient(create_app(server), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def oai(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def sse_events(response) -> list[str]:
    """The `data:` payloads of an SSE body; checks the framing (every event ends in a blank line)."""
    body = response.text
    assert body.endswith("\n\n"), "an SSE body ends with a blank line"
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        events.append(block[len("data: "):])
    return events


# ---- happy paths ----------------------------------------------------------------------------
def test_models_health_and_stats(client, engine):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get("/health").json() == {"status": "ok"}
    stats = client.get("/stats").json()
    assert stats["kv_groups_free"] == 5 and stats["num_client_aborts"] == 0
    engine.healthy = False
    r = client.get("/health")
    assert r.status_code == 503 and "engine loop died" in r.json()["error"]


def test_completion_text_and_usage(client, tokenizer):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi there", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": "abcde", "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(tokenizer.encode("Hi there"))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                             "total_tokens": prompt_tokens + 5, "prompt_tokens_details": {"cached_tokens": 0}}


def test_sampling_fields_reach_the_engine(client, engine):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "temperature": 0, "top_p": 0.5,
                                              "seed": 7, "stop": ["zz"], "top_k": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text
    (params,) = engine.params.values()
    assert (params.temperature, params.top_p, params.seed, params.stop, params.top_k, params.ignore_eos,
            params.max_tokens) == (0, 0.5, 7, ("zz",), 4, True, 3)


def test_n_and_batched_prompts_number_choices_like_openai(client, tokenizer):
    r = client.post("/v1/completions", json={"prompt": ["one", "three"], "max_tokens": 3, "n": 2})
    body = r.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "abc"), (1, "bcd"), (2, "abc"), (3, "bcd")]
    prompt_tokens = len(tokenizer.encode("one")) + len(tokenizer.encode("three"))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                             "total_tokens": prompt_tokens + 12, "prompt_tokens_details": {"cached_tokens": 0}}


def test_token_id_prompts_are_accepted(client, engine):
    r = client.post("/v1/completions", json={"prompt": [0, 70, 71], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    assert list(engine.prompts.values()) == [[0, 70, 71]]


def test_chat_applies_the_template_and_fills_the_context_by_default(client, engine, tokenizer):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abcd"}
    (ids,) = engine.prompts.values()
    assert tokenizer.decode(ids) == "<s>[system] Be brief.\n[user] Hello\n[assistant] "
    assert body["usage"]["prompt_tokens"] == len(ids)
    # Without max_tokens the reply may use the rest of the context (OpenAI's behaviour).
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}]})
    assert r.json()["usage"]["total_tokens"] == MAX_MODEL_LEN


def test_official_client_completion_chat_and_models(oai):
    assert [m.id for m in oai.models.list()] == [MODEL]
    c = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=4, n=2)
    assert sorted(ch.text for ch in c.choices) == ["abcd", "bcde"] and c.usage.completion_tokens == 8
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert chat.choices[0].message.content == "abc" and chat.choices[0].finish_reason == "length"


# ---- streaming ------------------------------------------------------------------------------
def test_completion_stream_framing_usage_and_done(client):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "n": 2, "stream": True,
                                              "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = {0: "", 1: ""}
    finishes = {}
    for ch in chunks[:-1]:
        assert ch["object"] == "text_completion" and len(ch["choices"]) == 1
        (choice,) = ch["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            assert choice["index"] not in finishes, "one finish_reason per choice"
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "abcd", 1: "bcde"} and finishes == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_chat_stream_opens_with_the_role_and_matches_the_non_streamed_text(oai):
    msgs = [{"role": "user", "content": "Hi"}]
    stream = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5)
    assert text == whole.choices[0].message.content == "abcde"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_without_include_usage_has_no_usage_chunk(client):
    events = sse_events(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True}))
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["choices"] for ch in chunks) and "usage" not in chunks[-1]


# ---- logprobs -------------------------------------------------------------------------------
def test_completion_logprobs_shape(client):
    body = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["token_logprobs"] == [-0.25] * 3
    assert lp["top_logprobs"][0] == {"a": -0.25, "b": -2.0}  # the two most likely, best first
    assert lp["text_offset"] == [0, 1, 2]


def test_completion_logprobs_stream_offsets_continue(client):
    events = sse_events(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "logprobs": 1,
                                                             "stream": True}))
    lps = [json.loads(e)["choices"][0]["logprobs"] for e in events[:-1]]
    assert [t for lp in lps for t in lp["tokens"]] == ["a", "b", "c"]
    assert [o for lp in lps for o in lp["text_offset"]] == [0, 1, 2]


def test_chat_logprobs_shape(oai):
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == ["a", "b"] and content[0].logprob == -0.25
    assert content[0].bytes == [97]
    assert [t.token for t in content[0].top_logprobs] == ["a", "b", "c"]
    plain = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


# ---- errors: always an OpenAI body, 400 for bad input ------------------------------------------
def assert_error(r, status: int, param: str | None, *words: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == code
    for w in words:
        assert w in err["message"], err["message"]
    return err


def test_unknown_model_is_openais_404(client):
    r = client.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"})
    assert_error(r, 404, "model", "gpt-17", MODEL, code="model_not_found")


def test_malformed_json_is_400(client):
    r = client.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert_error(r, 400, None, "not valid JSON")
    r = client.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": ""}, "prompt", ["empty"]),
    ({"prompt": []}, "prompt", ["empty"]),
    ({"prompt": [[]]}, "prompt", ["empty"]),
    ({}, "prompt", ["missing required field"]),
    ({"prompt": "x", "temperature": -1}, "temperature", ["temperature must be a finite number in [0, 100]"]),
    ({"prompt": "x", "top_p": 0}, "top_p", ["top_p"]),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", ["max_tokens must be"]),
    ({"prompt": "x", "n": 0}, "n", ["n must be"]),
    ({"prompt": "x", "n": 9}, "n", ["max_num_seqs=8"]),
    ({"prompt": "x", "logprobs": 50}, "logprobs", ["logprobs must be"]),
    ({"prompt": "x", "stop": [""]}, "stop.0", ["stop"]),
    ({"prompt": "x", "temperature": "hot"}, "temperature", ["valid number"]),
    ({"prompt": "x", "presence_penalty": 5}, "presence_penalty", ["presence_penalty must be", "[-2, 2]"]),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo", ["not supported"]),
    ({"prompt": "~refused"}, "prompt", ["refuses"]),
])
def test_bad_completion_input_is_400_naming_the_field(client, body, param, words):
    assert_error(client.post("/v1/completions", json=body), 400, param, *words)


def test_prompt_plus_max_tokens_beyond_the_context_is_400(client, tokenizer):
    prompt = "word " * 10
    n = len(tokenizer.encode(prompt))
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_MODEL_LEN})
    assert_error(r, 400, "max_tokens", f"maximum context length is {MAX_MODEL_LEN}",
                 f"at most {MAX_MODEL_LEN - n}", code="context_length_exceeded")
    r = client.post("/v1/completions", json={"prompt": "x" * (MAX_MODEL_LEN + 5)})
    assert_error(r, 400, "prompt", "shorten the prompt", code="context_length_exceeded")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]})
    assert_error(r, 400, "messages", "shorten the prompt", code="context_length_exceeded")


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", ["empty"]),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", ["logprobs: true"]),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30}, "top_logprobs", ["[0, 20]"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", ["only text"]),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 500}, "max_completion_tokens",
     ["context length"]),
    ({"messages": [{"content": "x"}]}, "messages.0.role", ["missing"]),
])
def test_bad_chat_input_is_400(client, body, param, words):
    code = "context_length_exceeded" if "context length" in words else None
    assert_error(client.post("/v1/chat/completions", json=body), 400, param, *words, code=code)


def test_official_client_raises_bad_request_with_the_message(oai):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        oai.completions.create(model=MODEL, prompt="x", top_p=2.0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_a_dead_engine_is_503_not_a_bad_request(client, engine):
    engine.healthy = False
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "server_error" and "worker died" in r.json()["error"]["message"]


def test_unknown_route_is_an_openai_404(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


# ---- disconnects free the engine -------------------------------------------------------------
def test_leaving_a_stream_aborts_every_unfinished_request(tokenizer):
    engine = AlphabetEngine(tokenizer, step_s=0.01)
    server = OpenAIServer(engine, MODEL)

    async def scenario():
        req = CompletionRequest(prompt=["a", "b"], max_tokens=50, stream=True)
        response = await server.completions(req)
        events = response.body_iterator
        first = await events.__anext__()
        assert first.startswith("data: ")
        assert len(engine.running) == 2
        await events.aclose()  # what the ASGI server does when the client goes away
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert len(engine.aborted) == 2 and not engine.running
    assert asyncio.run(server.stats())["num_client_aborts"] == 1


def test_cancelling_a_non_streamed_request_aborts_it(tokenizer):
    engine = AlphabetEngine(tokenizer, step_s=0.01)
    server = OpenAIServer(engine, MODEL)

    async def scenario():
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=30)
        task = asyncio.create_task(server.chat(req))
        await asyncio.sleep(0.1)
        task.cancel()  # Serve cancels the handler when the HTTP client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(engine.aborted) == 1 and not engine.running


def test_finished_requests_are_not_aborted(client, engine):
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert engine.aborted == [] and client.get("/stats").json()["num_client_aborts"] == 0
