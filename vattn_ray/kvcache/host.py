"""`HostVMM`: demand-paged host memory with the semantics of CUDA VMM (Linux only).

- A reservation is an anonymous `PROT_NONE` + `MAP_NORESERVE` mapping: no memory, no commit charge,
  so it may be far larger than RAM.
- All physical pages live in ONE memfd (a handle is a page-sized offset in it), so a large pool does
  not exhaust file descriptors. Releasing a page punches a hole (the memory goes back to the OS) and
  recycles the offset.
- `map` maps the file page `MAP_SHARED|MAP_FIXED` with no access, and `set_access` grants read/write,
  as on CUDA: a caller that forgets `set_access` faults here in CI, not only on the GPU.
- `unmap` maps anonymous `PROT_NONE` memory back over the range instead of `munmap`, so the hole is
  never left for another allocation to land in.
"""

from __future__ import annotations

import ctypes
import os

import torch

from vattn_ray.kvcache.backend import PhysicalMemory, PhysicalMemoryError

MIB = 1 << 20
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_mprotect = _libc.mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mprotect.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def _fail(call: str, va: int | None, size: int) -> PhysicalMemoryError:
    err = ctypes.get_errno()
    where = f" at 0x{va:x}" if va is not None else ""
    return PhysicalMemoryError(f"{call}{where} size={size} failed: [errno {err}] {os.strerror(err)}")


class HostVMM(PhysicalMemory):
    """Host memory mapped on demand into reserved ranges; see the module docstring."""

    def __init__(self, page_bytes: int = 2 * MIB) -> None:
        os_page = os.sysconf("SC_PAGE_SIZE")
        if page_bytes <= 0 or page_bytes % os_page:
            raise ValueError(f"page_bytes={page_bytes} must be a positive multiple of the OS page "
                             f"size ({os_page})")
        self.page_bytes = page_bytes
        self.device = torch.device("cpu")
        self._fd = os.memfd_create("vattn-kv", os.MFD_CLOEXEC)
        self._file_pages = 0  # current file length in pages (grown geometrically)
        self._next_page = 0  # never-used offsets start here
        self._recycled: list[int] = []  # released offsets, reused before growing the file

    # -- virtual ranges -------------------------------------------------------------------------
    def reserve(self, size: int) -> int:
        self._check_size(size)
        va = _mmap(None, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if va is None or va == MAP_FAILED:
            raise _fail("mmap(PROT_NONE reserve)", None, size)
        return va

    def free_range(self, va: int, size: int) -> None:
        if _munmap(va, size) != 0:
            raise _fail("munmap", va, size)

    # -- physical pages -------------------------------------------------------------------------
    def create(self) -> int:
        if self._recycled:
            return self._recycled.pop()
        index = self._next_page
        if index >= self._file_pages:
            new_pages = max(index + 1, 2 * self._file_pages)
            try:
                os.ftruncate(self._fd, new_pages * self.page_bytes)
            except OSError as e:
                raise PhysicalMemoryError(f"ftruncate(memfd) size={new_pages * self.page_bytes} "
                                          f"failed: {e}") from e
            self._file_pages = new_pages
        self._next_page += 1
        return index * self.page_bytes

    def release(self, handle: int) -> None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fd, mode, handle, self.page_bytes) != 0:
            raise _fail(f"fallocate(PUNCH_HOLE, offset={handle})", None, self.page_bytes)
        self._recycled.append(handle)

    # -- mapping (hot path) ---------------------------------------------------------------------
    def map(self, va: int, handle: int) -> None:
        got = _mmap(va, self.page_bytes, PROT_NONE, MAP_SHARED | MAP_FIXED, self._fd, handle)
        if got != va:
            raise _fail(f"mmap(MAP_FIXED|MAP_SHARED, offset={handle})", va, self.page_bytes)

    def set_access(self, va: int, size: int) -> None:
        if _mprotect(va, size, PROT_READ | PROT_WRITE) != 0:
            raise _fail("mprotect(PROT_READ|PROT_WRITE)", va, size)

    def unmap(self, va: int, size: int) -> None:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED
        if _mmap(va, size, PROT_NONE, flags, -1, 0) != va:
            raise _fail("mmap(PROT_NONE unmap)", va, size)

    # -- tensors --------------------------------------------------------------------------------
    def wrap_bytes(self, va: int, size: int) -> torch.Tensor:
        if size == 0:
            return torch.empty(0, dtype=torch.uint8)
        buf = (ctypes.c_uint8 * size).from_address(va)
        return torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` alive; touches nothing

    def total_memory(self) -> int:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def free_memory(self) -> int:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def resident_bytes(self) -> int:
        """Bytes the pool's pages hold in RAM (touched and not yet released)."""
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_size(self, size: int) -> None:
        if size <= 0 or size % self.page_bytes:
            raise ValueError(f"size={size} must be a positive multiple of page_bytes={self.page_bytes}")
