"""Small host-to-device copies on the step path, without stalling the host.

A copy from pageable host memory waits for the GPU work already queued, which would serialise
the head with the device; a copy from pinned memory with `non_blocking=True` is queued behind it
instead. Every per-step host->device transfer goes through here.
"""

from __future__ import annotations

import torch


def host_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` on `device`: pinned and copied without blocking on CUDA; as it is elsewhere."""
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small host list as a `dtype` tensor on `device` (see `host_to_device`)."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)
