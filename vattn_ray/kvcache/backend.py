"""One interface over physical memory that is mapped on demand into reserved virtual ranges.

Two implementations share these semantics, so CPU tests exercise the same demand paging the GPU
runs: `CudaVMM` (CUDA virtual-memory management) and `HostVMM` (memfd + mmap on Linux).

Semantics, identical on both:
- `reserve` returns a virtual range that holds no memory and may be far larger than the device.
- `create` makes one physical page (`page_bytes`) that lives until `release`; its contents survive
  any number of `map`/`unmap` cycles.
- `map` puts one page at a page-aligned address of a reservation, *without access*; `set_access`
  then makes a contiguous run of mapped pages readable and writable in one call (batched because
  the CUDA call costs ~36 µs however many pages it covers).
- `unmap` turns a run of mapped pages back into reservation. It does not wait for device work:
  callers that may still have kernels reading those pages call `synchronize()` first.
"""

from __future__ import annotations

import abc
from typing import Any

import torch


class PhysicalMemoryError(RuntimeError):
    """A backend call failed; the message names the call, the address and the size."""


class PhysicalMemory(abc.ABC):
    """Reserve virtual ranges and map physical pages into them on demand."""

    page_bytes: int  # granularity of create/map/unmap
    device: torch.device

    @abc.abstractmethod
    def reserve(self, size: int) -> int:
        """Reserve `size` bytes (a multiple of `page_bytes`) of virtual space; return its address."""

    @abc.abstractmethod
    def free_range(self, va: int, size: int) -> None:
        """Give back a reservation made by `reserve` (all its pages must be unmapped)."""

    @abc.abstractmethod
    def create(self) -> Any:
        """Create one physical page; return an opaque handle."""

    @abc.abstractmethod
    def release(self, handle: Any) -> None:
        """Destroy a page made by `create` (it must be unmapped everywhere)."""

    @abc.abstractmethod
    def map(self, va: int, handle: Any) -> None:
        """Map page `handle` at page-aligned `va` inside a reservation, with no access yet."""

    @abc.abstractmethod
    def set_access(self, va: int, size: int) -> None:
        """Make the mapped pages in [va, va+size) readable and writable by the device."""

    @abc.abstractmethod
    def unmap(self, va: int, size: int) -> None:
        """Unmap every page in [va, va+size), leaving the range reserved."""

    @abc.abstractmethod
    def wrap_bytes(self, va: int, size: int) -> torch.Tensor:
        """A 1-D uint8 tensor over [va, va+size) on `device`; reads no memory.

        On CUDA the first page of the range must be mapped while this runs (torch checks the
        pointer's attributes); see `KVManager` for how it arranges that.
        """

    def wrap(self, va: int, shape: tuple[int, ...], strides: tuple[int, ...],
             dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape`/`strides` (in elements) over memory starting at `va`; reads nothing."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
        nbytes = extent * itemsize
        raw = self.wrap_bytes(va, nbytes)
        # uint8 -> dtype keeps the same storage; as_strided then gives the requested geometry.
        return raw.view(dtype).as_strided(shape, strides)

    def synchronize(self) -> None:
        """Wait until device work queued so far is done (before unmapping pages it may read)."""

    def bind_thread(self) -> None:
        """Make the calling thread able to issue calls (CUDA: bind the context); no-op on host."""

    def total_memory(self) -> int | None:
        """Physical memory of the device in bytes, when known."""
        return None

    def free_memory(self) -> int | None:
        """Physical memory still available on the device in bytes, when known."""
        return None

    def close(self) -> None:
        """Release backend-wide resources (after every page and range has been given back)."""
