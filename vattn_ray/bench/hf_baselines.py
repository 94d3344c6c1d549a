"""transformers baselines for the throughput bench: static-batch `generate` and `generate_batch`.

Both take uniform-length jobs only (the fixed workload): static batches need equal prompt lengths
and one `max_new_tokens`. They return the same measurement fields as the other systems.
"""

from __future__ import annotations

import gc
import time

import torch

from vattn_ray.bench.vattn_system import GIB, sync, used_bytes
from vattn_ray.bench.workloads import Job


def uniform(job: Job) -> str | None:
    """Why the baselines cannot run `job`, or None when they can."""
    if len({len(p) for p in job.prompts}) > 1 or len(set(job.max_tokens)) > 1:
        return "transformers baselines run uniform-length workloads only (static batches)"
    return None


def load(model_dir: str, dtype: str, device: torch.device):
    """The same checkpoint through transformers' own loader (sdpa attention, bench dtype)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                attn_implementation="sdpa").to(device).eval()


def run_generate(model_dir: str, dtype: str, device: torch.device, job: Job, batch: int) -> dict:
    model = load(model_dir, dtype, device)
    n = job.max_tokens[0]
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
    try:
        with torch.no_grad():
            model.generate(torch.tensor(job.prompts[:1], device=device), max_new_tokens=4, do_sample=False)
            sync(device)
            t0 = time.perf_counter()
            out_tokens = 0
            for i in range(0, len(job.prompts), batch):
                ids = torch.tensor(job.prompts[i:i + batch], device=device)
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
                out_tokens += (seq.shape[1] - ids.shape[1]) * ids.shape[0]
            sync(device)
            seconds = time.perf_counter() - t0
        return _result(job, seconds, out_tokens, device)
    finally:
        del model
        _release(device)


def run_generate_batch(model_dir: str, dtype: str, device: torch.device, job: Job) -> dict:
    from transformers import GenerationConfig

    model = load(model_dir, dtype, device)
    try:
        if not hasattr(model, "generate_batch"):
            return {"error": "this transformers has no generate_batch"}
        cfg = GenerationConfig(max_new_tokens=job.max_tokens[0], do_sample=False, eos_token_id=-1)
        model.generate_batch(inputs=job.prompts[:2],
                             generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1))
        sync(device)
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=job.prompts, generation_config=cfg)
        sync(device)
        seconds = time.perf_counter() - t0
        return _result(job, seconds, sum(len(o.generated_tokens) for o in outs.values()), device)
    finally:
        del model
        _release(device)


def _result(job: Job, seconds: float, out_tokens: int, device: torch.device) -> dict:
    return {"seconds": seconds, "requests": len(job.prompts), "prompt_tokens": sum(len(p) for p in job.prompts),
            "output_tokens": out_tokens, "device_memory_in_use_gib": used_bytes(device) / GIB}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
