"""The worker-side KV cache: virtual tensors backed by physical pages on demand.

`KVManager` obeys the scheduler's `KVOp`s; `PhysicalMemory` is the one seam over the two memory
backends, `CudaVMM` (GPU, CUDA driver VMM) and `HostVMM` (CPU, memfd + mmap).
"""

from vattn_ray.kvcache.backend import PhysicalMemory, PhysicalMemoryError
from vattn_ray.kvcache.cuda import CudaVMM
from vattn_ray.kvcache.host import HostVMM
from vattn_ray.kvcache.manager import KVManager
from vattn_ray.kvcache.pool import PagePool
from vattn_ray.kvcache.stats import KVStats

__all__ = ["CudaVMM", "HostVMM", "KVManager", "KVStats", "PagePool", "PhysicalMemory",
           "PhysicalMemoryError"]
