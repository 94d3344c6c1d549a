"""The sdpa backend against a naive per-sequence reference, on mixed prefill/decode batches; backend choice."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import pytest
import torch

from vattn_ray.attention import build_metadata, get_backend, resolve_backend
from vattn_ray.config import EngineArgs
from vattn_ray.kvcache import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.plan import KVOp, SeqChunk


def chunk(slot: int, start: int, n: int, sample: bool = True) -> SeqChunk:
    return SeqChunk(f"r{slot}", slot, start, tuple(range(3, 3 + n)), sample)


def reference(q, k_cache, v_cache, seqs, scale):
    """Per sequence, per query: softmax over keys at positions <= the query's position."""
    outs = []
    group = q.shape[1] // k_cache.shape[2]
    t = 0
    for s in seqs:
        k = k_cache[s.slot, :s.end].repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[s.slot, :s.end].repeat_interleave(group, dim=1)
        for i in range(len(s.token_ids)):
            pos = s.start + i
            w = torch.einsum("hd,lhd->hl", q[t], k[:pos + 1]) * scale
            outs.append(torch.einsum("hl,lhd->hd", w.softmax(-1), v[:pos + 1]))
            t += 1
    return torch.stack(outs)


# decode, prefill from 0, a later chunk of a chunked prefill, a one-token prefill; slots out of order
MIXED = [chunk(3, 10, 1), chunk(0, 0, 7), chunk(2, 5, 4, sample=False), chunk(1, 0, 1)]


@pytest.mark.parametrize("layers_per_tensor,layer", [(1, 0), (3, 1)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_sdpa_matches_reference(layers_per_tensor, layer, heads, kv_heads):
    torch.manual_seed(0)
    slots, m, d = 4, 16, 8
    # A G-layer tensor viewed at one layer: a stride gap between tokens, like the virtual cache.
    k_full = torch.randn(slots, m, layers_per_tensor, kv_heads, d)
    v_full = torch.randn(slots, m, layers_per_tensor, kv_heads, d)
    k_cache, v_cache = k_full[:, :, layer], v_full[:, :, layer]
    meta = build_metadata(MIXED, m, "cpu")
    q = torch.randn(meta.num_tokens, heads, d)
    k_new = torch.randn(meta.num_tokens, kv_heads, d)
    v_new = torch.randn(meta.num_tokens, kv_heads, d)
    backend = get_backend("sdpa")
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, backend.prepare(meta), d ** -0.5)
    # The new K/V landed in their slots' rows of the shared (strided) storage ...
    t = 0
    for s in MIXED:
        n = len(s.token_ids)
        assert torch.equal(k_full[s.slot, s.start:s.end, layer], k_new[t:t + n])
        assert torch.equal(v_full[s.slot, s.start:s.end, layer], v_new[t:t + n])
        t += n
    # ... and attention over them matches the naive computation.
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, MIXED, d ** -0.5), rtol=1e-5, atol=1e-5)


def test_metadata_fields():
    meta = build_metadata(MIXED, 16, "cpu")
    assert (meta.num_seqs, meta.num_tokens, meta.max_seqlen_q, meta.max_seqlen_k) == (4, 13, 7, 11)
    assert meta.cu_seqlens_q.tolist() == [0, 1, 8, 12, 13]
    assert meta.seq_lens.tolist() == [11, 7, 9, 1]
    assert meta.cu_seqlens_k.tolist()[:4] == [48, 0, 32, 16]
    assert meta.positions.tolist() == [10, *range(7), 5, 6, 7, 8, 0]
    assert meta.slot_mapping.tolist() == [58, *range(7), 37, 38, 39, 40, 16]
    assert meta.sample_indices.tolist() == [0, 7, 12]  # the chunked-prefill chunk is not sampled
    assert meta.cu_seqlens_q.dtype == meta.seq_lens.dtype == torch.int32


def test_metadata_rejects_chunk_past_slot_end():
    with pytest.raises(ValueError, match="positions"):
        build_metadata([chunk(0, 14, 3)], 16, "cpu")


def test_sdpa_reads_only_mapped_kv_pages():
    """On the real host-VMM cache, unmapped pages are PROT_NONE: any read past a sequence's mapped
    pages would crash the process. A short sequence batched with a long one must stay in bounds."""
    layout = KVLayout.build(num_layers=2, layers_per_tensor=2, num_kv_heads=2, head_dim=16, itemsize=4,
                            page_bytes=4096, max_slots=3, max_model_len=512)
    seqs = [chunk(0, 2, 1), chunk(2, 0, 200)]  # slot 0: one page; slot 2: many
    with KVManager.from_budget(layout, "cpu", budget_bytes=64 * layout.page_group_bytes,
                               dtype=torch.float32) as kv:
        assert not kv.apply([KVOp(0, layout.groups_for_tokens(3)), KVOp(2, layout.groups_for_tokens(200))])
        k_cache, v_cache = kv.layer_kv(1)
        k_cache[0, :2] = torch.randn(2, 2, 16)  # the decode sequence's context
        v_cache[0, :2] = torch.randn(2, 2, 16)
        meta = build_metadata(seqs, layout.max_tokens_per_slot, "cpu")
        torch.manual_seed(1)
        q = torch.randn(meta.num_tokens, 4, 16)
        k_new, v_new = torch.randn(meta.num_tokens, 2, 16), torch.randn(meta.num_tokens, 2, 16)
        backend = get_backend("sdpa")
        out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, backend.prepare(meta), 0.25)
        torch.testing.assert_close(out, reference(q, k_cache, v_cache, seqs, 0.25), rtol=1e-5, atol=1e-5)
        kv.check_integrity()


def test_get_backend_errors():
    with pytest.raises(ValueError, match="sdpa"):
        get_backend("paged")
    with pytest.raises(RuntimeError, match="CUDA"):
        backend = get_backend("torch")
        backend.prepare(build_metadata([chunk(0, 0, 2)], 16, "cpu"))
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(RuntimeError, match="flash-attn"):
            get_backend("flash_attn")
    else:
        assert get_backend("flash_attn").name == "flash_attn"


def test_auto_backend_selection(monkeypatch, caplog):
    """"auto": sdpa on CPU; on CUDA the Triton backend, or FlashAttention-2 with the reason logged."""
    assert resolve_backend("auto", "cpu", 128) == "sdpa"
    assert resolve_backend("torch", "cuda", 128) == "torch"  # an explicit choice is kept
    assert resolve_backend("triton", "cuda", 80) == "triton"
    assert resolve_backend("auto", "cuda", 128) == "triton"  # triton is in the test extra
    with caplog.at_level(logging.INFO, logger="vattn_ray.attention"):
        assert resolve_backend("auto", "cuda", 80) == "torch"
    assert "head_dim=80 is not a power of two" in caplog.text
    # float32 never lands on FlashAttention-2 (fp16/bf16 only): sdpa where Triton cannot prefill it.
    assert resolve_backend("auto", "cuda", 128, "float32") == "triton"
    assert resolve_backend("auto", "cuda", 16, "float32") == "sdpa"
    assert resolve_backend("auto", "cuda", 16, "bfloat16") == "triton"
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    monkeypatch.delitem(sys.modules, "vattn_ray.attention.triton_prefill", raising=False)  # nor imported yet
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vattn_ray.attention"):
        assert resolve_backend("auto", "cuda", 128) == "torch"
        assert resolve_backend("auto", "cuda", 128, "float32") == "sdpa"
    assert "triton cannot be imported" in caplog.text


def test_engine_args_resolve_attention_backend(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
        "hidden_size": 256, "max_position_embeddings": 128}))
    assert EngineArgs(model=str(tmp_path), device="cpu").resolve().attention_backend == "sdpa"
    assert EngineArgs(model=str(tmp_path), device="cuda").resolve().attention_backend == "triton"
    assert EngineArgs(model=str(tmp_path), device="cuda", attention_backend="torch").resolve().attention_backend == "torch"
    with pytest.raises(ValueError, match="triton"):
        EngineArgs(model=str(tmp_path), attention_backend="paged").resolve()


def test_triton_backend_needs_cuda_outside_the_interpreter(monkeypatch):
    backend = get_backend("triton")
    assert backend.name == "triton" and backend.prefill.name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        backend.prepare(build_metadata([chunk(0, 0, 2)], 16, "cpu"))
