"""vattn-ray: LLM serving on Ray with a demand-paged virtual-memory KV cache."""

from vattn_ray.outputs import CompletionOutput, RequestOutput
from vattn_ray.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineArgs"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the engine is actually used.
    if name == "LLM":
        from vattn_ray.llm import LLM

        return LLM
    if name == "EngineArgs":
        from vattn_ray.config import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'vattn_ray' has no attribute {name!r}")
