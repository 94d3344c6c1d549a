"""What the engine resolves and checks once, at start-up.

- `sampling_defaults`: the sampling fields a checkpoint's ``generation_config.json`` recommends.
  The rule (vLLM's): they replace the engine's own defaults only. Offline, `LLM.generate` and
  `LLM.chat` use them when no `SamplingParams` is given at all; over HTTP, each one fills a field
  the request leaves out (`null` or absent), and anything the request sets wins. Only fields that
  `SamplingParams` implements are taken (so `repetition_penalty` or `min_p` start to apply once the
  sampler implements them); ``max_new_tokens`` becomes `max_tokens`. `generation_config="vllm"`
  ignores the file, a directory reads that directory's file instead (vLLM's ``--generation-config``).
- `check_kv_fits`: refuse to start when the KV pool cannot hold one request of `max_model_len`
  tokens, with a message that says what to change (vLLM refuses the same way).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from vattn_ray.layout import KVLayout
from vattn_ray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
GIB = 1 << 30

# generation_config.json key -> SamplingParams field (the keys vLLM reads).
_GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                             "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                             "max_new_tokens": "max_tokens"}


def sampling_defaults(model_dir: str, generation_config: str = "auto") -> dict:
    """SamplingParams fields recommended by the checkpoint (see the module docstring)."""
    if generation_config == "vllm":
        return {}
    folder = model_dir if generation_config == "auto" else generation_config
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if generation_config != "auto":
            raise ValueError(f"generation_config={generation_config!r}: no generation_config.json there; "
                             "pass 'auto' (the checkpoint's), 'vllm' (ignore it) or a directory holding one")
        return {}
    with open(path) as f:
        config = json.load(f)
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    out = {field: config[key] for key, field in _GENERATION_CONFIG_FIELDS.items()
           if config.get(key) is not None and field in known}
    try:
        SamplingParams(**out)
    except ValueError as exc:
        raise ValueError(f"{path} holds a sampling default the engine cannot use ({exc}); fix the file or "
                         "pass generation_config='vllm' to ignore it") from exc
    if out:
        logger.info("sampling defaults from %s: %s (requests that set a field override it; "
                    "generation_config='vllm' ignores the file)", path, out)
    return out


def check_kv_fits(max_model_len: int, layout: KVLayout, capacity_groups: int) -> None:
    """Raise ValueError if one request of `max_model_len` tokens cannot fit in the KV pool.

    Such a request keeps max_model_len - 1 tokens in its slot (its last token is never fed back).
    """
    need = layout.groups_for_tokens(max(1, max_model_len - 1))
    if need <= capacity_groups:
        return
    most = int(capacity_groups * layout.page_bytes // layout.token_bytes) + 1
    lower = f"Lower max_model_len to at most {most}, or give" if capacity_groups else "Give"
    raise ValueError(
        f"max_model_len={max_model_len} needs {need} KV page groups ({need * layout.page_group_bytes / GIB:.2f} "
        f"GiB per shard) for one full-length request, but the KV pool holds {capacity_groups} "
        f"({capacity_groups * layout.page_group_bytes / GIB:.2f} GiB). {lower} the KV cache more memory "
        "(gpu_memory_utilization, kv_cache_memory_bytes), or use more tensor parallelism")
