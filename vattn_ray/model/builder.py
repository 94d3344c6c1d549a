"""Build random-weight Hugging Face checkpoints (config.json, safetensors, tokenizer) offline.

Used by tests (tiny shapes, float32) and by benchmarks (Llama-3-8B shapes, bf16). Weights are
drawn tensor by tensor from numpy generators seeded by (seed, tensor name, chunk), so the files are
identical on every run and independent of the thread count; no transformers model is instantiated.
`generate_on="cuda"` draws them on the GPU instead and streams them to the files
(`stream_writer.py`): the 32B-shaped build then runs at the speed of the host's page cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors.torch import save_file

from vattn_ray.model.tokenizer_builder import BOS_ID, EOS_ID, PAD_ID, save_tokenizer

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                       rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                        rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=False),
}
# Weight scale: tiny models get large weights so logits are peaked (greedy parity tests must not
# hinge on near-ties); the 8B and 70B presets use the usual 0.02 so activations stay sane in bf16.
_INIT_STD = {"tiny": 0.2, "llama-3-8b": 0.02, "llama-3-70b": 0.02}
_SHARD_BYTES = {"tiny": 0, "llama-3-8b": 5 << 30, "llama-3-70b": 5 << 30}  # 0: one file
BUILTIN_MODELS: dict[str, dict] = {
    "tiny-llama": dict(family="llama", preset="tiny"),
    "tiny-qwen3": dict(family="qwen3", preset="tiny"),
}
_CHUNK = 1 << 22  # elements drawn per generator; fixed so output does not depend on threads
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_random_checkpoint(out_dir: str, family: str, *, seed: int = 0, dtype: str = "float32",
                            preset: str = "tiny", init_std: float | None = None,
                            max_shard_bytes: int | None = None, generate_on: str | None = None,
                            **shape_overrides) -> str:
    """Write a random Hugging Face checkpoint of `family` into `out_dir` and return `out_dir`.

    `shape_overrides` are config fields (hidden_size, num_key_value_heads, head_dim, rope_scaling,
    tie_word_embeddings, ...) applied on top of `preset`. With `max_shard_bytes` > 0 the weights are
    split into several `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`
    (None: the preset's default, 5 GiB shards for the 8B shapes; 0: one file).
    `generate_on`: None draws the weights with numpy on the host; a torch device ("cuda", "cpu")
    draws them with torch's generator there and streams them to the files (other values, same law).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {FAMILIES}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; supported: {tuple(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    config = make_config(family, dtype, **{**PRESETS[preset], **shape_overrides})
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    std = _INIT_STD[preset] if init_std is None else float(init_std)
    shard_bytes = _SHARD_BYTES[preset] if max_shard_bytes is None else int(max_shard_bytes)
    _write_weights(out_dir, weight_shapes(config, family), seed, _DTYPES[dtype], std, shard_bytes, generate_on)
    save_tokenizer(out_dir, config.vocab_size, config.max_position_embeddings)
    logger.info("built random %s checkpoint (%s, %s) in %s", family, preset, dtype, out_dir)
    return out_dir


def make_config(family: str, dtype: str, **fields):
    """The transformers config object of `family` with `fields` (ids of the built tokenizer)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if family == "mistral":
        fields.setdefault("sliding_window", None)  # full attention: what the runtime computes
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[family]
    fields.setdefault("architectures", [arch])
    return cls(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype=dtype, **fields)


def weight_shapes(config, family: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in Hugging Face naming, for a Llama-skeleton decoder."""
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
        if family == "qwen2" or getattr(config, "attention_bias", False):
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if family == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, std: float,
                  pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """Deterministic zero-mean values of standard deviation `std` for tensor `name`.

    Uniform, not normal: numpy draws uniforms several times faster, which is what keeps the 8B
    build short, and the distribution's shape does not matter for a random model. Norm weights are
    1 + U(+-0.17) and biases U(+-0.17): near the usual values, but a skipped one is still detected.
    """
    numel = int(np.prod(shape))
    out = np.empty(numel, dtype=np.float32)
    key = zlib.crc32(name.encode())

    def fill(start: int) -> None:
        rng = np.random.Generator(np.random.PCG64([seed, key, start // _CHUNK]))
        rng.random(out=out[start:start + _CHUNK], dtype=np.float32)  # releases the GIL

    starts = range(0, numel, _CHUNK)
    if pool is None:
        for s in starts:
            fill(s)
    else:
        list(pool.map(fill, starts))
    return scale_uniform(torch.from_numpy(out).view(shape), name, std).to(dtype)


def scale_uniform(t: torch.Tensor, name: str, std: float) -> torch.Tensor:
    """Map U[0, 1) values in place to a tensor's initial distribution: U(-a, a) with std `std`
    (0.1 for norms and biases), norms centred on 1."""
    is_norm = name.endswith("norm.weight")
    half_width = (0.1 if is_norm or name.endswith(".bias") else std) * 3 ** 0.5  # U(-a, a): std a/sqrt(3)
    t.mul_(2 * half_width).sub_(half_width)
    if is_norm:
        t.add_(1.0)
    return t


def _write_weights(out_dir: str, shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype,
                   std: float, max_shard_bytes: int, generate_on: str | None = None) -> None:
    shards = _plan_shards(shapes, torch.empty((), dtype=dtype).element_size(), max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {k: fname for fname, shard in zip(names, shards) for k in shard}
    if generate_on is not None:
        from vattn_ray.model.stream_writer import write_shards

        total = write_shards(out_dir, shapes, shards, names, seed, dtype, std, generate_on)
    else:
        total = 0
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            for fname, shard in zip(names, shards):
                tensors = {k: random_tensor(k, shapes[k], seed, dtype, std, pool) for k in shard}
                save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if max_bytes > 0 and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def default_cache_dir() -> str:
    """`$VATTN_RAY_CACHE/models` or `~/.cache/vattn-ray/models`."""
    root = os.environ.get("VATTN_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vattn-ray")
    return os.path.join(root, "models")


def ensure_builtin_model(name: str = "tiny-llama", cache_dir: str | None = None) -> str:
    """Path of built-in model `name`, building it on first use (atomically: temp dir, then rename)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; available: {tuple(BUILTIN_MODELS)}")
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, name)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir)
    try:
        spec = BUILTIN_MODELS[name]
        build_random_checkpoint(tmp, spec["family"], preset=spec["preset"])
        os.rename(tmp, path)  # atomic; fails if another process finished first
    except OSError:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
