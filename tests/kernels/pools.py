"""Slot pools for the decode kernels' tests, laid out as the engine's cache pool lays them
(kernels/state_pools.py): a slot's history and recency states side by side in one buffer, each
pool's slots a pair apart, the two pools possibly of different dtypes."""
import torch

from kernels.state_pools import pair_views

# (history, recency) state dtypes by test id
STATE_PAIRS = {"f32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
               "f32-bf16": (torch.float32, torch.bfloat16)}


def slot_pools(n, Hkv, Dk, Dv, dtypes, gen, device):
    """Two pools [n, Hkv, Dk, Dv] of random states (standard normal, rounded to each dtype)."""
    slot = Hkv * Dk * Dv * sum(torch.empty((), dtype=d).element_size() for d in dtypes)
    p1, p2 = pair_views(torch.zeros(n * slot, dtype=torch.uint8, device=device), n, Hkv, Dk, Dv, dtypes, slot)
    for p in (p1, p2):
        p.copy_(torch.randn(p.shape, generator=gen))
    return p1, p2
