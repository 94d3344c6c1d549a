"""transformers' own greedy generation: the reference the CPU parity tests compare against."""

from __future__ import annotations

import torch

_MODELS: dict = {}


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids from transformers in float32, one prompt at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    if path not in _MODELS:
        _MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = _MODELS[path]
    outs = []
    for p in prompts:
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
        outs.append(seq[0, len(p):].tolist())
    return outs
