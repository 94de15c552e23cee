"""Slot pools for the decode kernels' tests, laid out as the engine's cache pool lays them: the
history and recency states of a slot side by side in one buffer, so each pool's slots are a
pair apart, and the two pools may hold different dtypes."""
import torch

# (history, recency) state dtypes by test id
STATE_PAIRS = {"f32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
               "f32-bf16": (torch.float32, torch.bfloat16)}


def slot_pools(n, Hkv, Dk, Dv, dtypes, gen, device):
    """Two pools [n, Hkv, Dk, Dv] of random states (standard normal, rounded to each dtype)."""
    E = Hkv * Dk * Dv
    sizes = [torch.empty((), dtype=d).element_size() for d in dtypes]
    pair = E * sum(sizes)
    buf = torch.zeros(n * pair, dtype=torch.uint8, device=device)
    inner = (Dk * Dv, Dv, 1)
    p1 = buf.view(dtypes[0]).as_strided((n, Hkv, Dk, Dv), (pair // sizes[0], *inner), 0)
    p2 = buf.view(dtypes[1]).as_strided((n, Hkv, Dk, Dv), (pair // sizes[1], *inner), E * sizes[0] // sizes[1])
    for p in (p1, p2):
        p.copy_(torch.randn(p.shape, generator=gen))
    return p1, p2
