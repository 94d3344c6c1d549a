"""Tensor-parallel building blocks. Each layer owns its shard math and does its collective visibly.

Every layer takes `(rank, world_size)` explicitly and allocates only its shard. `load(name, slice)`
copies this rank's part of a checkpoint tensor (`slice` is a safetensors slice or a tensor, so
only the needed rows/columns are read). HOT PATH (forward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vattn_ray.model import comm, fused


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _copy(dst: torch.Tensor, src) -> None:
    """Copy a safetensors slice (already narrowed) or a tensor into `dst`, checking the shape."""
    src = src if isinstance(src, torch.Tensor) else src[:]
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def divide(n: int, world_size: int, what: str) -> int:
    if n % world_size:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={world_size}")
    return n // world_size


_MM_FLOAT32_OUT: bool | None = None  # whether this torch has `mm(..., out_dtype=float32)` on CUDA


def float32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.T` as float32, from half-precision inputs without rounding the result to half."""
    global _MM_FLOAT32_OUT
    if x.dtype == torch.float32:
        return F.linear(x, w)
    if x.is_cuda:
        if _MM_FLOAT32_OUT is None:  # probed once, eagerly (the first call is never in a graph capture)
            try:
                torch.mm(x[:1], w[:1].t(), out_dtype=torch.float32)
                _MM_FLOAT32_OUT = True
            except (RuntimeError, TypeError):
                _MM_FLOAT32_OUT = False
        if _MM_FLOAT32_OUT:
            return torch.mm(x, w.t(), out_dtype=torch.float32)
    return F.linear(x, w).float()


class RMSNorm(nn.Module):
    """Replicated on every rank; computes in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(x + residual), x + residual)` in one pass: the residual add fused into the norm."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)

    def load(self, name: str, src) -> None:
        _copy(self.weight.data, src)


class MergedColumnParallelLinear(nn.Module):
    """`y = x W^T (+ b)` for several stacked outputs (q|k|v or gate|up), each split by rows.

    `parts` maps a checkpoint name suffix to (full rows, this rank's first row, local rows); the
    local weight is the concatenation of the parts' local rows. No communication: the output stays
    sharded for the following row-parallel layer.
    """

    def __init__(self, in_features: int, parts: dict[str, tuple[int, int, int]], *, bias: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.parts = parts
        self.offsets: dict[str, int] = {}
        rows = 0
        for key, (_, _, local) in parts.items():
            self.offsets[key] = rows
            rows += local
        self.weight = _param(rows, in_features, dtype=dtype, device=device)
        self.bias = _param(rows, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, part: str, kind: str, src) -> None:
        """Copy rows [first, first + local) of checkpoint tensor `part`.{weight|bias}."""
        _, first, local = self.parts[part]
        dst = self.weight if kind == "weight" else self.bias
        if dst is None:
            raise ValueError(f"checkpoint has a {part} bias but the config says attention_bias=False")
        start = self.offsets[part]
        _copy(dst.data[start:start + local], src[first:first + local])


class RowParallelLinear(nn.Module):
    """`y = x W^T` with W split by columns: each rank multiplies its input shard, then all-reduce."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, world_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.world_size = world_size
        self.local_in = divide(in_features, world_size, "row-parallel input features")
        self.first = rank * self.local_in
        self.weight = _param(out_features, self.local_in, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.world_size > 1:
            y = comm.all_reduce(y)  # partial sums of every rank's input shard
        return y

    def load(self, name: str, src) -> None:
        _copy(self.weight.data, src[:, self.first:self.first + self.local_in])


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; out-of-range ids give 0, then all-reduce."""

    def __init__(self, vocab_size: int, dim: int, *, rank: int, world_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.world_size = world_size
        self.local_vocab = -(-vocab_size // world_size)  # the last shard may be partly padding
        self.first = rank * self.local_vocab
        self.weight = _param(self.local_vocab, dim, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        inside = (local >= 0) & (local < self.local_vocab)
        y = F.embedding(local.clamp(0, self.local_vocab - 1), self.weight) * inside[:, None].to(self.weight.dtype)
        return comm.all_reduce(y)  # each id's row lives on exactly one rank

    def load(self, name: str, src) -> None:
        rows = max(0, min(self.local_vocab, self.vocab_size - self.first))
        self.weight.data[rows:].zero_()
        _copy(self.weight.data[:rows], src[self.first:self.first + rows])


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary range, all-gathered into the full vocabulary."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 straight out of the GEMM (which accumulates in float32 anyway): a bf16 logit
        # moves in steps of 0.03-0.06 at typical magnitudes, enough to flip a greedy pick between
        # near-tied tokens; writing float32 costs one more [n, vocab/tp] of bytes, no extra pass.
        local = float32_linear(hidden, self.weight)
        if self.world_size == 1:
            return local[:, :self.vocab_size]
        shards = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(shards, local)  # every rank ends with the full vocabulary
        return torch.cat(shards, dim=-1)[:, :self.vocab_size]
