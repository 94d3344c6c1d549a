"""`load_model` against transformers on the same random float32 checkpoints.

Prefill logits must agree to float32 precision; greedy decoding of several sequences batched in
different slots (with chunked prefill mixed into decode steps) must give transformers' tokens
exactly. K/V live in the real virtual KV cache (host VMM, 4 KiB pages so pages are crossed).
"""

from __future__ import annotations

import random

import pytest
import torch

from vattn_ray.attention import build_metadata
from vattn_ray.kvcache import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.model import build_random_checkpoint, load_model
from vattn_ray.scheduler.plan import KVOp, SeqChunk

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}  # small, so the scaling bites at tiny head_dim
VARIANTS = {
    "llama3-gqa-untied": ("llama", dict(rope_scaling=LLAMA3_ROPE)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral-gqa": ("mistral", dict(num_hidden_layers=3)),
    "qwen2-bias-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3-qknorm": ("qwen3", dict(head_dim=32, num_hidden_layers=4)),
}
MAX_MODEL_LEN = 128
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    family, overrides = VARIANTS[request.param]
    path = build_random_checkpoint(str(tmp_path_factory.mktemp(request.param)), family, seed=3, **overrides)
    ours = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, ref


def kv_manager(model, layers_per_tensor: int, max_slots: int = 4) -> KVManager:
    layout = KVLayout.build(num_layers=model.num_layers, layers_per_tensor=layers_per_tensor,
                            num_kv_heads=model.num_kv_heads, head_dim=model.head_dim, itemsize=4,
                            page_bytes=4096, max_slots=max_slots, max_model_len=MAX_MODEL_LEN)
    return KVManager.from_budget(layout, "cpu", budget_bytes=max_slots * layout.pages_per_slot
                                 * layout.page_group_bytes, dtype=torch.float32)


def run_step(model, kv: KVManager, chunks: list[SeqChunk]) -> torch.Tensor:
    """Map what the chunks need, run the model, return the logits of every token."""
    lay = kv.layout
    assert not kv.apply([KVOp(c.slot, lay.groups_for_tokens(c.end)) for c in chunks])
    meta = build_metadata(chunks, lay.max_tokens_per_slot, "cpu")
    hidden = model(meta.input_ids, meta.positions, meta, kv.layer_kv)
    return model.compute_logits(hidden)


def prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(sum(lengths))
    return [[rng.randrange(6, vocab) for _ in range(n)] for n in lengths]


def test_prefill_logits_match(models):
    ours, ref = models
    (p,) = prompts(ours.vocab_size, [45])
    with kv_manager(ours, layers_per_tensor=1) as kv:
        logits = run_step(ours, kv, [SeqChunk("a", 2, 0, tuple(p), True)])
    with torch.no_grad():
        expected = ref(torch.tensor([p])).logits[0].float()
    assert logits.shape == (len(p), ours.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def hf_greedy(ref, prompt: list[int], n: int) -> list[int]:
    ref.generation_config.eos_token_id = None  # compare a fixed number of tokens
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=2)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("layers_per_tensor", [1, "all"])
def test_batched_greedy_decode_matches_generate(models, layers_per_tensor):
    ours, ref = models
    g = ours.num_layers if layers_per_tensor == "all" else 1
    lengths, slots, chunk = [5, 23, 40], [3, 0, 1], 16  # prompts longer than `chunk` are chunked
    ps = prompts(ours.vocab_size, lengths)
    state = [{"prompt": p, "done": 0, "out": []} for p in ps]
    with kv_manager(ours, layers_per_tensor=g) as kv:
        while any(len(s["out"]) < NEW_TOKENS for s in state):
            chunks, owners = [], []
            for i, s in enumerate(state):
                if len(s["out"]) == NEW_TOKENS:
                    continue
                if s["done"] < len(s["prompt"]):  # prefill, in chunks, alongside others' decodes
                    ids = s["prompt"][s["done"]:s["done"] + chunk]
                    last = s["done"] + len(ids) == len(s["prompt"])
                    chunks.append(SeqChunk(str(i), slots[i], s["done"], tuple(ids), last, 0))
                    s["done"] += len(ids)
                else:
                    start = len(s["prompt"]) + len(s["out"]) - 1
                    chunks.append(SeqChunk(str(i), slots[i], start, (s["out"][-1],), True, len(s["out"])))
                owners.append(i)
            logits = run_step(ours, kv, chunks)
            ends = torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0) - 1
            tokens = logits[ends].argmax(-1).tolist()
            for c, i, t in zip(chunks, owners, tokens):
                if c.sample:
                    state[i]["out"].append(t)
        kv.check_integrity()
    for s in state:
        assert s["out"] == hf_greedy(ref, s["prompt"], NEW_TOKENS)
