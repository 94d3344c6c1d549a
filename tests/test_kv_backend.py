"""Backend contract tests: run on HostVMM here and, through tests/gpu/test_kv_cuda.py, on CudaVMM.

Every test gets its backend from the `memory` fixture, so the GPU module only swaps the fixture.
Tests only ever touch mapped pages (an unmapped access is a crash, not an assertion).
"""

from __future__ import annotations

import pytest
import torch

from vattn_ray.kvcache.backend import PhysicalMemory
from vattn_ray.kvcache.host import HostVMM

HOST_PAGE = 4096


@pytest.fixture
def memory():
    mem = HostVMM(page_bytes=HOST_PAGE)
    yield mem
    mem.close()


def page_tensor(mem: PhysicalMemory, va: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """One page at `va` as a 1-D tensor (the page must be mapped)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = mem.page_bytes // itemsize
    return mem.wrap(va, (n,), (1,), dtype)


def map_run(mem: PhysicalMemory, va: int, handles: list) -> None:
    """Map `handles` at consecutive pages from `va` and grant access with one call."""
    for i, h in enumerate(handles):
        mem.map(va + i * mem.page_bytes, h)
    mem.set_access(va, len(handles) * mem.page_bytes)


def test_page_keeps_its_data_when_remapped_elsewhere(memory):
    page = memory.page_bytes
    va = memory.reserve(4 * page)
    h = memory.create()
    map_run(memory, va, [h])
    page_tensor(memory, va).fill_(7)
    memory.synchronize()  # kernels may still be writing these pages
    memory.unmap(va, page)
    # Same physical page, a different virtual address: the data moves with the handle.
    map_run(memory, va + 2 * page, [h])
    assert torch.all(page_tensor(memory, va + 2 * page).cpu() == 7)
    memory.synchronize()  # kernels may still be writing these pages
    memory.unmap(va + 2 * page, page)
    memory.release(h)
    memory.free_range(va, 4 * page)


def test_data_survives_unmapping_and_mapping_neighbours(memory):
    page = memory.page_bytes
    va = memory.reserve(3 * page)
    handles = [memory.create() for _ in range(4)]
    map_run(memory, va, handles[:3])
    for i in range(3):
        page_tensor(memory, va + i * page).fill_(100 + i)
    memory.synchronize()  # kernels may still be writing these pages
    memory.unmap(va + page, page)
    assert torch.all(page_tensor(memory, va).cpu() == 100)
    assert torch.all(page_tensor(memory, va + 2 * page).cpu() == 102)
    map_run(memory, va + page, [handles[3]])
    page_tensor(memory, va + page).fill_(-1)
    assert torch.all(page_tensor(memory, va).cpu() == 100)
    assert torch.all(page_tensor(memory, va + 2 * page).cpu() == 102)
    memory.synchronize()  # kernels may still be writing these pages
    memory.unmap(va, 3 * page)
    for h in handles:
        memory.release(h)
    memory.free_range(va, 3 * page)


def test_two_wraps_of_one_range_share_memory(memory):
    page = memory.page_bytes
    va = memory.reserve(2 * page)
    handles = [memory.create() for _ in range(2)]
    map_run(memory, va, handles)
    n = 2 * page // 4
    flat = memory.wrap(va, (n,), (1,), torch.float32)
    grid = memory.wrap(va, (n // 64, 64), (64, 1), torch.float32)
    flat.copy_(torch.arange(n, dtype=torch.float32, device=flat.device))
    assert grid[3, 5].item() == 3 * 64 + 5
    grid[-1, -1] = -2.5  # the very last element, on the second page
    assert flat[-1].item() == -2.5
    # A strided wrap (every other element) sees the same bytes.
    evens = memory.wrap(va, (n // 2,), (2,), torch.float32)
    assert torch.equal(evens.cpu(), flat.cpu()[::2])
    memory.synchronize()  # kernels may still be writing these pages
    memory.unmap(va, 2 * page)
    for h in handles:
        memory.release(h)
    memory.free_range(va, 2 * page)


def test_wrap_has_the_requested_geometry_and_device(memory):
    page = memory.page_bytes
    va = memory.reserve(page)
    h = memory.create()
    map_run(memory, va, [h])
    t = memory.wrap(va, (4, 8, 2), (16, 2, 1), torch.bfloat16)
    assert t.shape == (4, 8, 2) and t.stride() == (16, 2, 1)
    assert t.dtype == torch.bfloat16 and t.device.type == memory.device.type
    assert t.data_ptr() == va
    memory.synchronize()  # kernels may still be writing these pages
    memory.unmap(va, page)
    memory.release(h)
    memory.free_range(va, page)


def test_reserve_rejects_sizes_that_are_not_whole_pages(memory):
    with pytest.raises(ValueError, match="multiple of page_bytes"):
        memory.reserve(memory.page_bytes + 1)
    with pytest.raises(ValueError):
        memory.reserve(0)
