"""Kernel tests run the Triton kernels compiled on CUDA, or through Triton's
interpreter on CPU. The interpreter is chosen when Triton decorates the kernels,
so the variable must be set before anything imports kernels.triton_*."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
