"""One entry point per DSLA operation.

On CUDA tensors the fused Triton kernels run when they are available; elsewhere
(and when DSLA_KERNELS=reference) the torch reference forms run. Callers never
choose a backend themselves.
"""
from __future__ import annotations

import os

import torch

from kernels import reference


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda or os.environ.get("DSLA_KERNELS", "auto") == "reference":
        return False
    try:
        import kernels.triton_dsla  # noqa: F401
    except ImportError:
        return False
    return True


def dsla_prefill(q, k, v, g1, g2, w, s1=None, s2=None, scale=None, chunk_size=32):
    """Whole-sequence (or sequence-piece) form; differentiable. See reference.py for layouts."""
    if _use_triton(q):
        from kernels.triton_dsla import dsla_chunk_fused

        return dsla_chunk_fused(q, k, v, g1, g2, w, s1, s2, scale)
    return reference.dsla_chunk(q, k, v, g1, g2, w, s1, s2, scale, chunk_size)


def dsla_decode(q, k, v, g1, g2, w, s1, s2, scale=None):
    """One token per sequence with per-batch states; returns (o, s1, s2)."""
    return reference.dsla_step(q, k, v, g1, g2, w, s1, s2, scale)


def dsla_decode_slots(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale=None):
    """One token per sequence over slot pools, updated in place; returns o [B,Hq,Dv]."""
    if _use_triton(q):
        from kernels.triton_dsla import dsla_decode_fused

        return dsla_decode_fused(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale)
    return reference.dsla_step_slots(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale)
