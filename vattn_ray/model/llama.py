"""The Llama skeleton shared by Llama 2/3.x, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

Tokens of all sequences of a step are flattened to `[T, ...]`; attention finds each token's
sequence and cache slot through `AttentionMetadata`. HOT PATH (forward).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from vattn_ray.attention import AttentionBackend, AttentionMetadata
from vattn_ray.model.layers import (MergedColumnParallelLinear, ParallelLMHead, RMSNorm, RowParallelLinear,
                                    VocabParallelEmbedding, divide)
from vattn_ray.model import fused
from vattn_ray.model.rope import RotaryEmbedding, rope_parameters

KVViews = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class ShardSpec:
    """How attention heads are split over `world_size` ranks (set once, read by every layer)."""

    def __init__(self, hf_config, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // self.num_heads
        self.local_heads = divide(self.num_heads, world_size, "num_attention_heads")
        if self.num_kv_heads >= world_size:
            self.local_kv_heads = divide(self.num_kv_heads, world_size, "num_key_value_heads")
            self.first_kv_head = rank * self.local_kv_heads
        else:
            # Fewer KV heads than ranks: each rank keeps a copy of the one head its queries use.
            divide(world_size, self.num_kv_heads, "tensor_parallel_size over num_key_value_heads")
            self.local_kv_heads = 1
            self.first_kv_head = rank * self.num_kv_heads // world_size

    def qkv_parts(self) -> dict[str, tuple[int, int, int]]:
        d = self.head_dim
        q_local, kv_local = self.local_heads * d, self.local_kv_heads * d
        return {"q_proj": (self.num_heads * d, self.rank * q_local, q_local),
                "k_proj": (self.num_kv_heads * d, self.first_kv_head * d, kv_local),
                "v_proj": (self.num_kv_heads * d, self.first_kv_head * d, kv_local)}


class Attention(nn.Module):
    def __init__(self, cfg, spec: ShardSpec, layer: int, backend: AttentionBackend, *, qkv_bias: bool,
                 qk_norm: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer, self.backend = layer, backend
        self.heads, self.kv_heads, self.head_dim = spec.local_heads, spec.local_kv_heads, spec.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = MergedColumnParallelLinear(cfg.hidden_size, spec.qkv_parts(), bias=qkv_bias,
                                                   dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(spec.num_heads * self.head_dim, cfg.hidden_size, rank=spec.rank,
                                        world_size=spec.world_size, dtype=dtype, device=device)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype=dtype, device=device) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype=dtype, device=device) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                state: Any, kv: KVViews) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k, v = q.view(t, self.heads, d), k.view(t, self.kv_heads, d), v.view(t, self.kv_heads, d)
        if self.q_norm is not None:  # Qwen3 normalises each head before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache = kv(self.layer)
        # Rotate q and k and store k, v in their cache rows (one kernel on CUDA); new tokens then
        # attend to themselves through the cache.
        q = fused.rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, meta.slot_mapping)
        o = self.backend.attend(q, k_cache, v_cache, meta, state, self.scale)
        return self.o_proj(o.reshape(t, self.heads * d))


class MLP(nn.Module):
    def __init__(self, cfg, spec: ShardSpec, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        local = divide(cfg.intermediate_size, spec.world_size, "intermediate_size")
        full = cfg.intermediate_size
        self.local = local
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, {"gate_proj": (full, spec.rank * local, local), "up_proj": (full, spec.rank * local, local)},
            bias=False, dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(full, cfg.hidden_size, rank=spec.rank, world_size=spec.world_size,
                                           dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, spec: ShardSpec, layer: int, backend: AttentionBackend, *, qkv_bias: bool,
                 qk_norm: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.self_attn = Attention(cfg, spec, layer, backend, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                   dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = MLP(cfg, spec, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos, sin, meta, state,
                kv) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mlp output, residual)`: the caller adds them (fused into the next norm). The residual
        stream is the same sum as `x + attn(norm(x))`, `+ mlp(norm(...))`, just added one step later."""
        if residual is None:  # first layer: the embeddings are the residual stream
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, meta, state, kv)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    """A decoder-only LM shard: `forward` gives hidden states, `compute_logits` full-vocab logits."""

    def __init__(self, hf_config, *, backend: AttentionBackend, rank: int, world_size: int, qkv_bias: bool,
                 qk_norm: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        cfg = hf_config
        spec = ShardSpec(cfg, rank, world_size)
        self.hf_config = cfg
        self.backend = backend
        self.rank, self.world_size = rank, world_size
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = spec.local_kv_heads
        self.head_dim = spec.head_dim
        self.vocab_size = cfg.vocab_size
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        par = dict(rank=rank, world_size=world_size, dtype=dtype, device=device)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **par)
        self.rotary = RotaryEmbedding(spec.head_dim, rope_parameters(cfg), device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, spec, i, backend, qkv_bias=qkv_bias, qk_norm=qk_norm, dtype=dtype, device=device)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, **par)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # same shard split, so share it

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVViews) -> torch.Tensor:
        """Hidden states `[T, hidden]` of the step's tokens; writes their K/V through `kv(layer)`."""
        state = self.backend.prepare(meta)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, meta, state, kv)
        return self.norm.add_forward(x, residual)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[n, vocab_size]` in the weights' dtype, the full vocabulary on every rank."""
        return self.lm_head.logits(hidden)
