"""The offline API's vLLM conventions: `LLM.chat`, generation_config.json sampling defaults, the
start-up check that one full-length request fits the KV pool, and Hugging Face repo ids."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from vattn_ray import LLM, SamplingParams
from vattn_ray.chat import apply_chat_template
from vattn_ray.config import EngineArgs, resolve_model_path
from vattn_ray.startup import sampling_defaults

ENGINE = dict(device="cpu", max_model_len=256)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def llm():
    with LLM("builtin:tiny-llama", **ENGINE) as llm:
        yield llm


@pytest.fixture
def checkpoint(tmp_path):
    """A copy of the built-in checkpoint that a test may add a generation_config.json to."""
    path = tmp_path / "ckpt"
    shutil.copytree(resolve_model_path("builtin:tiny-llama"), path)
    (path / "generation_config.json").unlink(missing_ok=True)
    return path


# ---- LLM.chat ---------------------------------------------------------------------------------
def test_chat_equals_generate_on_the_rendered_template(llm):
    params = SamplingParams(max_tokens=10, temperature=0.0)
    (out,) = llm.chat(MESSAGES, params)
    text, ids = apply_chat_template(llm.get_tokenizer(), MESSAGES)
    assert text.startswith("<|bos|><|system|>\nBe brief.<|eos|>") and text.endswith("<|assistant|>\n")
    assert out.prompt == text and out.prompt_token_ids == ids
    assert ids[0] == llm.get_tokenizer().bos_token_id and ids[1] != ids[0]  # BOS once, not twice
    (same,) = llm.generate([ids], params)
    assert out.outputs[0].token_ids == same.outputs[0].token_ids and len(same.outputs[0].token_ids) >= 1


def test_chat_batches_conversations_and_passes_template_kwargs(llm):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if shout %}LOUD {% endif %}{% if add_generation_prompt %}assistant:{% endif %}")
    outs = llm.chat([MESSAGES, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]],
                    SamplingParams(max_tokens=3, temperature=0.0), chat_template=template,
                    chat_template_kwargs={"shout": True})
    assert [o.prompt for o in outs] == ["system: Be brief.\nuser: Say hello\nLOUD assistant:",
                                        "user: Hi\nLOUD assistant:"]
    (cont,) = llm.chat(MESSAGES + [{"role": "assistant", "content": "Hel"}],
                       SamplingParams(max_tokens=2, temperature=0.0), add_generation_prompt=False,
                       continue_final_message=True)
    assert cont.prompt.endswith("<|assistant|>\nHel")  # the reply continues, no end-of-turn token


@pytest.mark.parametrize("messages, words", [
    ([], "empty"),
    ([{"content": "x"}], "'role'"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
])
def test_chat_rejects_bad_messages(llm, messages, words):
    with pytest.raises(ValueError, match=words):
        llm.chat(messages)


# ---- generation_config.json defaults -------------------------------------------------------------
def test_generation_config_defaults_apply_only_when_no_params_are_given(checkpoint):
    (checkpoint / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "top_k": 20, "top_p": 0.8, "max_new_tokens": 7, "do_sample": True,
         "repetition_penalty": 1.1, "eos_token_id": 1}))
    assert sampling_defaults(str(checkpoint)) == {
        k: v for k, v in {"temperature": 0.0, "top_k": 20, "top_p": 0.8, "max_tokens": 7,
                          "repetition_penalty": 1.1}.items()
        if k in SamplingParams.__dataclass_fields__}  # only what the sampler implements
    assert sampling_defaults(str(checkpoint), "vllm") == {}
    (checkpoint / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "top_k": 20, "top_p": 0.8, "max_new_tokens": 7}))
    with LLM(str(checkpoint), **ENGINE) as llm:
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_tokens) == (0.0, 20, 0.8, 7)
        (out,) = llm.generate(["Hello there"])  # greedy with 7 tokens, from the file
        assert len(out.outputs[0].token_ids) <= 7
        (greedy,) = llm.generate(["Hello there"], SamplingParams(temperature=0.0, max_tokens=7))
        assert out.outputs[0].token_ids == greedy.outputs[0].token_ids
        (own,) = llm.generate(["Hello there"], SamplingParams(max_tokens=3))  # params given: file unused
        assert len(own.outputs[0].token_ids) <= 3
    with LLM(str(checkpoint), generation_config="vllm", **ENGINE) as llm:
        assert llm.get_default_sampling_params() == SamplingParams()


def test_a_bad_generation_config_is_a_clear_start_up_error(checkpoint, tmp_path):
    (checkpoint / "generation_config.json").write_text(json.dumps({"temperature": -3}))
    with pytest.raises(ValueError, match="generation_config.json.*temperature.*'vllm' to ignore"):
        EngineArgs(model=str(checkpoint)).resolve()
    with pytest.raises(ValueError, match="no generation_config.json there"):
        EngineArgs(model=str(checkpoint), generation_config=str(tmp_path / "none")).resolve()


# ---- max_model_len against the KV pool --------------------------------------------------------
def test_refuses_to_start_when_a_full_length_request_cannot_fit(checkpoint):
    probe = LLM(str(checkpoint), page_bytes=4096, **ENGINE)
    group, per_group = probe.engine.layout.page_group_bytes, probe.engine.layout.tokens_per_group
    probe.shutdown()
    groups = int(100 / per_group)  # ~100 tokens of KV, max_model_len 256
    with pytest.raises(ValueError, match=r"max_model_len=256 needs \d+ KV page groups .* Lower max_model_len "
                                         r"to at most \d+"):
        LLM(str(checkpoint), page_bytes=4096, kv_cache_memory_bytes=groups * group, **ENGINE)
    most = int(groups * per_group) + 1
    with LLM(str(checkpoint), page_bytes=4096, kv_cache_memory_bytes=groups * group, device="cpu",
             max_model_len=most) as llm:  # the suggested value starts
        (out,) = llm.generate([[5] * (most - 20)], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 20


# ---- Hugging Face repo ids ----------------------------------------------------------------------
def test_a_repo_id_loads_from_the_hub_cache(checkpoint, tmp_path, monkeypatch):
    """Offline (no network in CI): a cache holding the repo is what a second start would find."""
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert os.path.samefile(resolve_model_path("acme/tiny"), snapshot)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a Hugging Face repo"):
        resolve_model_path("acme/missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EngineArgs(model=str(tmp_path / "not-a-dir")).resolve()
