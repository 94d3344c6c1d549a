"""Triton kernels behind `fused.py`: one launch each, math in float32, roundings where torch rounds.

Where the reference rounds an intermediate to the model dtype (the residual sum before the norm,
the normalized value before the weight, SiLU before the product) the kernel rounds it too, so the
results differ from the torch ops by float32 reduction order only. Row offsets are int64 (the KV
cache rows of `rope_and_cache` index a tensor of more than 2^31 elements). HOT PATH.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vattn_ray.triton_util import address, as_pointer, tl_dtype

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# ---- RMSNorm (+ residual add) -----------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     n_inner, stride_xo, stride_xi, stride_res, n_cols, eps,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # row r of x viewed as [outer, inner, n_cols]
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x_row = x_ptr + (r // n_inner) * stride_xo + (r % n_inner) * stride_xi
    x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        total = x + tl.load(res_ptr + r * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        total = total.to(res_out_ptr.dtype.element_ty)  # the residual stream is kept in the model dtype
        tl.store(res_out_ptr + r * n_cols + cols, total, mask=ok)
        x = total.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * n_cols + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes and dtypes the norm kernel covers (otherwise the torch ops run)."""
    return (x.dtype in _FLOATS and weight.dtype == x.dtype and x.dim() in (2, 3)
            and x.stride(-1) == 1 and x.shape[-1] <= 65536 and weight.is_contiguous())


def _norm_launch(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, max(1, min(16, block // 512))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of every row of `x` `[R, N]` or `[R0, R1, N]` (any row strides; q/k heads of a
    fused projection are normalized in place of a copy). Returns a contiguous tensor."""
    x3 = x if x.dim() == 3 else x[:, None]
    outer, inner, n = x3.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block, warps = _norm_launch(n)
    _rms_norm_kernel[(outer * inner,)](x3, x3, weight, out, out, inner, x3.stride(0), x3.stride(1), 0, n, eps,
                                       BLOCK=block, HAS_RESIDUAL=False, num_warps=warps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)` for `[T, N]` rows, in one pass over each row."""
    if x.dim() != 2 or residual.shape != x.shape or residual.stride(-1) != 1:
        raise ValueError(f"add_rms_norm needs two [T, N] tensors, got {tuple(x.shape)} and {tuple(residual.shape)}")
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out, res_out
    block, warps = _norm_launch(n)
    _rms_norm_kernel[(t,)](x, residual, weight, out, res_out, 1, x.stride(0), 0, residual.stride(0), n, eps,
                           BLOCK=block, HAS_RESIDUAL=True, num_warps=warps)
    return out, res_out


# ---- rotary embedding + KV cache write --------------------------------------------------------
@triton.jit
def _rotate(x_ptr, stride_h, n_heads, cos1, sin1, cos2, sin2,
            BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    # "Rotate half": out[:half] = x1*cos - x2*sin, out[half:] = x2*cos + x1*sin.
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    ptrs = x_ptr + h[:, None] * stride_h + d[None, :]
    ok = h[:, None] < n_heads
    x1 = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
    return x1 * cos1[None, :] - x2 * sin1[None, :], x2 * cos2[None, :] + x1 * sin2[None, :]


@triton.jit
def _store_heads(ptr, stride_h, n_heads, lo, hi, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    ptrs = ptr + h[:, None] * stride_h + d[None, :]
    ok = h[:, None] < n_heads
    tl.store(ptrs, lo.to(ptr.dtype.element_ty), mask=ok)
    tl.store(ptrs + HALF, hi.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, map_ptr, q_out_ptr, kc_addr, vc_addr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_cos, stride_sin, stride_qot, stride_qoh,
                       stride_kc_row, stride_kc_h, stride_vc_row, stride_vc_h,
                       n_q_heads, n_kv_heads,
                       BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, HALF: tl.constexpr,
                       KV_DTYPE: tl.constexpr):
    kc_ptr = as_pointer(kc_addr, KV_DTYPE)  # the virtual KV cache: see vattn_ray/triton_util.py
    vc_ptr = as_pointer(vc_addr, KV_DTYPE)
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + t * stride_cos + d).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * stride_cos + HALF + d).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * stride_sin + d).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * stride_sin + HALF + d).to(tl.float32)

    lo, hi = _rotate(q_ptr + t * stride_qt, stride_qh, n_q_heads, cos1, sin1, cos2, sin2, BLOCK_HQ, HALF)
    _store_heads(q_out_ptr + t * stride_qot, stride_qoh, n_q_heads, lo, hi, BLOCK_HQ, HALF)

    row = tl.load(map_ptr + t).to(tl.int64)  # flat cache row: slot * max_tokens + position
    lo, hi = _rotate(k_ptr + t * stride_kt, stride_kh, n_kv_heads, cos1, sin1, cos2, sin2, BLOCK_HKV, HALF)
    _store_heads(kc_ptr + row * stride_kc_row, stride_kc_h, n_kv_heads, lo, hi, BLOCK_HKV, HALF)

    h = tl.arange(0, BLOCK_HKV)
    ok = h[:, None] < n_kv_heads
    v_ptrs = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
    vc_ptrs = vc_ptr + row * stride_vc_row + h[:, None] * stride_vc_h + d[None, :]
    v1 = tl.load(v_ptrs, mask=ok, other=0.0)
    v2 = tl.load(v_ptrs + HALF, mask=ok, other=0.0)
    tl.store(vc_ptrs, v1.to(vc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptrs + HALF, v2.to(vc_ptr.dtype.element_ty), mask=ok)


def rope_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Head sizes the rope kernel tiles exactly: halves that are powers of two."""
    d = q.shape[-1]
    return q.dtype in _FLOATS and k_cache.dtype in _FLOATS and d >= 16 and d & (d - 1) == 0


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """One launch per step and layer: rotated q (returned, contiguous), rotated k and v in the cache."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    cos2, sin2 = cos.reshape(t, d), sin.reshape(t, d)  # [T, 1, D] -> [T, D], a view
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos2), ("sin", sin2), ("k_cache", k_cache),
                    ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"rope_and_cache needs a unit last stride in {name}")
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    # Flat row r of the `[slots, tokens, H, D]` view is at r * token_stride (slot stride = tokens * it).
    kc_row, vc_row = k_cache.stride(1), v_cache.stride(1)
    if k_cache.stride(0) != kc_row * k_cache.shape[1] or v_cache.stride(0) != vc_row * v_cache.shape[1]:
        raise ValueError("rope_and_cache needs cache views whose slots follow each other (flat rows)")
    _rope_cache_kernel[(t,)](
        q, k, v, cos2, sin2, slot_mapping, q_out, address(k_cache), address(v_cache),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos2.stride(0), sin2.stride(0), q_out.stride(0), q_out.stride(1),
        kc_row, k_cache.stride(2), vc_row, v_cache.stride(2), hq, hkv,
        BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv), HALF=d // 2,
        KV_DTYPE=tl_dtype(k_cache), num_warps=4)
    return q_out


# ---- SiLU(gate) * up --------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + r * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + r * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # torch rounds silu
    tl.store(out_ptr + r * n_cols + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of `[T, 2I]` rows (gate first); returns a contiguous `[T, I]`."""
    t, two_i = gate_up.shape
    if two_i % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul needs [T, 2I] with a unit last stride, got {tuple(gate_up.shape)}")
    n = two_i // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), BLOCK=block, num_warps=4)
    return out
