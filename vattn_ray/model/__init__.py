"""Decoder-only models (Llama skeleton) with explicit tensor parallelism, and a random-checkpoint builder."""

from vattn_ray.model.builder import build_random_checkpoint, ensure_builtin_model
from vattn_ray.model.llama import CausalLM
from vattn_ray.model.loader import ARCHITECTURES, load_model

__all__ = ["ARCHITECTURES", "CausalLM", "build_random_checkpoint", "ensure_builtin_model", "load_model"]
