"""The HTTP layer's vLLM conventions over the stand-in engine of test_serve_http (no Ray, no model):
/tokenize, /detokenize, /metrics (values checked against the responses), response_format and
structured_outputs, generation_config defaults, served-name lists, echo, chat_template_kwargs.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_serve_http import MAX_MODEL_LEN, AlphabetEngine, make_tokenizer

from deploy.server import OpenAIServer, create_app
from vattn_ray.sampling_params import StructuredOutputsParams

MODEL = "tiny-test"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


class StatsEngine(AlphabetEngine):
    """The stand-in, with the real engine's statistics keys and a structured-output compiler."""

    def __init__(self, tokenizer, defaults: dict | None = None) -> None:
        super().__init__(tokenizer)
        self.config = SimpleNamespace(scheduler=self.config.scheduler,
                                      model=SimpleNamespace(sampling_defaults=defaults or {}))
        self.compiled: list = []

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": 2, "num_groups_mapped": 6,
                "num_groups_free": 4, "num_groups_idle": 2, "capacity_groups": 10, "kv_fragmentation": 0.25,
                "num_preemptions": 3, "groups_mapped_total": 40, "groups_unmapped_total": 34}

    def compile_structured(self, spec) -> None:
        if spec.json and "no-such-type" in spec.json:
            raise ValueError("structured output: cannot compile the json constraint: bad type")
        self.compiled.append(spec)


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                         "{% endfor %}{% if shout %}LOUDLY {% endif %}{% if add_generation_prompt %}[assistant] "
                         "{% endif %}")
    return tok


@pytest.fixture
def engine(tokenizer):
    return StatsEngine(tokenizer)


def client_for(engine, names=MODEL) -> TestClient:
    return TestClient(create_app(OpenAIServer(engine, names)), raise_server_exceptions=False)


@pytest.fixture
def client(engine):
    with client_for(engine) as c:
        yield c


def scrape(client) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    assert key in samples, f"{key} not in {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


# ---- /tokenize and /detokenize -------------------------------------------------------------------
def test_tokenize_a_prompt_and_back(client, tokenizer):
    r = client.post("/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    plain = client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"][1:] and plain["token_strs"] is None  # no BOS
    back = client.post("/detokenize", json={"model": MODEL, "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello world"}


def test_tokenize_messages_gives_exactly_the_chat_prompt(client, engine, tokenizer):
    msgs = [{"role": "user", "content": "Hi"}]
    tokens = client.post("/tokenize", json={"messages": msgs, "chat_template_kwargs": {"shout": True}}).json()
    client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1,
                                              "chat_template_kwargs": {"shout": True}})
    (sent,) = engine.prompts.values()
    assert tokens["tokens"] == sent
    assert tokenizer.decode(sent) == "<s>[user] Hi\nLOUDLY [assistant] "


@pytest.mark.parametrize("path, body, status, param", [
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"nothing": 1}, 400, None),  # neither prompt nor messages
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, None),
    ("/tokenize", {"prompt": "x", "bogus": 1}, 400, "bogus"),  # unknown fields are refused, as elsewhere
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True}, 400,
     "add_special_tokens"),
])
def test_tokenize_errors(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


# ---- /metrics ------------------------------------------------------------------------------------
def test_metrics_count_what_the_responses_returned(client):
    before = scrape(client)
    assert value(before, "vllm:generation_tokens_total") == 0
    assert value(before, "vllm:prefix_cache_queries_total") == value(before, "vllm:prefix_cache_hits_total") == 0
    bodies = [{"prompt": "Hi there", "max_tokens": 5}, {"prompt": ["a", "bb"], "max_tokens": 3, "n": 2},
              {"prompt": "stream me", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}]
    completion, prompt_per_seq, seqs = 0, 0, 0
    for body in bodies:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200
        if body.get("stream"):
            usage = json.loads(r.text.split("data: ")[-2])["usage"]
            n_seq = 1
        else:
            usage, n_seq = r.json()["usage"], len(r.json()["choices"])
        completion += usage["completion_tokens"]
        seqs += n_seq
        prompt_per_seq += usage["prompt_tokens"] * body.get("n", 1)  # each of n counts, as in vLLM
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 2}).json()
    completion += chat["usage"]["completion_tokens"]
    prompt_per_seq += chat["usage"]["prompt_tokens"]
    seqs += 1
    m = scrape(client)
    assert value(m, "vllm:generation_tokens_total") == completion == 5 + 3 * 4 + 4 + 2
    assert value(m, "vllm:prompt_tokens_total") == prompt_per_seq
    assert value(m, "vllm:time_to_first_token_seconds_count") == seqs
    assert value(m, "vllm:e2e_request_latency_seconds_count") == seqs
    assert value(m, "vllm:inter_token_latency_seconds_count") == completion - seqs  # one gap per later token
    assert value(m, "vllm:request_success_total", finished_reason="length") == seqs
    assert value(m, "vllm:request_generation_tokens_sum") == completion
    assert value(m, "vllm:request_prompt_tokens_count") == seqs
    # Engine gauges and counters, from engine.stats() at the scrape.
    assert value(m, "vllm:num_requests_running") == 0 and value(m, "vllm:num_requests_waiting") == 2
    assert value(m, "vllm:kv_cache_usage_perc") == pytest.approx((6 - 2) / 10)
    assert value(m, "vattn:kv_page_groups_mapped") == 6 and value(m, "vattn:kv_page_groups_free") == 4
    assert value(m, "vattn:kv_fragmentation") == 0.25
    assert value(m, "vllm:num_preemptions_total") == 3
    assert value(m, "vattn:kv_page_group_maps_total") == 40 and value(m, "vattn:kv_page_group_unmaps_total") == 34
    assert value(scrape(client), "vllm:num_preemptions_total") == 3  # counters do not double count


# ---- response_format / structured_outputs ----------------------------------------------------------
@pytest.mark.parametrize("path, extra, expected", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": SCHEMA}}},
     StructuredOutputsParams(json=SCHEMA)),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ("/v1/chat/completions", {"response_format": {"type": "text"}}, None),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ("/v1/completions", {"structured_outputs": {"regex": "[ab]+", "disable_any_whitespace": True}},
     StructuredOutputsParams(regex="[ab]+", disable_any_whitespace=True)),
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["x", "y"]}}, StructuredOutputsParams(choice=["x", "y"])),
])
def test_output_constraints_reach_the_engine_compiled(client, engine, path, extra, expected):
    body = {"max_tokens": 2, **extra}
    body.update({"prompt": "p"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "p"}]})
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    (params,) = engine.params.values()
    assert params.structured_outputs == expected
    assert engine.compiled == ([expected] if expected else [])  # compiled before admission


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema"}}, "needs \"json_schema\""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}}, "schema as an object"),
    ({"response_format": {"type": "yaml"}}, "not supported"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "not both"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}},
     "cannot compile"),
])
def test_bad_response_format_is_400(client, extra, words):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "p"}], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and words in err["message"]


def test_bad_structured_outputs_is_400(client):
    for so, words in [({"jsn": {}}, "unsupported field"), ({"json": SCHEMA, "regex": "a"}, "exactly one")]:
        r = client.post("/v1/completions", json={"prompt": "p", "structured_outputs": so})
        assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
        assert words in r.json()["error"]["message"]


# ---- generation_config defaults, served names, echo -------------------------------------------------
def test_generation_config_defaults_fill_only_the_fields_a_request_leaves_out(tokenizer):
    engine = StatsEngine(tokenizer, defaults={"temperature": 0.3, "top_k": 5, "top_p": 0.9, "max_tokens": 6})
    with client_for(engine) as c:
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "temperature": 0.9,
                                             "top_k": -1, "max_tokens": 9})
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": None, "top_p": 1.0})
    first, second, third = engine.params.values()
    assert (first.temperature, first.top_k, first.top_p, first.max_tokens) == (0.3, 5, 0.9, 6)
    assert (second.temperature, second.top_k, second.top_p, second.max_tokens) == (0.9, -1, 0.9, 9)
    assert (third.temperature, third.top_p, third.max_tokens) == (0.3, 1.0, 6)


def test_a_list_of_served_names(engine):
    with client_for(engine, ["primary", "alias"]) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["primary", "alias"]
        r = c.post("/v1/completions", json={"model": "alias", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "primary"
        r = c.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and "['primary', 'alias']" in r.json()["error"]["message"]


def test_echo_puts_the_prompt_first(client, tokenizer):
    r = client.post("/v1/completions", json={"prompt": ["Hi ", "Yo "], "max_tokens": 2, "echo": True})
    assert [c["text"] for c in r.json()["choices"]] == ["Hi ab", "Yo ab"]
    ids = tokenizer.encode("Hey ")
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 2, "echo": True})
    assert r.json()["choices"][0]["text"] == "Hey ab"  # token ids are decoded (special tokens skipped)
    r = client.post("/v1/completions", json={"prompt": "Hi ", "max_tokens": 3, "echo": True, "stream": True})
    texts = [json.loads(e)["choices"][0]["text"] for e in r.text.split("data: ")[1:-1]]
    assert texts[0].startswith("Hi ") and "".join(texts) == "Hi abc"
