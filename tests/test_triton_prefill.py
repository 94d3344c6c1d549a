"""The Triton causal prefill kernel, run by Triton's interpreter on CPU tensors, against float64.

Rows have different query and context lengths (chunked prefill: queries start after cached
tokens), none a multiple of the tiles. Small tiles make several query blocks a row and put the
unmasked and the diagonal parts of the causal loop to work on tiny shapes; the default tiles
(one block a row here) are run too. Rows of the cache past each length hold NaN: a kernel that
read one would return NaN. On the host-VMM cache those rows are PROT_NONE pages, and reading one
would crash the process. float16 is the interpreter's half type (bfloat16 is covered by tests/gpu).
"""

from __future__ import annotations

import pytest
import torch

from vattn_ray.attention import build_metadata
from vattn_ray.attention.sdpa import SdpaBackend
from vattn_ray.attention.triton_backend import TritonBackend
from vattn_ray.attention.triton_prefill import (BLOCK_M, PrefillConfig, causal_flops, default_config,
                                                plan_prefill, prefill_attention)
from vattn_ray.kvcache import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.scheduler.plan import KVOp, SeqChunk

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; tests/gpu cover CUDA")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
SMALL = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)


def chunk(slot: int, start: int, n: int) -> SeqChunk:
    return SeqChunk(f"r{slot}", slot, start, tuple(range(3, 3 + n)), True)


def prefill_reference(q, k_cache, v_cache, seqs, scale) -> torch.Tensor:
    """float64: query i of a chunk at `start` attends to its slot's keys [0, start + i]."""
    group = q.shape[1] // k_cache.shape[2]
    outs, t = [], 0
    for s in seqs:
        n = len(s.token_ids)
        k = k_cache[s.slot, :s.end].double().repeat_interleave(group, dim=1)  # [L, H_q, D]
        v = v_cache[s.slot, :s.end].double().repeat_interleave(group, dim=1)
        w = torch.einsum("thd,lhd->htl", q[t:t + n].double(), k) * scale
        pos = torch.arange(s.start, s.end)
        w = w.masked_fill(torch.arange(s.end)[None, None, :] > pos[None, :, None], float("-inf"))
        outs.append(torch.einsum("htl,lhd->thd", w.softmax(-1), v))
        t += n
    return torch.cat(outs)


def nan_cache(slots: int, tokens: int, layers: int, layer: int, kv_heads: int, dim: int, dtype, seqs):
    """One layer's K/V views of `[slots, tokens, G, H_kv, D]` tensors, NaN past each row's length
    (and in slots no row reads)."""
    k_full = torch.full((slots, tokens, layers, kv_heads, dim), float("nan"), dtype=dtype)
    v_full = torch.full_like(k_full, float("nan"))
    k, v = k_full[:, :, layer], v_full[:, :, layer]
    for s in seqs:
        k[s.slot, :s.end] = torch.randn(s.end, kv_heads, dim).to(dtype)
        v[s.slot, :s.end] = torch.randn(s.end, kv_heads, dim).to(dtype)
    return k, v


# A prompt from 0, chunks after cached tokens (start > 0), a two-token chunk, lengths off the tiles;
# slots out of order, slot 1 unused (all NaN).
SEQS = [chunk(3, 0, 37), chunk(0, 21, 50), chunk(4, 5, 2), chunk(2, 70, 19)]
# (q heads, kv heads, head_dim, G, layer, dtype, config)
CASES = [
    (4, 4, 64, 1, 0, torch.float32, SMALL),  # MHA, G = 1
    (8, 2, 64, 3, 2, torch.float32, SMALL),  # GQA 4, G = all layers
    (8, 1, 128, 2, 1, torch.float16, SMALL),  # GQA 8, head_dim 128
    (4, 1, 64, 1, 0, torch.float16, PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)),
    (8, 2, 128, 1, 0, torch.float32, None),  # the default tiles (fp32)
    (4, 4, 64, 2, 0, torch.float16, None),  # the default tiles (16-bit)
]


@pytest.mark.parametrize("heads,kv_heads,dim,layers,layer,dtype,config", CASES)
def test_prefill_matches_reference(heads, kv_heads, dim, layers, layer, dtype, config):
    torch.manual_seed(0)
    k, v = nan_cache(5, 96, layers, layer, kv_heads, dim, dtype, SEQS)
    meta = build_metadata(SEQS, 96, "cpu")
    q = torch.randn(meta.num_tokens, heads, dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k, v, meta, dim ** -0.5, out, config=config)
    expected = prefill_reference(q, k, v, SEQS, dim ** -0.5)
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_plan_lists_every_block_heaviest_first():
    meta = build_metadata(SEQS, 96, "cpu")
    plan = plan_prefill(meta, 16)
    blocks = sorted(zip(plan.rows.tolist(), plan.starts.tolist()))
    assert blocks == [(b, m) for b, s in enumerate(SEQS) for m in range(0, len(s.token_ids), 16)]
    keys = [SEQS[b].start + min(m + 16, len(SEQS[b].token_ids))
            for b, m in zip(plan.rows.tolist(), plan.starts.tolist())]
    assert keys == sorted(keys, reverse=True)
    assert all(default_config(d, t).block_m == BLOCK_M
               for d in (64, 128) for t in (torch.float32, torch.float16, torch.bfloat16))


def test_prefill_reads_only_mapped_pages():
    """On the host-VMM cache, pages past a row's length are PROT_NONE; 16 tokens fill a page here,
    so the diagonal tiles of a row ending mid-page would cross into an unmapped one if unmasked."""
    layout = KVLayout.build(num_layers=2, layers_per_tensor=2, num_kv_heads=2, head_dim=64, itemsize=4,
                            page_bytes=8192, max_slots=3, max_model_len=256)
    seqs = [chunk(2, 0, 35), chunk(0, 17, 14)]
    with KVManager.from_budget(layout, "cpu", budget_bytes=64 * layout.page_group_bytes,
                               dtype=torch.float32) as kv:
        assert not kv.apply([KVOp(s.slot, layout.groups_for_tokens(s.end)) for s in seqs])
        k, v = kv.layer_kv(1)
        for s in seqs:
            k[s.slot, :s.end], v[s.slot, :s.end] = torch.randn(s.end, 2, 64), torch.randn(s.end, 2, 64)
        torch.manual_seed(2)
        meta = build_metadata(seqs, layout.max_tokens_per_slot, "cpu")
        q = torch.randn(meta.num_tokens, 4, 64)
        out = torch.empty_like(q)
        prefill_attention(q, k, v, meta, 0.125, out, config=PrefillConfig(16, 32, 4, 2))
        torch.testing.assert_close(out.double(), prefill_reference(q, k, v, seqs, 0.125), rtol=1e-5, atol=1e-5)
        kv.check_integrity()


class CountingSdpa(SdpaBackend):
    """The fallback backend, counting its calls (it computes as usual)."""

    calls = 0

    def attend(self, *args, **kwargs):
        self.calls += 1
        return super().attend(*args, **kwargs)


@pytest.mark.parametrize("dim,triton_prefill", [(64, True), (32, False)])
@pytest.mark.parametrize("order", ["decode-first", "interleaved", "prefill-only"])
def test_backend_chooses_prefill_path_by_shape(dim, triton_prefill, order):
    """Multi-token rows go to the Triton prefill kernel at head_dim 64, to the fallback at 32."""
    batches = {
        "decode-first": [chunk(3, 40, 1), chunk(0, 0, 29), chunk(2, 5, 20)],
        "interleaved": [chunk(0, 0, 29), chunk(3, 40, 1), chunk(2, 5, 20)],
        "prefill-only": [chunk(0, 0, 29), chunk(2, 5, 20)],
    }
    seqs = batches[order]
    torch.manual_seed(3)
    k_cache, v_cache = nan_cache(4, 48, 2, 1, 2, dim, torch.float32, seqs)
    meta = build_metadata(seqs, 48, "cpu")
    q = torch.randn(meta.num_tokens, 8, dim)
    fallback = CountingSdpa()
    backend = TritonBackend(prefill=fallback)
    out = backend.attend(q, k_cache, v_cache, meta, backend.prepare(meta), dim ** -0.5)
    assert fallback.calls == (0 if triton_prefill else 1)
    torch.testing.assert_close(out.double(), prefill_reference(q, k_cache, v_cache, seqs, dim ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_causal_flops_counts_visible_pairs():
    # one query after 3 cached tokens sees 4 keys; a 3-token prompt sees 1 + 2 + 3 keys
    assert causal_flops((1, 3), (3, 0), heads=2, head_dim=8) == 4 * 8 * 2 * (4 + 6)
