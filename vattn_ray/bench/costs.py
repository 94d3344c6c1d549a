"""What a model costs per token, from its checkpoint alone: one formula for every system compared.

Parameters are counted from the safetensors headers (exact, no weights loaded); shapes come from
config.json. Used for prefill TFLOP/s and for the decode bandwidth roofline.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelCosts:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int  # every tensor in the checkpoint
    embedding_params: int  # the input embedding table (gathered by row, not multiplied)
    lm_head_params: int  # the output projection (0 in the file when tied to the embedding)
    dtype_bytes: int

    @classmethod
    def from_checkpoint(cls, model_dir: str, dtype: str) -> "ModelCosts":
        with open(os.path.join(model_dir, "config.json")) as f:
            hf = json.load(f)
        counts = _param_counts(model_dir)
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        return cls(layers=int(hf["num_hidden_layers"]), hidden=hidden, heads=heads,
                   kv_heads=int(hf.get("num_key_value_heads") or heads),
                   head_dim=int(hf.get("head_dim") or hidden // heads), vocab=int(hf["vocab_size"]),
                   tied=bool(hf.get("tie_word_embeddings", False)), params=sum(counts.values()),
                   embedding_params=sum(n for k, n in counts.items() if k.endswith("embed_tokens.weight")),
                   lm_head_params=sum(n for k, n in counts.items() if k.startswith("lm_head.")),
                   dtype_bytes=DTYPE_BYTES[dtype])

    @property
    def body_params(self) -> int:
        """Parameters every token multiplies by: all but the embedding table and the LM head."""
        return self.params - self.embedding_params - self.lm_head_params

    def prefill_flops(self, prompt_lens: list[int]) -> int:
        """FLOPs of prefilling these prompts and computing one token's logits for each.

        2 * body params * tokens (the matmuls), + 2 * vocab * hidden per request (logits of the
        last position only, as both engines compute), + causal attention: per layer and query
        head, QK^T and PV are each 2 * head_dim FLOPs per (query, key) pair, and a prompt of L
        tokens has L * (L + 1) / 2 pairs.
        """
        tokens = sum(prompt_lens)
        pairs = sum(n * (n + 1) // 2 for n in prompt_lens)
        return (2 * self.body_params * tokens + 2 * self.vocab * self.hidden * len(prompt_lens)
                + 4 * self.layers * self.heads * self.head_dim * pairs)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def decode_bytes(self, context_tokens: float) -> float:
        """Bytes one decode step must read: every streamed weight once + the KV of the context.

        The embedding table is gathered by row, so it is left out unless it doubles as the LM head.
        """
        streamed = self.params - (0 if self.tied else self.embedding_params)
        return streamed * self.dtype_bytes + context_tokens * self.kv_bytes_per_token


def _param_counts(model_dir: str) -> dict[str, int]:
    """Tensor name -> element count, read from the safetensors headers."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir!r}")
    counts: dict[str, int] = {}
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                numel = 1
                for d in meta["shape"]:
                    numel *= int(d)
                counts[name] = numel
    return counts
