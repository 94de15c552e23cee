"""Output allocation for the Triton wrappers, in one place so tests can poison it.

Every buffer a kernel must fully write comes from `empty`; tests switch `POISON`
on to get NaN-filled buffers and then check that no NaN survives.
"""
from __future__ import annotations

import torch

POISON = False


def empty(*shape, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)
