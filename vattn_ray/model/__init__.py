"""Decoder-only models (Llama skeleton) with explicit tensor parallelism, and a random-checkpoint builder."""

from vattn_ray.model.builder import build_random_checkpoint, ensure_builtin_model

__all__ = ["build_random_checkpoint", "ensure_builtin_model"]
