"""Typed arguments of the Serve application (the ``args:`` block of a Serve config file)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploy.limits import DEFAULT_MAX_REQUEST_BYTES
from vattn_ray.config import EngineArgs
from vattn_ray.elastic.policy import ElasticConfig

# Engine knobs are declared once, in EngineArgs; the app takes their defaults from there.
_ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineArgs)}


class AppArgs(BaseModel):
    """What `deploy.app:build_app` accepts. Engine fields keep vLLM's names."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # --- the model
    model: str = Field("builtin:tiny-llama", description="Hugging Face checkpoint directory, or "
                       "builtin:<name> for a tiny random model built on first use")
    served_model_name: str | list[str] | None = Field(
        None, description="Name(s) clients send as `model` (a list: any of them; responses and metrics "
        "use the first); default: the builtin name or the checkpoint directory's name")
    tokenizer: str | None = None
    # --- the engine
    tensor_parallel_size: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    kv_layers_per_tensor: int | Literal["auto"] = "auto"
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    attention_backend: Literal["auto", "triton", "torch", "flash_attn", "sdpa"] = "auto"
    seed: int = 0
    max_queued_requests: int | None = Field(_ENGINE_DEFAULTS["max_queued_requests"], ge=1, description=(
        "Sequences that may wait for a KV slot; past it requests get 429 with Retry-After"))
    enable_prefix_caching: bool = Field(_ENGINE_DEFAULTS["enable_prefix_caching"], description=(
        "Serve repeated prompt prefixes from the KV of earlier requests (mapped, not recomputed)"))
    step_timeout_s: float = Field(_ENGINE_DEFAULTS["step_timeout_s"], gt=0, description=(
        "The watchdog: with work but no step finished for this long, /health turns 503"))
    # --- elastic memory (docs/elastic.md): the fields and defaults are ElasticConfig's
    elastic: ElasticConfig | None = Field(None, description=(
        "Host an elastic pair in each replica (two TP groups that merge into a pipeline under a burst, "
        "lending weight memory to the KV cache): merge_kv_usage, split_kv_usage, falling_checks, "
        "check_interval_s, min_merged_s, min_split_s, enabled; {} takes every default"))
    # --- HTTP
    api_key: str | None = Field(None, description="Require 'Authorization: Bearer <key>' on /v1/* and "
                                "/stats (default: the VATTN_RAY_API_KEY environment variable, if set)")
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=1, description="Largest request body (413)")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Other engine arguments "
                                          "(fields of vattn_ray.config.EngineArgs, e.g. enforce_eager, "
                                          "enable_chunked_prefill, generation_config)")
    # --- placement (see placement/)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "STRICT_PACK"
    accelerator_type: str | None = None
    replica_cpus: float = Field(1.0, ge=0, description="CPUs of the replica actor (in bundle 0)")
    worker_cpus: float = Field(1.0, ge=0, description="CPUs reserved for each TP worker")
    placement_check: bool = Field(True, description="Refuse to deploy when no node can ever hold "
                                  "one replica's placement group")
    placement_wait_s: float = Field(0.0, ge=0, description="How long the check waits for nodes to "
                                    "join (autoscaling clusters) before failing")
    # --- Ray Serve deployment options
    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)
    stats_interval_s: float = Field(1.0, gt=0, description="How often engine gauges are exported")
    # --- routing between replicas (deploy/routing.py)
    request_router: Literal["power_of_two", "round_robin", "prefix_aware"] = Field(
        "power_of_two", description="How Serve picks a replica: power_of_two (Serve's default: the "
        "less busy of two random replicas), round_robin, or prefix_aware (the replica that served the "
        "longest prefix of the prompt, unless it is much busier; adds a front deployment that reads "
        "the body first, see docs/prefix-caching.md)")
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "Options of the router (prefix_aware: block_chars, imbalanced_threshold, max_keys)"))
    ingress_max_ongoing_requests: int = Field(1024, ge=1, description=(
        "Requests the prefix_aware front deployment holds at once (it only forwards them)"))

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "AppArgs":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    @model_validator(mode="after")
    def _known_engine_kwargs(self) -> "AppArgs":
        engine_fields = {f.name for f in dataclasses.fields(EngineArgs)} - {"extra", "model"}
        for key in self.engine_kwargs:
            if key in type(self).model_fields:
                raise ValueError(f"engine_kwargs.{key}: set {key} as an argument of its own, not in engine_kwargs")
            if key not in engine_fields:
                raise ValueError(f"engine_kwargs.{key} is not an engine argument; known: {sorted(engine_fields)}")
        names = self.served_model_name
        if isinstance(names, list) and (not names or not all(names)):
            raise ValueError("served_model_name must be a name or a non-empty list of non-empty names")
        return self

    @property
    def served_names(self) -> list[str]:
        """Every name clients may send as `model`; the first one is reported."""
        if isinstance(self.served_model_name, list):
            return list(self.served_model_name)
        if self.served_model_name:
            return [self.served_model_name]
        if self.model.startswith("builtin:"):
            return [self.model.split(":", 1)[1]]
        return [os.path.basename(os.path.normpath(self.model))]

    @property
    def served_name(self) -> str:
        return self.served_names[0]

    def engine_args(self, device: str | None = None) -> EngineArgs:
        """The engine's arguments; `device` overrides "auto" with what placement resolved."""
        return EngineArgs(
            model=self.model, tokenizer=self.tokenizer, tensor_parallel_size=self.tensor_parallel_size,
            device=device or self.device, dtype=self.dtype, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes, kv_layers_per_tensor=self.kv_layers_per_tensor,
            attention_backend=self.attention_backend, placement_strategy=self.placement_strategy,
            accelerator_type=self.accelerator_type, seed=self.seed,
            max_queued_requests=self.max_queued_requests, step_timeout_s=self.step_timeout_s,
            enable_prefix_caching=self.enable_prefix_caching, **self.engine_kwargs)

    def deployment_options(self) -> dict[str, Any]:
        """Serve options that were set (unset ones keep Serve's defaults)."""
        names = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "health_check_period_s",
                 "health_check_timeout_s")
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        router = self.request_router_config()
        if router is not None:
            out["request_router_config"] = router
        return out

    def request_router_config(self) -> Any:
        """Serve's `RequestRouterConfig` for the chosen router (None: Serve's default)."""
        from ray.serve.config import RequestRouterConfig

        from deploy.routing import ROUTERS

        path = ROUTERS[self.request_router]
        if path is None:
            if self.request_router_kwargs:
                raise ValueError("request_router_kwargs are options of round_robin or prefix_aware routing; "
                                 "Serve's power_of_two router takes none")
            return None
        return RequestRouterConfig(request_router_class=path, request_router_kwargs=self.request_router_kwargs)
