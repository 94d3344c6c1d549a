"""Ray Serve LLM-shaped application arguments -> this app's flat `AppArgs`.

A Ray Serve LLM config ports by changing its ``import_path`` to ``deploy.app:build_openai_app``
(or ``deploy.app:build_app``): ``args`` may be ``{"llm_configs": [<LLMConfig>]}`` (the shape of
``ray.serve.llm:build_openai_app``) or one LLMConfig itself. An LLMConfig entry may also be the
path of a YAML/JSON file holding one, as in Ray. One application serves one model.

| Ray Serve LLM | here |
|---|---|
| `model_loading_config.model_id` | `served_model_name` |
| `model_loading_config.model_source` (default: `model_id`) | `model` (a directory, `builtin:<name>`, or a Hugging Face repo id) |
| `model_loading_config.tokenizer_source` | `tokenizer` |
| `engine_kwargs.<vLLM engine argument>` | the argument of the same name (see `ENGINE_ARGS`); others are refused, a few no-ops accepted (`IGNORED_ENGINE_KWARGS`) |
| `deployment_config.{num_replicas, autoscaling_config, max_ongoing_requests, max_queued_requests, health_check_period_s, health_check_timeout_s}` | the same names |
| `placement_group_config.strategy` | `placement_strategy` |
| `placement_group_config.bundles` / `bundle_per_worker` (one per TP worker) | `worker_cpus` (their `CPU`) |
| `accelerator_type` | `accelerator_type` |
| `llm_engine: vLLM`, `log_engine_metrics` | accepted (metrics are always exported) |
Anything else (LoRA, runtime_env, cloud mirrors, ...) is refused with a message naming it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import yaml

logger = logging.getLogger("ray.serve")

# vLLM engine arguments with a flat argument of the same name and meaning here.
ENGINE_ARGS = ("tensor_parallel_size", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
               "gpu_memory_utilization", "kv_cache_memory_bytes", "seed", "tokenizer", "device",
               "enable_prefix_caching")
# vLLM engine arguments that are fields of vattn_ray.config.EngineArgs (passed as engine_kwargs).
ENGINE_KWARGS = ("enforce_eager", "enable_chunked_prefill", "generation_config", "disable_custom_all_reduce")
# vLLM engine arguments accepted with no effect here: value -> why (None: any value).
IGNORED_ENGINE_KWARGS: dict[str, tuple[Any, str]] = {
    "trust_remote_code": (None, "only the built-in Llama-family model code runs; no remote code is loaded"),
    "disable_log_stats": (None, "engine statistics are always kept"),
    "enable_log_requests": (None, "requests are not logged"),
    "pipeline_parallel_size": (1, "no pipeline parallelism"),
    "distributed_executor_backend": ("ray", "tensor-parallel workers are Ray actors"),
}
DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
                   "health_check_period_s", "health_check_timeout_s")
_LLM_CONFIG_KEYS = {"model_loading_config", "engine_kwargs", "deployment_config", "placement_group_config",
                    "accelerator_type", "llm_engine", "log_engine_metrics", "runtime_env", "lora_config",
                    "experimental_configs", "callback_config", "accelerator_config"}


def is_llm_config_shaped(args: dict) -> bool:
    """Whether `args` is Ray Serve LLM-shaped (else: this app's flat arguments)."""
    return "llm_configs" in args or "model_loading_config" in args


def to_app_args(args: dict) -> dict:
    """The flat `AppArgs` dict of Ray Serve LLM-shaped `args`; ValueError naming what to change."""
    if "llm_configs" in args:
        extra = sorted(set(args) - {"llm_configs"})
        if extra:
            raise ValueError(f"{extra}: only llm_configs is supported next to it (the OpenAI routes are "
                             "served by the model's own replicas, there is no separate ingress)")
        configs = args["llm_configs"]
        if not isinstance(configs, list) or len(configs) != 1:
            raise ValueError("llm_configs must hold exactly one model: one application serves one model; "
                             "deploy one application (with its own route_prefix) per model")
        config = configs[0]
        if isinstance(config, str):
            config = _load_file(config)
        return from_llm_config(config)
    return from_llm_config(args)


def from_llm_config(config: dict) -> dict:
    """One Ray Serve LLM `LLMConfig` (as a dict) -> flat `AppArgs` fields."""
    if not isinstance(config, dict):
        raise ValueError(f"an LLMConfig must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - _LLM_CONFIG_KEYS)
    if unknown:
        from deploy.args import AppArgs

        flat = [k for k in unknown if k in AppArgs.model_fields]
        if flat:
            raise ValueError(f"args mix Ray Serve LLM keys (model_loading_config, ...) with flat keys {flat}; "
                             "use one shape: engine arguments go under engine_kwargs, Serve options under "
                             "deployment_config (see docs/coming-from-vllm.md)")
        raise ValueError(f"{unknown} are not LLMConfig fields this app understands; known: {sorted(_LLM_CONFIG_KEYS)}")
    _refuse_set(config, "runtime_env", "set the environment on the cluster (image, KubeRay pod spec)")
    _refuse_set(config, "lora_config", "LoRA adapters are not supported yet")
    _refuse_set(config, "experimental_configs", "none is supported")
    _refuse_set(config, "callback_config", "start-up callbacks are not supported")
    _refuse_set(config, "accelerator_config", "use accelerator_type")
    if str(config.get("llm_engine", "vLLM")).lower() != "vllm":
        raise ValueError(f"llm_engine={config['llm_engine']!r}: this app is the engine; omit llm_engine or "
                         "leave it at 'vLLM'")
    out: dict[str, Any] = {}
    out.update(_model_loading(config.get("model_loading_config")))
    out.update(_engine_kwargs(config.get("engine_kwargs") or {}))
    out.update(_deployment(config.get("deployment_config") or {}))
    if config.get("accelerator_type"):
        out["accelerator_type"] = config["accelerator_type"]
    out.update(_placement(config.get("placement_group_config"), out.get("tensor_parallel_size", 1)))
    return out


def _model_loading(mlc: Any) -> dict:
    if not isinstance(mlc, dict) or not mlc.get("model_id"):
        raise ValueError("model_loading_config with a model_id is required, e.g. model_loading_config: "
                         "{model_id: my-model, model_source: /models/my-checkpoint}")
    extra = sorted(set(mlc) - {"model_id", "model_source", "tokenizer_source"})
    if extra:
        raise ValueError(f"model_loading_config.{extra[0]} is not supported; use model_id, model_source, "
                         "tokenizer_source")
    source = mlc.get("model_source") or mlc["model_id"]
    if not isinstance(source, str):
        raise ValueError("model_loading_config.model_source must be a checkpoint directory or a Hugging Face "
                         "repo id; cloud mirrors (S3/GCS) are not supported yet: copy the checkpoint to a "
                         "volume and point model_source at it")
    out = {"model": source, "served_model_name": mlc["model_id"]}
    if mlc.get("tokenizer_source"):
        out["tokenizer"] = mlc["tokenizer_source"]
    return out


def _engine_kwargs(kwargs: dict) -> dict:
    out: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ENGINE_ARGS:
            out[key] = value
        elif key in ENGINE_KWARGS:
            passthrough[key] = value
        elif key in IGNORED_ENGINE_KWARGS:
            wanted, why = IGNORED_ENGINE_KWARGS[key]
            if wanted is not None and value != wanted:
                raise ValueError(f"engine_kwargs.{key}={value!r} is not supported ({why}); omit it or set {wanted!r}")
            logger.info("engine_kwargs.%s=%r has no effect here: %s", key, value, why)
        elif key == "served_model_name":
            raise ValueError("engine_kwargs.served_model_name: name the model with model_loading_config.model_id")
        else:
            raise ValueError(f"engine_kwargs.{key} is not supported by vattn-ray; supported: "
                             f"{sorted(ENGINE_ARGS + ENGINE_KWARGS)} (no-ops accepted: {sorted(IGNORED_ENGINE_KWARGS)})")
    if passthrough:
        out["engine_kwargs"] = passthrough
    return out


def _deployment(dc: dict) -> dict:
    extra = sorted(set(dc) - set(DEPLOYMENT_KEYS))
    if extra:
        raise ValueError(f"deployment_config.{extra[0]} is not supported yet; supported: {list(DEPLOYMENT_KEYS)} "
                         "(placement and actor resources are derived from tensor_parallel_size)")
    return dict(dc)


def _placement(pgc: Any, tp: int) -> dict:
    if not pgc:
        return {}
    if not isinstance(pgc, dict) or set(pgc) - {"bundles", "bundle_per_worker", "strategy"}:
        raise ValueError("placement_group_config takes bundles (or bundle_per_worker) and strategy")
    out: dict[str, Any] = {}
    if "strategy" in pgc:
        out["placement_strategy"] = pgc["strategy"]
    bundles = [pgc["bundle_per_worker"]] * tp if pgc.get("bundle_per_worker") else pgc.get("bundles")
    if bundles is None:
        return out
    if not isinstance(bundles, list) or len(bundles) != tp:
        raise ValueError(f"placement_group_config.bundles must hold one bundle per tensor-parallel worker "
                         f"({tp}), got {len(bundles) if isinstance(bundles, list) else bundles!r}")
    cpus = set()
    for b in bundles:
        resources = {k for k in b if not k.startswith("accelerator_type:")}
        if resources - {"CPU", "GPU"} or b.get("GPU", 1) not in (0, 1):
            raise ValueError(f"placement_group_config bundle {b}: a bundle holds CPU and at most one GPU "
                             "(one TP worker); use accelerator_type to pick the GPU model")
        cpus.add(float(b.get("CPU", 0)))
    if len(cpus) != 1:
        raise ValueError(f"placement_group_config bundles ask for different CPU counts {sorted(cpus)}; "
                         "every TP worker gets the same")
    out["worker_cpus"] = cpus.pop()
    return out


def _refuse_set(config: dict, key: str, why: str) -> None:
    if config.get(key):
        raise ValueError(f"{key} is not supported: {why}")


def _load_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"llm_configs entry {path!r} is neither an LLMConfig nor a file holding one")
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else yaml.safe_load(f)
