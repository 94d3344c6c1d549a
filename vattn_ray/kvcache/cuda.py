"""`CudaVMM`: GPU memory mapped on demand through the CUDA driver's virtual-memory API.

Uses `cuda.bindings.driver` (the optional `cuda-python` extra), imported on first use. Every driver
call returns a tuple whose first element is a `CUresult`; each one is checked and a failure raises
`PhysicalMemoryError` naming the call, the address and the size.

Measured on H100/H200 (see DESIGN.md): cuMemSetAccess costs ~36 µs a call whatever it covers, so
it is called once per contiguous run; cuMemUnmap must cover whole mappings, so it runs per page.
Driver calls need a current context on the calling thread: `bind_thread` binds the device's primary
context (the one torch uses) and the KV manager calls it on its prefetch thread.
"""

from __future__ import annotations

from typing import Any

import torch

from vattn_ray.kvcache.backend import PhysicalMemory, PhysicalMemoryError


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as e:  # optional dependency
        raise ImportError("CudaVMM needs the CUDA Python bindings: pip install 'vattn-ray[gpu]' "
                          "(or pip install cuda-bindings)") from e
    return driver


class _CudaBytes:
    """A bare `__cuda_array_interface__` (uint8, 1-D) that torch.as_tensor can wrap without copy."""

    def __init__(self, ptr: int, size: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None,
        }


class CudaVMM(PhysicalMemory):
    """Pinned device memory of one GPU, created in `page_bytes` pages and mapped on demand."""

    def __init__(self, device: str | torch.device = "cuda", page_bytes: int | None = None) -> None:
        self._d = d = _driver()
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaVMM needs a cuda device, got {device}")
        index = torch.cuda.current_device() if device.index is None else device.index
        self.device = torch.device("cuda", index)
        torch.cuda.init()
        # Make sure torch's (primary) context exists, then hold a reference to it for our threads.
        torch.empty(1, device=self.device)
        self._check(d.cuInit(0), "cuInit")
        self._dev = self._check(d.cuDeviceGet(index), "cuDeviceGet", index=index)
        self._ctx = self._check(d.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
        self.bind_thread()

        self._prop = prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        prop.requestedHandleTypes = d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        granularity = int(self._check(d.cuMemGetAllocationGranularity(
            prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity"))
        page_bytes = granularity if page_bytes is None else page_bytes
        if page_bytes <= 0 or page_bytes % granularity:
            raise ValueError(f"page_bytes={page_bytes} must be a positive multiple of the CUDA VMM "
                             f"granularity ({granularity} bytes)")
        self.page_bytes = page_bytes
        self.granularity = granularity
        self._access = d.CUmemAccessDesc()
        self._access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._closed = False

    def _check(self, result: tuple, call: str, va: int | None = None, size: int | None = None,
               **extra: Any) -> Any:
        err = result[0]
        if err != self._d.CUresult.CUDA_SUCCESS:
            _, name = self._d.cuGetErrorName(err)
            _, text = self._d.cuGetErrorString(err)
            parts = [f"0x{va:x}" if va is not None else None,
                     f"size={size}" if size is not None else None,
                     *(f"{k}={v}" for k, v in extra.items())]
            args = ", ".join(p for p in parts if p)
            raise PhysicalMemoryError(f"{call}({args}) failed: {_text(name)}: {_text(text)}")
        if len(result) == 1:
            return None
        return result[1] if len(result) == 2 else result[1:]

    def _ptr(self, va: int) -> Any:
        return self._d.CUdeviceptr(va)

    def bind_thread(self) -> None:
        self._check(self._d.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    # -- virtual ranges -------------------------------------------------------------------------
    def reserve(self, size: int) -> int:
        if size <= 0 or size % self.page_bytes:
            raise ValueError(f"size={size} must be a positive multiple of page_bytes={self.page_bytes}")
        ptr = self._check(self._d.cuMemAddressReserve(size, self.granularity, self._ptr(0), 0),
                          "cuMemAddressReserve", size=size)
        return int(ptr)

    def free_range(self, va: int, size: int) -> None:
        self._check(self._d.cuMemAddressFree(self._ptr(va), size), "cuMemAddressFree", va, size)

    # -- physical pages -------------------------------------------------------------------------
    def create(self) -> Any:
        return self._check(self._d.cuMemCreate(self.page_bytes, self._prop, 0), "cuMemCreate",
                           size=self.page_bytes)

    def release(self, handle: Any) -> None:
        self._check(self._d.cuMemRelease(handle), "cuMemRelease", size=self.page_bytes)

    # -- mapping (hot path) ---------------------------------------------------------------------
    def map(self, va: int, handle: Any) -> None:
        self._check(self._d.cuMemMap(self._ptr(va), self.page_bytes, 0, handle, 0), "cuMemMap", va,
                    self.page_bytes)

    def set_access(self, va: int, size: int) -> None:
        self._check(self._d.cuMemSetAccess(self._ptr(va), size, [self._access], 1), "cuMemSetAccess", va, size)

    def unmap(self, va: int, size: int) -> None:
        # cuMemUnmap cannot split a mapping and each page was mapped on its own: one call a page.
        for off in range(0, size, self.page_bytes):
            self._check(self._d.cuMemUnmap(self._ptr(va + off), self.page_bytes), "cuMemUnmap", va + off,
                        self.page_bytes)

    def synchronize(self) -> None:
        self._check(self._d.cuCtxSynchronize(), "cuCtxSynchronize")

    # -- tensors --------------------------------------------------------------------------------
    def wrap_bytes(self, va: int, size: int) -> torch.Tensor:
        if size == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        return torch.as_tensor(_CudaBytes(va, size), device=self.device)

    def total_memory(self) -> int:
        _, total = self._check(self._d.cuMemGetInfo(), "cuMemGetInfo")
        return int(total)

    def free_memory(self) -> int:
        free, _ = self._check(self._d.cuMemGetInfo(), "cuMemGetInfo")
        return int(free)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._check(self._d.cuDevicePrimaryCtxRelease(self._dev), "cuDevicePrimaryCtxRelease")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
