"""Engine configuration: user-facing `EngineArgs` resolved once into a frozen `EngineConfig`.

Field names follow vLLM's where the meaning is the same. "auto" values are filled in by
`EngineArgs.resolve()` (reading the checkpoint's config.json) before anything is frozen; sizes
derived later (the KV layout, the pool size) live in their own objects, never in the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "triton", "torch", "flash_attn", "sdpa")
MIB = 1 << 20


@dataclass(frozen=True)
class ModelConfig:
    model: str  # local Hugging Face checkpoint directory
    dtype: str  # resolved: one of DTYPES
    max_model_len: int
    seed: int = 0
    tokenizer: str | None = None  # defaults to `model`
    # SamplingParams fields recommended by generation_config.json (see vattn_ray/startup.py)
    sampling_defaults: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CacheConfig:
    kv_layers_per_tensor: int  # G: layers sharing one virtual tensor (resolved, divides num_layers)
    page_bytes: int  # physical page size (CUDA: the VMM granularity, 2 MiB)
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit KV budget per shard; overrides utilization
    enable_prefetch: bool = True  # map next step's pages in the background while this one runs


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # = number of KV slots
    max_num_batched_tokens: int  # per-step token budget
    max_model_len: int
    enable_chunked_prefill: bool = True
    # Plan step t+1 while step t runs on the device (used when the executor can overlap steps).
    async_scheduling: bool = True
    # Waiting sequences beyond which new requests are refused (QueueFull; HTTP 429); None: no bound.
    max_queued_requests: int | None = None
    # Share the KV of cached prompt prefixes between requests (see docs/prefix-caching.md).
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    placement_strategy: str = "STRICT_PACK"
    accelerator_type: str | None = None
    # False: every all-reduce through NCCL, no peer-to-peer kernel (vLLM's flag of the same name).
    disable_custom_all_reduce: bool = False


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: str  # resolved: "cpu" or "cuda"
    attention_backend: str  # resolved: "triton" | "torch" | "flash_attn" | "sdpa"
    enforce_eager: bool = False  # True: no CUDA-graph capture of decode steps
    # The engine counts as stuck (unhealthy) when it has work but no step finished for this long.
    step_timeout_s: float = 60.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EngineArgs:
    """Everything a user may set, "auto" allowed; `resolve()` turns it into an `EngineConfig`."""

    model: str
    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True  # map cached prompt prefixes instead of recomputing them
    async_scheduling: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    kv_layers_per_tensor: int | str = "auto"
    page_bytes: int | None = None  # None: 2 MiB (the CUDA granularity; host default too)
    enable_prefetch: bool = True
    attention_backend: str = "auto"
    placement_strategy: str = "STRICT_PACK"
    accelerator_type: str | None = None
    disable_custom_all_reduce: bool = False  # True: NCCL for every all-reduce (see model/comm.py)
    seed: int = 0
    enforce_eager: bool = False
    max_queued_requests: int | None = None  # serving: bound the waiting queue (429 beyond it)
    step_timeout_s: float = 60.0  # serving: a step running longer marks the engine unhealthy
    generation_config: str = "auto"  # "auto": the checkpoint's sampling defaults; "vllm": none; or a dir
    extra: dict = field(default_factory=dict)

    def resolve(self) -> EngineConfig:
        """Validate, fill in every "auto" from the checkpoint and the machine, and freeze."""
        model = resolve_model_path(self.model)
        hf = read_hf_config(model)
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, hf, device)
        limit = int(hf.get("max_position_embeddings") or 2048)
        max_model_len = limit if self.max_model_len is None else int(self.max_model_len)
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={limit}; set max_model_len <= {limit}")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({max_model_len}); enable chunked prefill or raise the budget")
        if self.max_queued_requests is not None:
            _positive("max_queued_requests", self.max_queued_requests)
        if not (isinstance(self.step_timeout_s, (int, float)) and self.step_timeout_s > 0):
            raise ValueError(f"step_timeout_s must be a number > 0, got {self.step_timeout_s!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        num_layers = int(hf["num_hidden_layers"])
        layers_per_tensor = resolve_layers_per_tensor(self.kv_layers_per_tensor, num_layers)
        page_bytes = int(self.page_bytes or 2 * MIB)
        if page_bytes <= 0 or page_bytes % os.sysconf("SC_PAGE_SIZE"):
            raise ValueError(f"page_bytes={page_bytes} must be a positive multiple of the OS page size")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        from vattn_ray.attention import resolve_backend

        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
        backend = resolve_backend(self.attention_backend, device, head_dim, dtype)
        from vattn_ray.startup import sampling_defaults

        return EngineConfig(
            model=ModelConfig(model, dtype, max_model_len, self.seed, self.tokenizer,
                              sampling_defaults(model, self.generation_config)),
            cache=CacheConfig(layers_per_tensor, page_bytes, self.gpu_memory_utilization,
                              self.kv_cache_memory_bytes, self.enable_prefetch),
            scheduler=SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, max_model_len,
                                      self.enable_chunked_prefill, bool(self.async_scheduling),
                                      max_queued_requests=self.max_queued_requests,
                                      enable_prefix_caching=bool(self.enable_prefix_caching)),
            parallel=ParallelConfig(self.tensor_parallel_size, self.placement_strategy, self.accelerator_type,
                                    bool(self.disable_custom_all_reduce)),
            device=device,
            attention_backend=backend,
            enforce_eager=bool(self.enforce_eager),
            step_timeout_s=float(self.step_timeout_s),
        )


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def resolve_model_path(model: str) -> str:
    """A checkpoint directory; `builtin:<name>` is a tiny model built on first use into a cache, and
    a Hugging Face repo id ("org/name") is fetched into the Hugging Face cache (as vLLM does)."""
    if model.startswith("builtin:"):
        from vattn_ray.model.builder import ensure_builtin_model

        return ensure_builtin_model(model.split(":", 1)[1])
    if not os.path.isdir(model):
        from vattn_ray.hub import resolve_hub_model

        return resolve_hub_model(model)
    return model


def read_hf_config(model_dir: str) -> dict:
    """The checkpoint's config.json as a dict, with a clear error when the directory is wrong."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in model directory {model_dir!r}; pass a local "
                                "Hugging Face checkpoint directory")
    with open(path) as f:
        return json.load(f)


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, hf: dict, device: str) -> str:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, got {dtype!r}")
        return dtype
    if device == "cpu":
        return "float32"  # CPU kernels for half types are slow and parity is checked in float32
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16").replace("torch.", "")
    return name if name in DTYPES and name != "float32" else "bfloat16"


def resolve_layers_per_tensor(value: int | str, num_layers: int) -> int:
    """G: "auto" puts every layer in one tensor (finest token granularity per 2 MiB page)."""
    if value == "auto":
        return num_layers
    g = int(value)
    if g < 1 or num_layers % g:
        divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise ValueError(f"kv_layers_per_tensor={value} must divide num_hidden_layers={num_layers}; "
                         f"choose one of {divisors}")
    return g
