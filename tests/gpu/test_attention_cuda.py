"""GPU: FlashAttention backends against the sdpa reference on the flat strided KV views.

bf16 inputs; the reference is sdpa in float32 on the same values. Layouts include G > 1
(a stride gap between tokens) and the real CUDA VMM cache, where rows past a sequence's mapped
pages are unmapped and any read of them is an illegal-address error.
Run on the GPU machine: `python -m pytest -q tests/gpu/test_attention_cuda.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vattn_ray.attention import build_metadata, get_backend
from vattn_ray.kvcache import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.plan import KVOp, SeqChunk

BACKENDS = ["torch"] + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def needs_cuda():
    assert torch.cuda.is_available(), "tests/gpu run on the GPU machine"


def chunk(slot: int, start: int, n: int, sample: bool = True) -> SeqChunk:
    return SeqChunk(f"r{slot}", slot, start, tuple([7] * n), sample)


MIXED = [chunk(5, 300, 1), chunk(0, 0, 97), chunk(2, 64, 40, sample=False), chunk(3, 1000, 1), chunk(1, 0, 1)]
DECODE = [chunk(s, n, 1) for s, n in [(6, 1), (2, 511), (0, 4000), (4, 129), (1, 2047)]]


def run(backend_name: str, q, k, v, k_cache, v_cache, meta, scale):
    backend = get_backend(backend_name)
    return backend.forward(q, k, v, k_cache, v_cache, meta, backend.prepare(meta), scale)


def reference(q, k_cache, v_cache, meta, scale):
    """sdpa in float32 over the cache as written (it gathers only rows below each length)."""
    sdpa = get_backend("sdpa")
    return sdpa.attend(q.float(), k_cache, v_cache, meta, sdpa.prepare(meta), scale)


def assert_written(k_cache, v_cache, k, v, seqs):
    t = 0
    for s in seqs:
        n = len(s.token_ids)
        assert torch.equal(k_cache[s.slot, s.start:s.end], k[t:t + n])
        assert torch.equal(v_cache[s.slot, s.start:s.end], v[t:t + n])
        t += n


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("layers_per_tensor,layer", [(1, 0), (4, 2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (8, 8, 64)])
def test_flash_matches_sdpa_on_strided_views(backend_name, seqs, layers_per_tensor, layer, heads, kv_heads, dim):
    torch.manual_seed(0)
    slots, m = 8, 4096
    k_full = torch.randn(slots, m, layers_per_tensor, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
    v_full = torch.randn_like(k_full)
    k_cache, v_cache = k_full[:, :, layer], v_full[:, :, layer]  # token stride G*H*D
    meta = build_metadata(seqs, m, DEV)
    q = torch.randn(meta.num_tokens, heads, dim, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(meta.num_tokens, kv_heads, dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = run(backend_name, q, k, v, k_cache, v_cache, meta, dim ** -0.5)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert_written(k_cache, v_cache, k, v, seqs)
    torch.testing.assert_close(out.float(), reference(q, k_cache, v_cache, meta, dim ** -0.5), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_flash_on_vmm_cache_reads_only_mapped_pages(backend_name):
    layout = KVLayout.build(num_layers=4, layers_per_tensor=4, num_kv_heads=8, head_dim=128, itemsize=2,
                            page_bytes=2 << 20, max_slots=6, max_model_len=8192)
    seqs = [chunk(4, 0, 300), chunk(1, 40, 1), chunk(0, 2999, 1), chunk(3, 256, 256, sample=False)]
    with KVManager.from_budget(layout, DEV, budget_bytes=40 * layout.page_group_bytes, dtype=torch.bfloat16) as kv:
        assert not kv.apply([KVOp(s.slot, layout.groups_for_tokens(s.end)) for s in seqs])
        k_cache, v_cache = kv.layer_kv(3)
        for s in seqs:  # fill each sequence's context; everything past its pages stays unmapped
            k_cache[s.slot, :s.start] = torch.randn(s.start, 8, 128, device=DEV, dtype=torch.bfloat16)
            v_cache[s.slot, :s.start] = torch.randn(s.start, 8, 128, device=DEV, dtype=torch.bfloat16)
        meta = build_metadata(seqs, layout.max_tokens_per_slot, DEV)
        q = torch.randn(meta.num_tokens, 32, 128, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(meta.num_tokens, 8, 128, device=DEV, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out = run(backend_name, q, k, v, k_cache, v_cache, meta, 128 ** -0.5)
        torch.cuda.synchronize()  # an out-of-bounds read would surface here as an illegal address
        assert_written(k_cache, v_cache, k, v, seqs)
        torch.testing.assert_close(out.float(), reference(q, k_cache, v_cache, meta, 128 ** -0.5),
                                   atol=2e-2, rtol=2e-2)
        kv.check_integrity()
