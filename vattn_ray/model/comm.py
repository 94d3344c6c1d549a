"""Tensor-parallel all-reduce. HOT PATH (`all_reduce`, twice per layer).

A decode step all-reduces small tensors (batch x hidden: 2 MiB at batch 256 of an 8B model), 64
times. NCCL needs ~38 us for that on 2xH200 (latency-bound); kernels that read and write the peers'
buffers directly over NVLink (PyTorch's symmetric memory) need ~17 us, and ~8 us for one row. So:

- up to `ONE_SHOT_MAX_BYTES`: one-shot (every rank reads every peer's whole buffer and sums);
- up to the symmetric buffer's size: two-shot (reduce-scatter then all-gather over P2P);
- above, or when symmetric memory is unavailable or disabled: NCCL (gloo on CPU).

The symmetric buffer is allocated once at start-up, so the P2P path is captured in CUDA graphs
like any other kernel. The thresholds rest on `python -m vattn_ray.bench allreduce`
(docs/benchmarks.md §4b).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MIB = 1 << 20
ONE_SHOT_MAX_BYTES = 256 * 1024  # below this, one kernel with no intermediate barrier wins
SYMM_MAX_BYTES = 16 * MIB  # the largest symmetric buffer; NCCL takes anything bigger (it catches
# up with two-shot at ~32 MiB on 2xH200: docs/results/allreduce_2xh200.json)


class AllReduce:
    """Sum-all-reduce over one process group, choosing the method by size.

    `max_elems` is the largest tensor (in elements of `dtype`) that the P2P path should serve;
    `symm_mem=False` (or a CPU group) keeps every call on `torch.distributed.all_reduce`.
    """

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_elems: int,
                 symm_mem: bool = True) -> None:
        self.group = group
        self.dtype = dtype
        self.buffer: torch.Tensor | None = None
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if symm_mem and device.type == "cuda" and dist.get_world_size(group) > 1:
            nbytes = min(max_elems * dtype.itemsize, SYMM_MAX_BYTES)
            try:
                self.buffer = _symmetric_buffer(group, nbytes // dtype.itemsize, dtype, device)
            except Exception as exc:  # noqa: BLE001 - no P2P between these GPUs, or an old driver
                logger.warning("symmetric-memory all-reduce unavailable (%s); every all-reduce uses NCCL", exc)
        self.group_name = group.group_name

    def choose(self, x: torch.Tensor) -> str:
        """Which method serves `x`: "one_shot", "two_shot", or the group's backend."""
        nbytes = x.numel() * x.element_size()
        if self.buffer is None or x.dtype != self.dtype or x.numel() > self.buffer.numel() or nbytes % 16:
            return self.backend
        return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES else "two_shot"

    def __call__(self, x: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """`sum over ranks of x` (contiguous); `x` itself may be overwritten. `how` forces a
        method (the benchmark compares them); by default `choose` picks."""
        how = how or self.choose(x)
        if how == "one_shot":
            out = torch.empty_like(x)
            buf = self.buffer[:x.numel()]
            buf.copy_(x.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.group_name, out.view(-1))
            return out
        if how == "two_shot":
            buf = self.buffer[:x.numel()]
            buf.copy_(x.view(-1))
            torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
            x.view(-1).copy_(buf)
            return x
        dist.all_reduce(x, group=self.group)
        return x


def _symmetric_buffer(group, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    import torch.distributed._symmetric_memory as symm_mem

    if hasattr(symm_mem, "set_backend"):
        try:
            symm_mem.set_backend("CUDA")  # P2P through CUDA IPC; NVSHMEM needs its own bootstrap
        except Exception:  # noqa: BLE001 - already chosen by an earlier allocation
            pass
    buf = symm_mem.empty(numel, dtype=dtype, device=device)
    symm_mem.rendezvous(buf, group.group_name)
    # One real call at start-up: a failure shows here, not inside a captured graph.
    buf.fill_(1)
    torch.ops.symm_mem.two_shot_all_reduce_(buf[:4096], "sum", group.group_name)
    torch.cuda.synchronize(device)
    if buf[0].item() != dist.get_world_size(group):
        raise RuntimeError("symmetric-memory all-reduce gave a wrong sum at start-up")
    return buf


_ACTIVE: AllReduce | None = None


def install(all_reduce: AllReduce | None) -> None:
    """Make `all_reduce` the one the model's layers use in this process (one worker per process)."""
    global _ACTIVE
    _ACTIVE = all_reduce


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group (the installed `AllReduce`, else the default group)."""
    if _ACTIVE is not None:
        return _ACTIVE(x)
    dist.all_reduce(x)
    return x
