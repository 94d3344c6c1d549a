"""Fused element-wise steps of a decoder layer: one kernel each on CUDA, plain torch elsewhere. HOT PATH.

A decode step at batch 256 spends milliseconds in small element-wise kernels (the norms, the
rotary embedding, SiLU, the residual adds, the cache writes). On CUDA each function here is a single
Triton kernel (`fused_kernels.py`). On CPU (and for shapes or dtypes the kernels do not cover)
it is the torch code the model always ran, operation for operation, so float32 results on CPU
stay bit-identical to transformers. Every function is CUDA-graph capturable: shapes only set grids.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

from vattn_ray.attention.base import write_kv
from vattn_ray.model.rope import apply_rope

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels module, or None (logged once) when Triton cannot be imported."""
    try:
        return importlib.import_module("vattn_ray.model.fused_kernels")
    except Exception as e:
        logger.warning("fused element-wise kernels disabled, running torch ops instead: %s", e)
        return None


def _triton_for(x: torch.Tensor):
    return _kernels() if x.is_cuda else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * normalize(x)` over the last dimension, the statistics in float32."""
    k = _triton_for(x)
    if k is not None and k.rms_norm_ok(x, weight):
        return k.rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual), x + residual)`: the next sublayer's input and the new residual."""
    k = _triton_for(x)
    if k is not None and k.rms_norm_ok(x, weight) and residual.dtype == x.dtype:
        return k.add_rms_norm(x, residual, weight, eps)
    total = x + residual
    return rms_norm_torch(total, weight, eps), total


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference RMSNorm (as in transformers' Llama)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q `[T, H_q, D]` and k `[T, H_kv, D]` by cos/sin `[T, 1, D]`, store k and v in the cache
    rows `slot_mapping` (flat rows of `[slots, tokens, H_kv, D]` views); returns the rotated q."""
    kern = _triton_for(q)
    if kern is not None and kern.rope_ok(q, k_cache):
        return kern.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    write_kv(k_cache, v_cache, k, v, slot_mapping)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of `[T, 2I]` = gate|up stacked on the last dimension; returns `[T, I]`."""
    k = _triton_for(gate_up)
    if k is not None and gate_up.dim() == 2:
        return k.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
