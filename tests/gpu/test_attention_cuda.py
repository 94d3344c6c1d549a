"""GPU: attention backends and fused kernels against references on the flat strided KV views.

bf16 inputs; the reference is float32 math on the same values. Layouts include G > 1 (a stride
gap between tokens) and the real CUDA VMM cache, where rows past a sequence's mapped pages are
unmapped and any read of them is an illegal-address error. The split-KV Triton decode kernel is
checked against FlashAttention-2 (max abs errors printed; run with -s to see them), inside CUDA
graphs replayed while pages are mapped and unmapped; so is the causal Triton prefill kernel, on
chunked rows of the VMM cache; and the fused element-wise kernels against the torch ops they replace.
Run on the GPU machine: `python -m pytest -q tests/gpu/test_attention_cuda.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vattn_ray.attention import AttentionMetadata, build_metadata, get_backend, write_kv
from vattn_ray.kvcache import KVManager
from vattn_ray.layout import KVLayout
from vattn_ray.model import fused
from vattn_ray.model.rope import RotaryEmbedding, apply_rope
from vattn_ray.scheduler.plan import KVOp, SeqChunk

BACKENDS = ["torch", "triton"] + (["flash_attn"] if importlib.util.find_spec("flash_attn") else [])
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


# ---- the split-KV Triton decode kernel against FlashAttention-2 ----------------------------------
def decode_reference(q, k_cache, v_cache, slots: list[int], lens: list[int], scale: float) -> torch.Tensor:
    """float32 attention of each row's one query over its slot's tokens [0, len)."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, (slot, n) in enumerate(zip(slots, lens)):
        k, v = k_cache[slot, :n].float(), v_cache[slot, :n].float()  # [n, H_kv, D]
        qb = q[b].float().view(kv_heads, heads // kv_heads, dim)
        w = torch.einsum("hgd,nhd->hgn", qb, k) * scale
        out[b] = torch.einsum("hgn,nhd->hgd", w.softmax(-1), v).reshape(heads, dim)
    return out


def mapped_tokens(layout: KVLayout, groups: int) -> int:
    """Whole tokens that lie in a slot's first `groups` mapped page groups."""
    return groups * layout.page_bytes // layout.token_bytes


def fill_context(kv: KVManager, layer: int, lens: dict[int, int], gen: torch.Generator) -> None:
    """Random K/V below each slot's length, NaN from there to the end of its mapped pages (a
    kernel reading past a length then returns NaN even where the page is mapped)."""
    k_cache, v_cache = kv.layer_kv(layer)
    kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    for slot, n in lens.items():
        end = min(mapped_tokens(kv.layout, kv.mapped_groups(slot)), kv.layout.max_tokens_per_slot)
        for cache in (k_cache, v_cache):
            cache[slot, :n] = torch.randn(n, kv_heads, dim, device=DEV, generator=gen).to(cache.dtype)
            cache[slot, n:end] = float("nan")


# (batch, longest context, q heads, kv heads, head_dim, G = layers per tensor; the model has 4 layers)
DECODE_CASES = [
    (1, 32768, 32, 8, 128, 4),  # one long row: the most splits; G = all layers
    (7, 32768, 16, 2, 128, 1),  # GQA 8, G = 1
    (33, 8192, 16, 16, 128, 4),  # MHA
    (64, 4096, 8, 8, 64, 1),  # MHA, head_dim 64
    (256, 2048, 32, 8, 128, 1),  # GQA 4, a large batch: one split, the kernel writes the output directly
    (256, 1024, 32, 4, 128, 4),  # GQA 8, a large batch, G = all layers
]


@pytest.mark.parametrize("batch,max_context,heads,kv_heads,dim,layers_per_tensor", DECODE_CASES)
def test_triton_decode_matches_fa2_on_vmm_cache(batch, max_context, heads, kv_heads, dim, layers_per_tensor):
    gen = torch.Generator(device=DEV).manual_seed(batch)
    rng = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, max_context + 1, (batch,), generator=rng).tolist()
    lens[0] = max_context
    lens[-1] = 1 if batch > 1 else lens[-1]
    slots = torch.randperm(batch, generator=rng).tolist()  # rows read slots out of order
    layout = KVLayout.build(num_layers=4, layers_per_tensor=layers_per_tensor, num_kv_heads=kv_heads,
                            head_dim=dim, itemsize=2, page_bytes=2 << 20, max_slots=batch,
                            max_model_len=max_context)
    need = sum(layout.groups_for_tokens(n) for n in lens)
    with KVManager.from_budget(layout, DEV, budget_bytes=need * layout.page_group_bytes,
                               dtype=torch.bfloat16) as kv:
        assert not kv.apply([KVOp(s, layout.groups_for_tokens(n)) for s, n in zip(slots, lens)])
        fill_context(kv, 2, dict(zip(slots, lens)), gen)
        k_cache, v_cache = kv.layer_kv(2)
        meta = build_metadata([chunk(s, n - 1, 1) for s, n in zip(slots, lens)], layout.max_tokens_per_slot, DEV)
        q = torch.randn(batch, heads, dim, device=DEV, dtype=torch.bfloat16, generator=gen)
        scale = dim ** -0.5
        triton_backend, fa2 = get_backend("triton"), get_backend("torch")
        out = triton_backend.attend(q, k_cache, v_cache, meta, triton_backend.prepare(meta), scale)
        out_fa2 = fa2.attend(q, k_cache, v_cache, meta, fa2.prepare(meta), scale)
        torch.cuda.synchronize()  # an out-of-bounds read would surface here as an illegal address
        ref = decode_reference(q, k_cache, v_cache, slots, lens, scale)
        err, err_fa2 = (out.float() - ref).abs().max().item(), (out_fa2.float() - ref).abs().max().item()
        diff = (out.float() - out_fa2.float()).abs().max().item()
        print(f"\ndecode B={batch} ctx<={max_context} H={heads}/{kv_heads} D={dim} G={layers_per_tensor}: "
              f"max|triton-fp32|={err:.2e} max|fa2-fp32|={err_fa2:.2e} max|triton-fa2|={diff:.2e}")
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert err <= 2 * err_fa2 + 2e-3, "the Triton kernel is less accurate than FlashAttention-2"
        assert diff <= 2e-2
        kv.check_integrity()


def test_triton_decode_graph_replays_while_pages_map_and_unmap():
    """One layer's decode (fused rope + cache write, then attention) captured once in a CUDA graph,
    replayed as rows grow, shrink (their pages unmapped) and change their number of active splits."""
    layout = KVLayout.build(num_layers=2, layers_per_tensor=2, num_kv_heads=8, head_dim=128, itemsize=2,
                            page_bytes=2 << 20, max_slots=4, max_model_len=32768)  # 512 tokens a page
    slots = [2, 0, 3, 1]
    steps = [[1, 700, 5000, 20000], [2, 701, 513, 20001], [30000, 1, 514, 3], [30001, 2, 515, 4]]
    heads, kv_heads, dim, m = 32, 8, 128, layout.max_tokens_per_slot
    gen = torch.Generator(device=DEV).manual_seed(0)
    rotary = RotaryEmbedding(dim, {"rope_type": "default", "rope_theta": 500000.0}, DEV)
    backend = get_backend("triton")
    with KVManager.from_budget(layout, DEV, budget_bytes=80 * layout.page_group_bytes, dtype=torch.bfloat16) as kv:
        k_cache, v_cache = kv.layer_kv(1)

        def set_step(lens: list[int]) -> AttentionMetadata:
            ops = [KVOp(s, layout.groups_for_tokens(n)) for s, n in zip(slots, lens)]
            # Shrinks before grows, as the scheduler orders them: the pool holds 80 groups.
            assert not kv.apply(sorted(ops, key=lambda op: op.num_groups >= kv.mapped_groups(op.slot)))
            fill_context(kv, 1, {s: n - 1 for s, n in zip(slots, lens)}, gen)
            return build_metadata([chunk(s, n - 1, 1) for s, n in zip(slots, lens)], m, DEV)

        meta = set_step(steps[0])  # its tensors are the graph's static inputs, refilled in place
        q = torch.randn(4, heads, dim, device=DEV, dtype=torch.bfloat16, generator=gen)
        k_new, v_new = (torch.randn(4, kv_heads, dim, device=DEV, dtype=torch.bfloat16, generator=gen)
                        for _ in range(2))
        cos, sin = rotary(meta.positions, torch.bfloat16)
        state = backend.prepare(meta)

        def layer() -> torch.Tensor:
            qr = fused.rope_and_cache(q, k_new, v_new, cos, sin, k_cache, v_cache, meta.slot_mapping)
            return backend.attend(qr, k_cache, v_cache, meta, state, dim ** -0.5)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer()  # compile before capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer()
        for lens in steps:
            new = set_step(lens)
            for static, fresh in ((meta.slots, new.slots), (meta.seq_lens, new.seq_lens),
                                  (meta.slot_mapping, new.slot_mapping), (meta.positions, new.positions)):
                static.copy_(fresh)
            c, s_ = rotary(new.positions, torch.bfloat16)
            cos.copy_(c)
            sin.copy_(s_)
            for t in (q, k_new, v_new):
                t.copy_(torch.randn(t.shape, device=DEV, generator=gen))
            graph.replay()
            torch.cuda.synchronize()  # an unmapped-page read would fail here
            replayed = out.clone()
            eager = layer()  # same inputs, rewrites the same cache rows with the same values
            torch.cuda.synchronize()
            assert torch.equal(replayed, eager), f"graph replay differs from eager at lengths {lens}"
            ref = decode_reference(apply_rope(q.float(), cos.float(), sin.float()), k_cache, v_cache, slots, lens,
                                   dim ** -0.5)
            torch.testing.assert_close(replayed.float(), ref, atol=2e-2, rtol=2e-2)
            k_rot = apply_rope(k_new.float(), cos.float(), sin.float())
            for i, (s, n) in enumerate(zip(slots, lens)):
                torch.testing.assert_close(k_cache[s, n - 1].float(), k_rot[i], atol=2e-2, rtol=2e-2)
                assert torch.equal(v_cache[s, n - 1], v_new[i])
        kv.check_integrity()


# ---- the causal Triton prefill kernel against FlashAttention-2 -----------------------------------
def prefill_reference(q, k_cache, v_cache, seqs: list[SeqChunk], scale: float) -> torch.Tensor:
    """float32 causal attention: query i of a chunk at `start` sees its slot's keys [0, start + i]."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    t = 0
    for s in seqs:
        n = len(s.token_ids)
        k, v = k_cache[s.slot, :s.end].float(), v_cache[s.slot, :s.end].float()  # [L, H_kv, D]
        qb = q[t:t + n].float().view(n, kv_heads, heads // kv_heads, dim)
        w = torch.einsum("thgd,lhd->hgtl", qb, k) * scale
        pos = torch.arange(s.start, s.end, device=DEV)
        w.masked_fill_(torch.arange(s.end, device=DEV)[None, :] > pos[:, None], float("-inf"))
        out[t:t + n] = torch.einsum("hgtl,lhd->thgd", w.softmax(-1), v).reshape(n, heads, dim)
        t += n
    return out


# (rows as (start, new tokens), q heads, kv heads, head_dim, G = layers per tensor; the model has 4 layers)
PREFILL_CASES = [
    ([(0, 4096)], 32, 8, 128, 4),  # one long prompt, GQA 4, G = all layers
    ([(0, 1000), (300, 777), (2048, 129), (5, 2), (0, 3000)], 16, 2, 128, 1),  # chunked rows, GQA 8
    ([(0, 513), (1500, 64), (4000, 100), (0, 2049)], 8, 8, 64, 1),  # MHA, head_dim 64
    ([(1023, 1), (0, 1025), (700, 324)], 32, 4, 64, 4),  # lengths at and around page ends
]


@pytest.mark.parametrize("rows,heads,kv_heads,dim,layers_per_tensor", PREFILL_CASES)
def test_triton_prefill_matches_fa2_on_vmm_cache(rows, heads, kv_heads, dim, layers_per_tensor):
    from vattn_ray.attention.triton_prefill import prefill_attention

    gen = torch.Generator(device=DEV).manual_seed(len(rows))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    seqs = [chunk(slot, start, n) for slot, (start, n) in zip(order, rows)]  # rows read slots out of order
    layout = KVLayout.build(num_layers=4, layers_per_tensor=layers_per_tensor, num_kv_heads=kv_heads,
                            head_dim=dim, itemsize=2, page_bytes=2 << 20, max_slots=len(rows),
                            max_model_len=8192)
    need = sum(layout.groups_for_tokens(s.end) for s in seqs)
    with KVManager.from_budget(layout, DEV, budget_bytes=need * layout.page_group_bytes,
                               dtype=torch.bfloat16) as kv:
        assert not kv.apply([KVOp(s.slot, layout.groups_for_tokens(s.end)) for s in seqs])
        fill_context(kv, 1, {s.slot: s.end for s in seqs}, gen)  # NaN to the page end, unmapped after
        k_cache, v_cache = kv.layer_kv(1)
        meta = build_metadata(seqs, layout.max_tokens_per_slot, DEV)
        q = torch.randn(meta.num_tokens, heads, dim, device=DEV, dtype=torch.bfloat16, generator=gen)
        scale = dim ** -0.5
        out = prefill_attention(q, k_cache, v_cache, meta, scale, torch.full_like(q, float("nan")))
        fa2 = get_backend("torch")
        out_fa2 = fa2.attend(q, k_cache, v_cache, meta, fa2.prepare(meta), scale)
        triton_backend = get_backend("triton")  # the same kernel through the backend's prefill path
        out_backend = triton_backend.attend(q, k_cache, v_cache, meta, triton_backend.prepare(meta), scale)
        torch.cuda.synchronize()  # an out-of-bounds read would surface here as an illegal address
        ref = prefill_reference(q, k_cache, v_cache, seqs, scale)
        err, err_fa2 = (out.float() - ref).abs().max().item(), (out_fa2.float() - ref).abs().max().item()
        diff = (out.float() - out_fa2.float()).abs().max().item()
        print(f"\nprefill rows={rows} H={heads}/{kv_heads} D={dim} G={layers_per_tensor}: "
              f"max|triton-fp32|={err:.2e} max|fa2-fp32|={err_fa2:.2e} max|triton-fa2|={diff:.2e}")
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert err <= 2 * err_fa2 + 2e-3, "the Triton prefill kernel is less accurate than FlashAttention-2"
        assert diff <= 2e-2
        multi = torch.cat([torch.full((n,), n > 1, device=DEV) for _, n in rows])  # one-token rows: decode
        assert torch.equal(out_backend[multi], out[multi])
        kv.check_integrity()


# ---- fused element-wise kernels against the torch ops they replace -------------------------------
FUSED_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_and_silu_match_torch(dtype):
    gen = torch.Generator(device=DEV).manual_seed(1)
    x, res = (torch.randn(300, 4096, device=DEV, generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(4096, device=DEV, generator=gen)).to(dtype)
    tol = FUSED_TOL[dtype]
    normed, total = fused.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(total, x + res)  # one rounding of the float32 sum, as torch does
    torch.testing.assert_close(normed, fused.rms_norm_torch(x + res, w, 1e-5), atol=tol, rtol=tol)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), fused.rms_norm_torch(x, w, 1e-5), atol=tol, rtol=tol)
    qkv = torch.randn(300, 48 * 128, device=DEV, generator=gen).to(dtype)
    q_heads = qkv[:, :32 * 128].view(300, 32, 128)  # per-head norm (Qwen3) on a strided slice
    wq = (1 + 0.1 * torch.randn(128, device=DEV, generator=gen)).to(dtype)
    torch.testing.assert_close(fused.rms_norm(q_heads, wq, 1e-6), fused.rms_norm_torch(q_heads, wq, 1e-6),
                               atol=tol, rtol=tol)
    gate_up = (3 * torch.randn(300, 2 * 14336, device=DEV, generator=gen)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_and_cache_matches_torch(dtype):
    gen = torch.Generator(device=DEV).manual_seed(2)
    t, heads, kv_heads, dim, m = 257, 32, 8, 128, 4096
    full = torch.randn(t, (heads + 2 * kv_heads) * dim, device=DEV, generator=gen).to(dtype)
    q, k, v = full.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(t, heads, dim), k.view(t, kv_heads, dim), v.view(t, kv_heads, dim)
    positions = torch.randperm(m, device=DEV, generator=gen)[:t]  # distinct, so every row is written once
    mapping = torch.arange(t, device=DEV) % 6 * m + positions
    cos, sin = RotaryEmbedding(dim, {"rope_type": "default", "rope_theta": 500000.0}, DEV)(positions, dtype)
    caches = [torch.zeros(6, m, 4, kv_heads, dim, device=DEV, dtype=dtype) for _ in range(4)]  # G = 4
    q_fused = fused.rope_and_cache(q, k, v, cos, sin, caches[0][:, :, 3], caches[1][:, :, 3], mapping)
    torch.testing.assert_close(q_fused, apply_rope(q, cos, sin), atol=FUSED_TOL[dtype], rtol=FUSED_TOL[dtype])
    write_kv(caches[2][:, :, 3], caches[3][:, :, 3], apply_rope(k, cos, sin), v, mapping)
    torch.testing.assert_close(caches[0], caches[2], atol=FUSED_TOL[dtype], rtol=FUSED_TOL[dtype])
    assert torch.equal(caches[1], caches[3])


def test_fused_ops_in_a_cuda_graph():
    gen = torch.Generator(device=DEV).manual_seed(3)
    x, res = (torch.randn(64, 4096, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    w = torch.randn(4096, device=DEV, dtype=torch.bfloat16, generator=gen)
    gate_up = torch.randn(64, 2 * 1024, device=DEV, dtype=torch.bfloat16, generator=gen)

    def run():
        h, r = fused.add_rms_norm(x, res, w, 1e-5)
        return h, r, fused.silu_mul(gate_up)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for _ in range(3):
        for t in (x, res, gate_up):
            t.copy_(torch.randn(t.shape, device=DEV, generator=gen))
        graph.replay()
        for got, want in zip(outs, run()):
            assert torch.equal(got, want)


def test_kernels_run_while_slot_zero_is_unmapped():
    """The cache's first address (slot 0, token 0) holds no page: Triton kernels must still launch
    (they take the cache by address) and read and write only mapped rows."""
    layout = KVLayout.build(num_layers=1, layers_per_tensor=1, num_kv_heads=8, head_dim=128, itemsize=2,
                            page_bytes=2 << 20, max_slots=4, max_model_len=4096)
    heads, dim, m = 32, 128, layout.max_tokens_per_slot
    with KVManager.from_budget(layout, DEV, budget_bytes=8 * layout.page_group_bytes, dtype=torch.bfloat16) as kv:
        assert not kv.apply([KVOp(3, layout.groups_for_tokens(700))])
        assert kv.mapped_groups(0) == 0
        k_cache, v_cache = kv.layer_kv(0)
        gen = torch.Generator(device=DEV).manual_seed(1)
        k_cache[3, :699].copy_(torch.randn(699, 8, dim, device=DEV, dtype=torch.bfloat16, generator=gen))
        v_cache[3, :699].copy_(torch.randn(699, 8, dim, device=DEV, dtype=torch.bfloat16, generator=gen))
        meta = build_metadata([chunk(3, 699, 1)], m, DEV)
        q, k, v = (torch.randn(1, h, dim, device=DEV, dtype=torch.bfloat16, generator=gen) for h in (heads, 8, 8))
        cos, sin = RotaryEmbedding(dim, {"rope_type": "default", "rope_theta": 10000.0}, DEV)(meta.positions,
                                                                                             torch.bfloat16)
        qr = fused.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
        backend = get_backend("triton")
        out = backend.attend(qr, k_cache, v_cache, meta, backend.prepare(meta), dim ** -0.5)
        torch.cuda.synchronize()
        rotated = apply_rope(k.float(), cos.float(), sin.float())[0]
        assert (k_cache[3, 699].float() - rotated).abs().max().item() < 3e-2
        assert torch.equal(v_cache[3, 699], v[0])
        ref = reference(qr, k_cache, v_cache, meta, dim ** -0.5)
        assert (out.float() - ref).abs().max().item() < 2e-2
        kv.check_integrity()
