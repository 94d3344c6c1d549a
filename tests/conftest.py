"""Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

Triton decides between its compiler and its interpreter when a kernel is defined (at import), so
the variable is set here, before any test module imports a kernel module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
