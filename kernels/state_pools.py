"""The slot pools the DSLA decode kernels update: how a layer's two states of one sequence (a
slot) lie in one byte buffer. Each slot takes `slot_bytes`; its history state starts the slot and
its recency state follows it, each in its own dtype. So the two pools are strided views whose
slots are `slot_bytes` apart, and one slot index addresses both (the kernels take each pool's
slot stride). The engine's cache pool hands such slots out of the same bytes as KV blocks."""
from __future__ import annotations

import torch


def pair_views(storage: torch.Tensor, num_slots: int, num_kv_heads: int, dk: int, dv: int, dtypes,
               slot_bytes: int):
    """(history pool, recency pool), each [num_slots, Hkv, Dk, Dv], over the uint8 `storage`."""
    sizes = [torch.empty((), dtype=d).element_size() for d in dtypes]
    first = num_kv_heads * dk * dv * sizes[0]
    if slot_bytes % sizes[0] or slot_bytes % sizes[1] or first % sizes[1]:
        raise ValueError(f"a slot of {slot_bytes} bytes does not align states of {dtypes}")
    if slot_bytes < first + num_kv_heads * dk * dv * sizes[1]:
        raise ValueError(f"a slot of {slot_bytes} bytes cannot hold both states "
                         f"({first + num_kv_heads * dk * dv * sizes[1]} bytes): the pools would overlap")
    if storage.dtype != torch.uint8 or storage.numel() < num_slots * slot_bytes:
        raise ValueError("storage must be a uint8 buffer of at least num_slots * slot_bytes")
    shape = (num_slots, num_kv_heads, dk, dv)
    inner = (dk * dv, dv, 1)
    return (storage.view(dtypes[0]).as_strided(shape, (slot_bytes // sizes[0], *inner), 0),
            storage.view(dtypes[1]).as_strided(shape, (slot_bytes // sizes[1], *inner), first // sizes[1]))
