"""HostVMM specifics: laziness (RSS), one memfd, hole punching, access faults, error messages."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import pytest
import torch

from vattn_ray.kvcache.backend import PhysicalMemoryError
from vattn_ray.kvcache.host import HostVMM

PAGE = 8192
TIB = 1 << 40


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_reservation_far_larger_than_ram_costs_nothing():
    mem = HostVMM(page_bytes=PAGE)
    assert TIB > 10 * mem.total_memory()
    before = rss_bytes()
    va = mem.reserve(TIB)
    t = mem.wrap(va, (TIB // 2,), (1,), torch.float16)  # wrapping reads nothing either
    assert t.numel() == TIB // 2
    assert rss_bytes() - before < 16 << 20
    del t
    mem.free_range(va, TIB)
    mem.close()


def test_memory_is_committed_only_when_mapped_and_touched_and_returned_after():
    mem = HostVMM(page_bytes=1 << 20)
    pages = 64  # 64 MiB
    va = mem.reserve(TIB)
    handles = [mem.create() for _ in range(pages)]
    base = rss_bytes()
    for i, h in enumerate(handles):
        mem.map(va + i * mem.page_bytes, h)
    mem.set_access(va, pages * mem.page_bytes)
    assert rss_bytes() - base < 8 << 20, "mapping alone must not commit memory"
    assert mem.resident_bytes() == 0
    mem.wrap_bytes(va, pages * mem.page_bytes).fill_(1)
    grown = rss_bytes() - base
    assert grown >= 60 << 20
    assert mem.resident_bytes() == pages * mem.page_bytes
    mem.unmap(va, pages * mem.page_bytes)
    assert rss_bytes() - base < 8 << 20, "unmapped pages must leave the process's RSS"
    assert mem.resident_bytes() == pages * mem.page_bytes, "unmap keeps the data in the page"
    for h in handles:
        mem.release(h)
    assert mem.resident_bytes() == 0, "release must give the memory back to the OS"
    mem.free_range(va, TIB)
    mem.close()


def test_all_pages_share_one_file_descriptor_and_released_offsets_are_reused():
    mem = HostVMM(page_bytes=PAGE)
    fds_before = len(os.listdir("/proc/self/fd"))
    handles = [mem.create() for _ in range(2000)]
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert len(set(handles)) == 2000
    mem.release(handles[5])
    assert mem.create() == handles[5]
    mem.close()


def test_map_grants_no_access_until_set_access():
    # Mirrors CUDA: a mapping without set_access faults. Run in a child: the fault kills it.
    code = (
        "import ctypes\n"
        "from vattn_ray.kvcache.host import HostVMM\n"
        f"m = HostVMM(page_bytes={PAGE}); va = m.reserve({PAGE}); m.map(va, m.create())\n"
        "print('mapped', flush=True)\n"
        "ctypes.c_uint8.from_address(va).value = 1\n"
        "print('wrote', flush=True)\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "mapped" in child.stdout and "wrote" not in child.stdout
    assert child.returncode == -signal.SIGSEGV


def test_set_access_makes_the_whole_run_writable():
    mem = HostVMM(page_bytes=PAGE)
    va = mem.reserve(4 * PAGE)
    for i in range(4):
        mem.map(va + i * PAGE, mem.create())
    mem.set_access(va, 4 * PAGE)
    ctypes.memset(va, 3, 4 * PAGE)
    assert ctypes.string_at(va + 4 * PAGE - 1, 1) == b"\x03"
    mem.unmap(va, 4 * PAGE)
    mem.free_range(va, 4 * PAGE)
    mem.close()


def test_errors_name_the_call_the_address_the_size_and_errno():
    mem = HostVMM(page_bytes=PAGE)
    with pytest.raises(PhysicalMemoryError, match=r"mmap\(PROT_NONE unmap\) at 0x1001 size=8192 "
                                                   r"failed: \[errno 22\] Invalid argument"):
        mem.unmap(0x1001, PAGE)  # unaligned
    with pytest.raises(PhysicalMemoryError, match=r"mprotect.* at 0x3 size=8192 failed: \[errno 22\]"):
        mem.set_access(0x3, PAGE)
    with pytest.raises(PhysicalMemoryError, match=r"munmap at 0x5 .*Invalid argument"):
        mem.free_range(0x5, PAGE)
    mem.close()


def test_page_size_must_be_a_multiple_of_the_os_page():
    with pytest.raises(ValueError, match="multiple of the OS page"):
        HostVMM(page_bytes=os.sysconf("SC_PAGE_SIZE") + 1)


def test_closing_a_manager_gives_its_memory_back_to_the_os():
    from vattn_ray.kvcache.manager import KVManager
    from vattn_ray.layout import KVLayout
    from vattn_ray.scheduler.plan import KVOp

    lay = KVLayout.build(num_layers=2, layers_per_tensor=1, num_kv_heads=4, head_dim=16, itemsize=4,
                         page_bytes=PAGE, max_slots=2, max_model_len=1024)
    mem = HostVMM(page_bytes=PAGE)
    m = KVManager(lay, mem, 8, torch.float32)
    m.apply([KVOp(0, 4), KVOp(1, 4)])
    for t in m.tensors:
        t[:, : int(4 * lay.tokens_per_group)].fill_(1.0)
    assert mem.resident_bytes() == 8 * lay.page_group_bytes
    m.close()
    assert mem.resident_bytes() == 0
    mem.close()
