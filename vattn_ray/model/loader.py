"""`load_model`: build this rank's shard of a checkpoint and read only its slices from safetensors."""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from safetensors import safe_open
from tqdm import tqdm

from vattn_ray.attention import get_backend
from vattn_ray.model.llama import CausalLM

logger = logging.getLogger(__name__)

# architecture -> (q/k/v projections have a bias, per-head q/k RMSNorm)
ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")


def load_model(model_dir: str, *, dtype: torch.dtype, device: torch.device | str, rank: int = 0,
               world_size: int = 1, attention_backend: str = "sdpa") -> CausalLM:
    """Build the `rank`-th of `world_size` shards of the checkpoint in `model_dir` and load its weights."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    arch = (getattr(cfg, "architectures", None) or ["<none>"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} in {model_dir}; supported: {sorted(ARCHITECTURES)}")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        logger.warning("%s: sliding_window=%s is ignored; attention is over the full context",
                       model_dir, cfg.sliding_window)
    qkv_bias, qk_norm = ARCHITECTURES[arch]
    qkv_bias = qkv_bias or bool(getattr(cfg, "attention_bias", False))
    device = torch.device(device)
    model = CausalLM(cfg, backend=get_backend(attention_backend), rank=rank, world_size=world_size,
                     qkv_bias=qkv_bias, qk_norm=qk_norm, dtype=dtype, device=device)
    loaded = _load_weights(model, model_dir, rank)
    _check_complete(model, loaded)
    logger.info("rank %d/%d: loaded %s (%s, %d layers) on %s as %s", rank, world_size, arch, model_dir,
                model.num_layers, device, dtype)
    return model.eval()


def _checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return [os.path.join(model_dir, n) for n in names]


def _load_weights(model: CausalLM, model_dir: str, rank: int) -> set[str]:
    """Copy every checkpoint tensor into its (sharded) parameter; returns the parameters filled."""
    loaded: set[str] = set()
    files = _checkpoint_files(model_dir)
    with tqdm(files, desc=f"loading weights (rank {rank})", unit="file", disable=rank != 0) as bar:
        for path in bar:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    target = _route(model, name)
                    if target is not None:
                        target(f.get_slice(name))
                        loaded.add(name)
    return loaded


def _route(model: CausalLM, name: str):
    """The loader of checkpoint tensor `name`, or None for tensors the runtime does not use."""
    if name == "model.embed_tokens.weight":
        return lambda src: model.embed_tokens.load(name, src)
    if name == "lm_head.weight":  # tied checkpoints may still carry a copy; the embedding wins
        return None if model.tie_word_embeddings else (lambda src: model.lm_head.load(name, src))
    if name == "model.norm.weight":
        return lambda src: model.norm.load(name, src)
    if m := _NORM.match(name):
        return lambda src: getattr(model.layers[int(m[1])], m[2]).load(name, src)
    if m := _LAYER.match(name):
        layer, block, proj, kind = model.layers[int(m[1])], m[2], m[3], m[4]
        if block == "self_attn":
            attn = layer.self_attn
            if proj in ("q_proj", "k_proj", "v_proj"):
                return lambda src: attn.qkv_proj.load(proj, kind, src)
            if proj == "o_proj":
                return lambda src: attn.o_proj.load(name, src)
            if proj in ("q_norm", "k_norm") and getattr(attn, proj) is not None:
                return lambda src: getattr(attn, proj).load(name, src)
        else:
            if proj in ("gate_proj", "up_proj"):
                return lambda src: layer.mlp.gate_up_proj.load(proj, kind, src)
            if proj == "down_proj":
                return lambda src: layer.mlp.down_proj.load(name, src)
    if name.endswith("rotary_emb.inv_freq"):
        return None  # some old checkpoints store it; it is recomputed from the config
    raise ValueError(f"unexpected tensor {name!r} in checkpoint")


def _check_complete(model: CausalLM, loaded: set[str]) -> None:
    cfg = model.hf_config
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not model.tie_word_embeddings:
        expected.add("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        expected |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        expected |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        attn = model.layers[i].self_attn
        if attn.qkv_proj.bias is not None:
            expected |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv"}
        if attn.q_norm is not None:
            expected |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
