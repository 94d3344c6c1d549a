"""The random-checkpoint builder: deterministic, loadable by transformers, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vattn_ray.model import build_random_checkpoint, ensure_builtin_model, load_model
from vattn_ray.model.builder import PRESETS, make_config, weight_shapes


def files_of(path: str) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def test_deterministic_and_seed_dependent(tmp_path):
    a = build_random_checkpoint(str(tmp_path / "a"), "qwen2", seed=5)
    b = build_random_checkpoint(str(tmp_path / "b"), "qwen2", seed=5)
    c = build_random_checkpoint(str(tmp_path / "c"), "qwen2", seed=6)
    assert files_of(a) == files_of(b)
    assert files_of(a)["model.safetensors"] != files_of(c)["model.safetensors"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_loads_with_transformers(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_random_checkpoint(str(tmp_path), family, dtype="bfloat16", vocab_size=700)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == json.load(open(os.path.join(path, "config.json")))["architectures"][0]
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 700
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 700
    assert isinstance(tok.decode(list(range(700))), str)  # every id decodes
    ids = tok("The harbour town woke.")["input_ids"]
    assert ids[0] == tok.bos_token_id == model.config.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "The harbour town woke."
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|assistant|>\n") and "hi" in chat


def test_sharded_checkpoint_matches_single_file(tmp_path):
    one = build_random_checkpoint(str(tmp_path / "one"), "llama", seed=1)
    many = build_random_checkpoint(str(tmp_path / "many"), "llama", seed=1, max_shard_bytes=60_000)
    index = json.load(open(os.path.join(many, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2
    a = load_model(one, dtype=torch.float32, device="cpu").state_dict()
    b = load_model(many, dtype=torch.float32, device="cpu").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llama_3_8b_preset_has_the_real_parameter_count():
    cfg = make_config("llama", "bfloat16", **PRESETS["llama-3-8b"])
    total = sum(torch.Size(s).numel() for s in weight_shapes(cfg, "llama").values())
    assert total == 8_030_261_248
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 500000.0


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    path = build_random_checkpoint(str(tmp_path), "llama")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="LlamaForSequenceClassification.*Qwen3ForCausalLM"):
        load_model(path, dtype=torch.float32, device="cpu")


def test_unknown_family_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="qwen3"):
        build_random_checkpoint(str(tmp_path), "gpt2")


def test_ensure_builtin_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VATTN_RAY_CACHE", str(tmp_path))
    path = ensure_builtin_model("tiny-llama")
    assert path == os.path.join(str(tmp_path), "models", "tiny-llama")
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    assert ensure_builtin_model("tiny-llama") == path
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
    assert sorted(os.listdir(os.path.join(str(tmp_path), "models"))) == ["tiny-llama"]  # no temp dirs left
    assert load_model(path, dtype=torch.float32, device="cpu").num_layers == PRESETS["tiny"]["num_hidden_layers"]
    with pytest.raises(ValueError, match="tiny-llama"):
        ensure_builtin_model("no-such-model", cache_dir=str(tmp_path))


def test_the_70b_preset_has_the_llama_3_70b_shape():
    """The TP=4/8 benchmark's checkpoint: 80 layers, hidden 8192, 64 q / 8 kv heads, ~70.6B params."""
    from vattn_ray.model.builder import PRESETS, make_config

    c = make_config("llama", "bfloat16", **PRESETS["llama-3-70b"])
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (80, 8192, 64, 8, 28672, 128256)
    head = c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * head * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
    layer = attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    params = c.num_hidden_layers * layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size
    assert 70.5e9 < params < 70.6e9


def test_streamed_build_loads_through_the_normal_path(tmp_path):
    """Weights drawn by torch on a device and streamed to the files (the large-checkpoint build,
    run here on the host): standard safetensors, same names and shapes, deterministic, same law."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    kw = dict(seed=3, dtype="bfloat16", max_shard_bytes=150_000, generate_on="cpu")
    a = build_random_checkpoint(str(tmp_path / "a"), "llama", **kw)
    b = build_random_checkpoint(str(tmp_path / "b"), "llama", **kw)
    ref = build_random_checkpoint(str(tmp_path / "ref"), "llama", seed=3, dtype="bfloat16", max_shard_bytes=150_000)
    assert files_of(a) == files_of(b)
    index = json.load(open(os.path.join(a, "model.safetensors.index.json")))
    assert index["weight_map"] == json.load(open(os.path.join(ref, "model.safetensors.index.json")))["weight_map"]
    ours = load_model(a, dtype=torch.bfloat16, device="cpu").state_dict()
    theirs = load_model(ref, dtype=torch.bfloat16, device="cpu").state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].shape == theirs[k].shape and not torch.equal(ours[k], theirs[k]), k
        x, y = ours[k].float(), theirs[k].float()
        center, half = (1.0, 0.1 * 3 ** 0.5) if k.endswith("norm.weight") else (0.0, 0.2 * 3 ** 0.5)
        assert (x - center).abs().max() <= half * 1.01, k  # U(center - half, center + half), bf16-rounded
        if x.numel() >= 4096:  # large enough for the moments to match closely
            assert abs(x.mean() - y.mean()) < 0.05 * y.std() and abs(x.std() - y.std()) < 0.05 * y.std(), k
    for fname in set(index["weight_map"].values()):
        with safe_open(os.path.join(a, fname), framework="pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    hf = AutoModelForCausalLM.from_pretrained(a)  # transformers reads the files too
    assert torch.equal(hf.model.embed_tokens.weight, ours["embed_tokens.weight"])
