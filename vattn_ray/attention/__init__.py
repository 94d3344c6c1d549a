"""Attention backends: one interface, every one reading the virtual KV views unchanged.

`get_backend(name)` is the single place a backend is chosen: "sdpa" (CPU reference), "torch"
(PyTorch's FlashAttention-2, GPU), "flash_attn" (the flash-attn package, GPU, when installed).
"""

from __future__ import annotations

from vattn_ray.attention.base import AttentionBackend, flat_view, write_kv
from vattn_ray.attention.metadata import AttentionMetadata, build_metadata

BACKENDS = ("sdpa", "torch", "flash_attn")


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
    raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")


__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "build_metadata", "flat_view",
           "get_backend", "write_kv"]
