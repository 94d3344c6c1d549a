"""The backend and KVManager tests of tests/test_kv_*.py, run on CudaVMM, plus GPU-only checks.

Run on the GPU machine: `pytest tests/gpu/test_kv_cuda.py`. The CPU modules get their backend from
a `memory` fixture; this module imports their tests and overrides that fixture with CudaVMM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_kv_backend import *  # noqa: E402,F401,F403  (the backend contract tests)
from test_kv_backend import map_run, page_tensor  # noqa: E402
from test_kv_manager import *  # noqa: E402,F401,F403  (the manager scenarios)
from test_kv_manager import DTYPE, assert_slot, fill_slot, make_manager, tokens  # noqa: E402

from vattn_ray.kvcache.cuda import CudaVMM  # noqa: E402
from vattn_ray.scheduler.plan import KVOp  # noqa: E402


@pytest.fixture
def memory():  # noqa: F811  (overrides the HostVMM fixture imported above)
    assert torch.cuda.is_available(), "tests/gpu needs a CUDA device"
    mem = CudaVMM("cuda")
    yield mem
    torch.cuda.synchronize()
    mem.close()


def test_granularity_is_the_page_size(memory):
    assert memory.page_bytes == memory.granularity == 2 << 20
    assert memory.total_memory() >= memory.free_memory() > 0


def test_cuda_kernels_write_through_the_wrapped_view(memory):
    page = memory.page_bytes
    va = memory.reserve(2 * page)
    handles = [memory.create() for _ in range(2)]
    map_run(memory, va, handles)
    n = 2 * page // 2
    x = memory.wrap(va, (n // 1024, 1024), (1024, 1), torch.bfloat16)
    a = torch.randn(n // 1024, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    torch.matmul(a, b, out=x)  # a cuBLAS kernel writing into VMM memory
    torch.testing.assert_close(x.cpu(), (a @ b).cpu(), rtol=2e-2, atol=2e-2)
    page_tensor(memory, va + page, torch.int32).fill_(42)  # the second page only
    assert torch.all(x[n // 2048:].view(torch.int32) == 42).item()
    torch.cuda.synchronize()
    memory.unmap(va, 2 * page)
    for h in handles:
        memory.release(h)
    memory.free_range(va, 2 * page)


def test_copies_between_vmm_tensors_and_managers(memory):
    with make_manager(memory, groups=6, g=2) as m, make_manager(memory, groups=4, g=2) as other:
        m.apply([KVOp(0, 2), KVOp(1, 2)])
        other.apply([KVOp(3, 2)])
        n = tokens(m, 2)
        k0, v0 = m.layer_kv(1)
        data = torch.randn(n, *k0.shape[2:], device="cuda", dtype=DTYPE)
        k0[0, :n].copy_(data)
        v0[1, :n].copy_(k0[0, :n])  # inside one manager, across tensors and slots
        k_other, _ = other.layer_kv(3)
        k_other[3, :n].copy_(v0[1, :n])  # across managers
        torch.cuda.synchronize()
        assert torch.equal(k_other[3, :n].cpu(), data.cpu())
        m.check_integrity({0: 2, 1: 2})
        other.check_integrity({3: 2})


def test_a_kernel_in_flight_survives_a_concurrent_prefetch(memory):
    with make_manager(memory, groups=8, g=4) as m:
        m.apply([KVOp(0, 2)])
        fill_slot(m, 0, 2, 7.0)
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # keep the GPU busy while pages are mapped for another slot
            big = big @ big / 64
        m.prefetch([KVOp(1, 3), KVOp(2, 3)])
        assert m.wait_prefetch() == []
        fill_slot(m, 1, 3, 50.0)
        torch.cuda.synchronize()
        assert_slot(m, 0, 2, 7.0)
        assert_slot(m, 1, 3, 50.0)
        m.check_integrity({0: 2, 1: 3, 2: 3})
