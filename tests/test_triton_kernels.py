"""The Triton kernels, run by Triton's interpreter on CPU tensors, against plain torch references.

The interpreter executes the kernels' own code (masks, strides, offsets, the split-KV merge) with
numpy; it cannot run bfloat16 matrix products (nor round to bfloat16 the way GPUs do), so the
dtypes here are float32 and float16, and bfloat16 is covered by tests/gpu. Rows of the cache past
each sequence's length hold NaN: a kernel that read one would return NaN. On the host-VMM cache
those rows are PROT_NONE pages: reading one would crash the process.
"""

from __future__ import annotations

import pytest
import torch

from vattn_ray.attention import build_metadata
from vattn_ray.attention.sdpa import SdpaBackend
from vattn_ray.attention.triton_backend import TritonBackend, interpreting
from vattn_ray.attention.triton_decode import (MAX_SPLITS, PROGRAMS_PER_SM, DecodeConfig, choose_num_splits,
                                               decode_attention)
from vattn_ray.kvcache import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.model import fused, fused_kernels
from vattn_ray.model.rope import RotaryEmbedding, apply_rope
from vattn_ray.scheduler.plan import KVOp, SeqChunk

from test_attention import reference as attention_reference

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests; tests/gpu cover CUDA")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def test_kernels_run_interpreted():
    assert interpreting()
    assert type(fused_kernels._silu_mul_kernel).__name__ == "InterpretedFunction"


def decode_reference(q, k_cache, v_cache, slots, lens, scale):
    """float64 softmax over each row's tokens [0, len) (only those rows are read)."""
    group = q.shape[1] // k_cache.shape[2]
    outs = []
    for b, (slot, n) in enumerate(zip(slots.tolist(), lens.tolist())):
        k = k_cache[slot, :n].double().repeat_interleave(group, dim=1)
        v = v_cache[slot, :n].double().repeat_interleave(group, dim=1)
        w = torch.einsum("hd,lhd->hl", q[b].double(), k) * scale
        outs.append(torch.einsum("hl,lhd->hd", w.softmax(-1), v))
    return torch.stack(outs)


def strided_cache(slots: int, tokens: int, layers: int, layer: int, kv_heads: int, dim: int, dtype,
                  lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V views of one layer of `[slots, tokens, G, H_kv, D]` tensors, NaN past each slot's length."""
    k_full = torch.randn(slots, tokens, layers, kv_heads, dim).to(dtype)
    v_full = torch.randn(slots, tokens, layers, kv_heads, dim).to(dtype)
    k, v = k_full[:, :, layer], v_full[:, :, layer]
    for slot, n in enumerate(lens):
        k[slot, n:] = float("nan")
        v[slot, n:] = float("nan")
    return k, v


# (q heads, kv heads, head_dim, G, layer, dtype, splits); lengths include 1, a whole tile, odd sizes
CASES = [
    (8, 2, 64, 1, 0, torch.float32, None),  # GQA 4, splits chosen from the shape
    (8, 1, 128, 3, 2, torch.float32, 3),  # GQA 8, G = all layers, a split count that is no power of two
    (4, 4, 64, 3, 0, torch.float16, 1),  # MHA, one split: the kernel writes the output directly
    (8, 2, 128, 1, 0, torch.float16, 8),  # more splits than a short row has tiles: empty splits
]


@pytest.mark.parametrize("heads,kv_heads,dim,layers,layer,dtype,splits", CASES)
def test_decode_matches_reference(heads, kv_heads, dim, layers, layer, dtype, splits):
    torch.manual_seed(0)
    lens = [1, 300, 17, 64, 129]
    k, v = strided_cache(5, 304, layers, layer, kv_heads, dim, dtype, lens)
    slots = torch.tensor([3, 0, 4, 1, 2])  # rows read slots out of order
    seq_lens = torch.tensor([lens[s] for s in slots.tolist()], dtype=torch.int32)
    q = torch.randn(5, heads, dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, slots, seq_lens, dim ** -0.5, out, num_splits=splits)
    expected = decode_reference(q, k, v, slots, seq_lens, dim ** -0.5)
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_decode_rows_index_and_small_tiles():
    """Rows scattered in a larger q/out (a mixed batch), with 16-token tiles: rows not named stay untouched."""
    torch.manual_seed(1)
    lens = [33, 5, 16]
    k, v = strided_cache(3, 48, 2, 1, 2, 64, torch.float32, lens)
    q = torch.randn(7, 8, 64)
    out = torch.full_like(q, 7.0)
    rows = torch.tensor([6, 0, 3])
    slots, seq_lens = torch.tensor([0, 1, 2]), torch.tensor(lens, dtype=torch.int32)
    decode_attention(q, k, v, slots, seq_lens, 0.125, out, rows=rows, num_splits=2,
                     config=DecodeConfig(block_n=16, num_warps=4, num_stages=2))
    expected = decode_reference(q[rows], k, v, slots, seq_lens, 0.125)
    torch.testing.assert_close(out[rows].double(), expected, rtol=1e-5, atol=1e-5)
    assert (out[[1, 2, 4, 5]] == 7.0).all()


def test_decode_reads_only_mapped_pages():
    """On the host-VMM cache, pages past a row's length are PROT_NONE; 16 tokens fill a page here."""
    layout = KVLayout.build(num_layers=2, layers_per_tensor=2, num_kv_heads=2, head_dim=16, itemsize=4,
                            page_bytes=4096, max_slots=3, max_model_len=512)
    lens = {0: 3, 2: 200}
    with KVManager.from_budget(layout, "cpu", budget_bytes=64 * layout.page_group_bytes,
                               dtype=torch.float32) as kv:
        assert not kv.apply([KVOp(s, layout.groups_for_tokens(n)) for s, n in lens.items()])
        k, v = kv.layer_kv(1)
        for s, n in lens.items():
            k[s, :n], v[s, :n] = torch.randn(n, 2, 16), torch.randn(n, 2, 16)
        torch.manual_seed(2)
        q = torch.randn(2, 4, 16)
        out = torch.empty_like(q)
        slots, seq_lens = torch.tensor(list(lens)), torch.tensor(list(lens.values()), dtype=torch.int32)
        decode_attention(q, k, v, slots, seq_lens, 0.25, out, num_splits=4,
                         config=DecodeConfig(block_n=32, num_warps=4, num_stages=2))
        torch.testing.assert_close(out.double(), decode_reference(q, k, v, slots, seq_lens, 0.25),
                                   rtol=1e-5, atol=1e-5)
        kv.check_integrity()


def test_num_splits_fill_one_resident_wave():
    wave = PROGRAMS_PER_SM * 132
    for rows in (1, 2, 5, 32, 100, 256, 1024):
        for heads in (1, 8):
            s = choose_num_splits(rows, heads, 132)
            assert 1 <= s <= MAX_SPLITS
            if s > 1:  # as many splits as fit in the wave, and no more
                assert rows * heads * s <= wave and (rows * heads * (s + 1) > wave or s == MAX_SPLITS)
    assert choose_num_splits(256, 8, 132) == choose_num_splits(32, 8, 132) == 1
    assert choose_num_splits(8, 8, 132) == 6 and choose_num_splits(1, 8, 132) == 49


def chunk(slot: int, start: int, n: int) -> SeqChunk:
    return SeqChunk(f"r{slot}", slot, start, tuple(range(3, 3 + n)), True)


@pytest.mark.parametrize("order", ["decode-first", "interleaved", "decode-only", "prefill-only"])
def test_backend_splits_mixed_batches(order):
    """One-token rows go to the kernel, the others to the prefill backend, in any order."""
    batches = {
        "decode-first": [chunk(3, 40, 1), chunk(1, 9, 1), chunk(0, 0, 7), chunk(2, 5, 4)],
        "interleaved": [chunk(3, 40, 1), chunk(0, 0, 7), chunk(2, 5, 4), chunk(1, 0, 1)],
        "decode-only": [chunk(2, 20, 1), chunk(0, 0, 1), chunk(3, 47, 1)],
        "prefill-only": [chunk(0, 0, 7), chunk(2, 5, 4)],
    }
    seqs = batches[order]
    torch.manual_seed(3)
    m, heads, kv_heads, d = 48, 8, 2, 64
    k_cache, v_cache = strided_cache(4, m, 2, 0, kv_heads, d, torch.float32, [m] * 4)
    for s in seqs:  # NaN past what this step attends to
        k_cache[s.slot, s.end:] = float("nan")
        v_cache[s.slot, s.end:] = float("nan")
    meta = build_metadata(seqs, m, "cpu")
    q = torch.randn(meta.num_tokens, heads, d)
    k_new, v_new = torch.randn(meta.num_tokens, kv_heads, d), torch.randn(meta.num_tokens, kv_heads, d)
    backend = TritonBackend(prefill=SdpaBackend())
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, backend.prepare(meta), d ** -0.5)
    torch.testing.assert_close(out, attention_reference(q, k_cache, v_cache, seqs, d ** -0.5), rtol=1e-5, atol=1e-5)


# ---- fused element-wise kernels against the torch ops the model runs on CPU ----------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_kernel(dtype):
    torch.manual_seed(4)
    x, res = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    normed, total = fused_kernels.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(total, x + res)
    torch.testing.assert_close(normed, fused.rms_norm_torch(x + res, w, 1e-6), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_kernel_on_strided_heads(dtype):
    """Per-head norm (Qwen3's q/k norm) straight from a slice of the fused projection, no copy."""
    torch.manual_seed(5)
    qkv = torch.randn(3, 12 * 32).to(dtype)
    q = qkv[:, 32:8 * 32].view(3, 7, 32)
    w = torch.randn(32).to(dtype)
    torch.testing.assert_close(fused_kernels.rms_norm(q, w, 1e-5), fused.rms_norm_torch(q, w, 1e-5),
                               rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_kernel(dtype):
    torch.manual_seed(6)
    gate_up = (4 * torch.randn(4, 2 * 1100)).to(dtype)  # two column blocks, the second partial
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused_kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_and_cache_kernel(dtype):
    """q and k rotated, k and v written to their flat rows of a strided (G = 2) cache, nothing else."""
    torch.manual_seed(7)
    t, heads, kv_heads, d, m = 4, 6, 2, 32, 20
    q, k, v = (torch.randn(t, (heads + 2 * kv_heads) * d).to(dtype)
               .split([heads * d, kv_heads * d, kv_heads * d], dim=-1))
    q, k, v = q.view(t, heads, d), k.view(t, kv_heads, d), v.view(t, kv_heads, d)
    cos, sin = RotaryEmbedding(d, {"rope_type": "default", "rope_theta": 10000.0}, "cpu")(
        torch.tensor([0, 5, 17, 3]), dtype)
    k_full, v_full = torch.zeros(3, m, 2, kv_heads, d, dtype=dtype), torch.zeros(3, m, 2, kv_heads, d, dtype=dtype)
    mapping = torch.tensor([0 * m + 0, 2 * m + 5, 1 * m + 17, 0 * m + 3])
    q_out = fused_kernels.rope_and_cache(q, k, v, cos, sin, k_full[:, :, 1], v_full[:, :, 0], mapping)
    tol = TOL[dtype]
    torch.testing.assert_close(q_out, apply_rope(q, cos, sin), rtol=tol, atol=tol)
    k_rot = apply_rope(k, cos, sin)
    for i, row in enumerate(mapping.tolist()):
        slot, pos = divmod(row, m)
        torch.testing.assert_close(k_full[slot, pos, 1], k_rot[i], rtol=tol, atol=tol)
        assert torch.equal(v_full[slot, pos, 0], v[i])
    written = torch.zeros(3, m, dtype=torch.bool)
    written.view(-1)[mapping] = True
    assert (k_full[:, :, 0] == 0).all() and (v_full[:, :, 1] == 0).all()  # the other layer untouched
    assert (k_full[:, :, 1][~written] == 0).all() and (v_full[:, :, 0][~written] == 0).all()
