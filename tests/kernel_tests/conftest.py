"""Kernel tests run the Triton kernels under the CPU interpreter unless CUDA is present.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated; speq imports its ``@triton.jit``
modules at the first launch, so setting it here, while pytest collects, is early enough.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
