"""Structured output through xgrammar: masks built on the head, applied by the sampler, and the
engine's outputs always parse and validate (built-in random model, nested schema; TP=1 and TP=2).

The random model writes nothing sensible on its own, so every schema bounds its strings, numbers and
arrays: the test is that the grammar, not luck, makes the output valid and lets it end.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import ray
import torch
import xgrammar

from vattn_ray import LLM, SamplingParams
from vattn_ray.sampling import Sampler
from vattn_ray.sampling_params import StructuredOutputsParams
from vattn_ray.scheduler.plan import SeqChunk
from vattn_ray.structured import MAX_WHITESPACE, StructuredOutputs, apply_token_masks, json_schema_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                    "required": ["city", "zip"]},
        "kind": {"enum": ["a", "b", None]},
    },
    "required": ["name", "age", "tags", "address"],
}
PROMPTS = ["Give me a person as JSON:", "Hello", "The quick brown fox", "{"]
ENGINE = dict(device="cpu", max_model_len=512, page_bytes=4096)  # small pages: short slots, fast CPU attention


@pytest.fixture(scope="module")
def llm():
    with LLM("builtin:tiny-llama", **ENGINE) as llm:
        yield llm


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ---- the mask: layout and application --------------------------------------------------------
def test_mask_unpacking_matches_xgrammar_on_random_masks():
    rng = torch.Generator().manual_seed(0)
    vocab, rows = 1000, 5
    words = torch.randint(-2**31, 2**31 - 1, (rows, -(-vocab // 32)), dtype=torch.int32, generator=rng)
    logits = torch.randn(rows, vocab, generator=rng)
    masked_rows = [0, 2, 3]
    chunks = [SeqChunk(f"r{i}", i, 0, (1,), True, 0,
                       words[i].numpy().tobytes() if i in masked_rows else None) for i in range(rows)]
    ours = apply_token_masks(logits, chunks)
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, words, vocab_size=vocab, indices=masked_rows)
    assert torch.equal(ours, expected)
    assert torch.equal(logits[1], ours[1]) and (ours[0] == float("-inf")).any()
    plain = [SeqChunk("r", 0, 0, (1,), True, 0)] * rows
    assert apply_token_masks(logits, plain) is logits  # no masked row: no copy


def test_sampler_draws_only_allowed_tokens_and_reports_raw_logprobs():
    vocab = 64
    allowed = {5, 17, 40}
    words = torch.zeros(1, 2, dtype=torch.int32)
    for t in allowed:
        words[0, t // 32] |= 1 << (t % 32)
    mask = words.numpy().tobytes()
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, 3] = 50.0  # the model's favourite is not allowed
    chunks = [SeqChunk(f"r{i}", i, 0, (1,), True, i, mask) for i in range(4)]
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=1.0, seed=3, logprobs=0),
              SamplingParams(temperature=1.0, logprobs=0), SamplingParams(temperature=0.7, top_k=2)]
    out = Sampler(seed=0).sample(logits, chunks, params)
    assert all(t.token_id in allowed for t in out)
    raw = logits.log_softmax(-1)
    assert out[0].token_id == max(allowed, key=lambda t: logits[0, t])
    assert out[0].logprob == pytest.approx(raw[0, out[0].token_id].item())  # not renormalised
    assert out[0].top_logprobs[0][0] == 3  # the raw top token, though it could not be drawn


def test_length_limited_strings_exclude_control_characters(llm):
    so = llm.engine.structured
    schema = json.dumps({"type": "string", "maxLength": 5})
    matcher = xgrammar.GrammarMatcher(so._get_compiler().compile_grammar(json_schema_grammar(schema, True)))
    assert matcher.accept_string('"')
    words = torch.zeros(1, so.words, dtype=torch.int32)
    matcher.fill_next_token_bitmask(words, 0)
    vocab = xgrammar.TokenizerInfo.from_huggingface(llm.get_tokenizer(), vocab_size=so.vocab_size).decoded_vocab
    allowed = [t for t in range(so.vocab_size) if (int(words[0, t // 32]) >> (t % 32)) & 1]
    assert allowed and not [t for t in allowed if any(b < 0x20 for b in vocab[t])]
    assert any(vocab[t] == b"\\" for t in allowed), "escapes stay allowed"
    assert f"{{0, {MAX_WHITESPACE}}}" in str(json_schema_grammar('{"type": "object"}', True))


def test_params_validation():
    assert StructuredOutputsParams(json=PERSON) == StructuredOutputsParams(json=json.dumps(PERSON))
    assert hash(SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"])))
    for bad in [dict(), dict(json=PERSON, regex="a+"), dict(json="{not json"), dict(choice=[]),
                dict(choice="ab"), dict(regex="")]:
        with pytest.raises(ValueError, match="structured_outputs"):
            StructuredOutputsParams(**bad)
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"json": PERSON})


# ---- the engine ---------------------------------------------------------------------------------
def _check_all_valid(outs, count: int) -> None:
    assert sum(len(out.outputs) for out in outs) == count
    for out in outs:
        for o in out.outputs:
            assert o.finish_reason == "stop", (o.finish_reason, o.text)
            _valid(o.text, PERSON)


def test_nested_schema_greedy_always_valid(llm):
    """The default grammar: JSON with (bounded) free whitespace, as OpenAI's json_schema is served."""
    spec = StructuredOutputsParams(json=PERSON)
    _check_all_valid(llm.generate(PROMPTS, SamplingParams(max_tokens=480, temperature=0.0, structured_outputs=spec)),
                     len(PROMPTS))
    llm.engine.check_integrity()
    assert not llm.engine.structured.needs_sync(), "finished requests drop their matchers"


def test_nested_schema_seeded_n2_always_valid_and_reproducible(llm):
    spec = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    seeded = SamplingParams(max_tokens=480, temperature=1.0, seed=11, n=2, structured_outputs=spec)
    outs = llm.generate(PROMPTS[:2], seeded)
    _check_all_valid(outs, 4)
    assert all('": ' in o.text and "\n" not in o.text for out in outs for o in out.outputs)
    again = llm.generate(PROMPTS[:1], seeded)
    assert [o.text for o in again[0].outputs] == [o.text for o in outs[0].outputs]


def test_choice_regex_json_object_and_grammar(llm):
    def run(spec, max_tokens=200):
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=5,
                                                    structured_outputs=spec))
        assert all(o.outputs[0].finish_reason == "stop" for o in outs)
        return [o.outputs[0].text for o in outs]

    choices = ["yes", "no", 'maybe "so"']
    assert set(run(StructuredOutputsParams(choice=choices))) <= set(choices)
    import re
    for text in run(StructuredOutputsParams(regex=r"[a-z]{3,8}@[a-z]{2,5}\.com")):
        assert re.fullmatch(r"[a-z]{3,8}@[a-z]{2,5}\.com", text)
    for text in run(StructuredOutputsParams(json_object=True)):
        assert isinstance(json.loads(text), dict)
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for text in run(StructuredOutputsParams(grammar=grammar)):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text)


def test_unconstrained_requests_in_the_same_batch_are_unchanged(llm):
    plain = SamplingParams(max_tokens=12, temperature=0.0)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain)]
    spec = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    mixed = llm.generate(PROMPTS * 2, [plain] * 4 + [SamplingParams(max_tokens=480, temperature=0.0,
                                                                    structured_outputs=spec)] * 4)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    assert all(_valid(o.outputs[0].text, PERSON) for o in mixed[4:])


def test_invalid_schema_is_refused_at_admission(llm):
    bad = StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(ValueError, match="cannot compile the json constraint"):
        llm.engine.add_request("bad", "x", SamplingParams(structured_outputs=bad))
    assert "bad" not in llm.engine.requests and not llm.engine.structured.needs_sync()


def test_a_stale_mask_is_refused(llm):
    so = StructuredOutputs(llm.get_tokenizer(), llm.engine.vocab_size, llm.engine.eos_token_ids)
    so.add("r", StructuredOutputsParams(json_object=True))
    assert so.needs_sync() and so.needs_sync("r") and not so.needs_sync("other")
    (chunk,) = so.annotate((SeqChunk("r", 0, 0, (1, 2), True, 0),))
    assert chunk.token_mask is not None and len(chunk.token_mask) == 4 * so.words
    with pytest.raises(RuntimeError, match="needs_sync"):
        so.annotate((SeqChunk("r", 0, 2, (3,), True, 1),))  # its token 0 was never accepted


def test_preemption_and_recompute_keep_the_grammar_state():
    """A pool for about two requests at once: six constrained requests take turns, are preempted
    and recomputed, and every output still validates."""
    probe = LLM("builtin:tiny-llama", device="cpu", max_model_len=256, page_bytes=4096)
    group = probe.engine.layout.page_group_bytes
    per_group = probe.engine.layout.tokens_per_group
    probe.shutdown()
    groups = int(2.2 * 256 / per_group) + 1
    with LLM("builtin:tiny-llama", device="cpu", max_model_len=256, page_bytes=4096,
             kv_cache_memory_bytes=groups * group) as llm:
        spec = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
        prompts = [[random.Random(i).randrange(10, 500) for _ in range(60)] for i in range(6)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=190, temperature=1.0, seed=2,
                                                    structured_outputs=spec))
        assert llm.engine.stats()["num_preemptions"] > 0
        for o in outs:
            assert o.outputs[0].finish_reason == "stop"
            _valid(o.outputs[0].text, PERSON)
        llm.engine.check_integrity()


def test_tensor_parallel_2_returns_valid_json():
    """TP=2 on CPU: the masks travel in the plan to both Ray worker actors; rank 0 samples."""
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        with LLM("builtin:tiny-llama", tensor_parallel_size=2, **ENGINE) as llm:
            spec = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
            outs = llm.generate(PROMPTS, SamplingParams(max_tokens=480, temperature=0.0, structured_outputs=spec))
            texts = [o.outputs[0].text for o in outs]
            for o in outs:
                assert o.outputs[0].finish_reason == "stop"
                _valid(o.outputs[0].text, PERSON)
        with LLM("builtin:tiny-llama", **ENGINE) as tp1:
            same = tp1.generate(PROMPTS, SamplingParams(max_tokens=480, temperature=0.0, structured_outputs=spec))
        assert [o.outputs[0].text for o in same] == texts  # float32 on CPU: TP=2 greedy == TP=1
    finally:
        ray.shutdown()
