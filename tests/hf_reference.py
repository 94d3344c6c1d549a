"""transformers' own greedy generation: the reference the CPU parity tests compare against."""

from __future__ import annotations

import torch

_MODELS: dict = {}


def hf_model(path: str):
    """transformers' model of a checkpoint in float32 (loaded once per path)."""
    from transformers import AutoModelForCausalLM

    if path not in _MODELS:
        _MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _MODELS[path]


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int, **generate_kwargs) -> list[list[int]]:
    """Greedy token ids from transformers in float32, one prompt at a time (no padding effects).

    `generate_kwargs` go to `generate` (e.g. `repetition_penalty`)."""
    model = hf_model(path)
    outs = []
    for p in prompts:
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long), **generate_kwargs)
        outs.append(seq[0, len(p):].tolist())
    return outs
