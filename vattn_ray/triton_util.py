"""Passing virtual KV tensors to Triton kernels.

Triton's launcher checks every tensor argument with `cuPointerGetAttribute` on its first address.
A virtual KV tensor's first address (slot 0, token 0) is unmapped whenever slot 0 holds no pages,
and the check then refuses the launch ("cannot be accessed from Triton"). Kernels therefore take
KV tensors as integer addresses (`address`) and turn them back into typed pointers inside
(`as_pointer`); every access stays masked to mapped rows, as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def address(t: torch.Tensor) -> int:
    """The device address of `t`'s first element, for a kernel parameter read with `as_pointer`
    (which promises the compiler 16-byte alignment, so vectorised, pipelined loads stay on)."""
    ptr = t.data_ptr()
    if ptr % 16:
        raise ValueError(f"a KV tensor passed to a Triton kernel must be 16-byte aligned, got {ptr:#x}")
    return ptr


def tl_dtype(t: torch.Tensor):
    """The Triton element type of `t` (a constexpr argument next to its address)."""
    return TL_DTYPES[t.dtype]


@triton.jit
def as_pointer(addr, DTYPE: tl.constexpr):
    """A typed pointer from an integer address (see the module docstring)."""
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE)), 16)
