"""Attention backends: one interface, every one reading the virtual KV views unchanged.

Backends: "sdpa" (CPU reference), "torch" (PyTorch's FlashAttention-2, GPU), "flash_attn" (the
flash-attn package, GPU, when installed), "triton" (split-KV Triton decode + a causal Triton
prefill kernel, with FlashAttention-2 for head sizes the latter is not built for; GPU).
`resolve_backend` is the one place "auto" is decided; `get_backend` builds one.
"""

from __future__ import annotations

import importlib
import logging

from vattn_ray.attention.base import AttentionBackend, flat_view, write_kv
from vattn_ray.attention.metadata import AttentionMetadata, build_metadata

BACKENDS = ("sdpa", "torch", "flash_attn", "triton")
logger = logging.getLogger(__name__)


def resolve_backend(name: str, device: str, head_dim: int, dtype: str | None = None) -> str:
    """The backend `name` stands for: "auto" is "triton" on CUDA when it can run the model's
    heads, else "torch" (with a log line saying why), and "sdpa" on CPU; other names are kept.

    FlashAttention-2 runs fp16/bf16 only, so a float32 model on CUDA whose prefill would land on it
    (no Triton, or a head size the Triton prefill kernel is not built for) gets "sdpa" instead."""
    if name != "auto":
        return name
    if device != "cuda":
        return "sdpa"
    reason = _triton_unusable(head_dim)
    if dtype == "float32":
        if reason is None:  # triton imports: so does its prefill kernel's module
            from vattn_ray.attention.triton_prefill import HEAD_DIMS

            if head_dim not in HEAD_DIMS:
                reason = f"the Triton prefill kernel is built for head_dim {HEAD_DIMS}, not {head_dim}"
        if reason is not None:
            logger.info("attention backend: 'sdpa' for float32 (FlashAttention-2 runs fp16/bf16 only): %s", reason)
            return "sdpa"
    if reason is None:
        return "triton"
    logger.info("attention backend: 'torch' (FlashAttention-2) instead of 'triton': %s", reason)
    return "torch"


def _triton_unusable(head_dim: int) -> str | None:
    """Why the Triton decode kernel cannot serve this model here, or None when it can."""
    try:
        importlib.import_module("triton")
    except Exception as e:  # not installed, or installed but broken against this torch
        return f"triton cannot be imported ({e})"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim} is not a power of two >= 16"
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return "the GPU has compute capability < 8.0 (no bf16 tensor cores)"
    return None


def get_backend(name: str) -> AttentionBackend:
    """A fresh backend instance by name (the flash-attn package is imported only here, lazily)."""
    if name == "sdpa":
        from vattn_ray.attention.sdpa import SdpaBackend

        return SdpaBackend()
    if name == "torch":
        from vattn_ray.attention.torch_flash import TorchFlashBackend

        return TorchFlashBackend()
    if name == "flash_attn":
        from vattn_ray.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    if name == "triton":
        from vattn_ray.attention.torch_flash import TorchFlashBackend
        from vattn_ray.attention.triton_backend import TritonBackend

        return TritonBackend(prefill=TorchFlashBackend())
    raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "build_metadata", "flat_view",
           "get_backend", "resolve_backend", "write_kv"]
