"""One memory pool for both kinds of per-sequence cache.

The budget is a single byte buffer seen two ways:
  - KV blocks  [num_blocks, 2 (k, v), block_size, Hkv, D] in the model dtype: one
    block holds `block_size` tokens of one attention layer;
  - DSLA state pairs: the history and the recency state of one DSLA layer of one sequence,
    [Hkv, Dk, Dv] each, side by side, in `state_dtype` (fp32; bf16 for half the decode-step
    traffic; or a (history, recency) pair of dtypes: fp32 history and bf16 recency states
    move 3/4 of the bytes); a pair fills one group of `blocks_per_pair` consecutive KV
    blocks (exactly: the block size is reduced until it divides the pair, unless no size does).
Because both live in the same bytes, converting a layer frees KV blocks that new
sequences can use as states or KV alike: capacity grows with conversion without
resizing anything. KV blocks are handed out lowest index first and state pairs
highest group first, so the two rarely fragment each other.

The pair of group g is s1[g] / s2[g]: s1 and s2 are [num_groups, Hkv, Dk, Dv] views
of the same bytes whose slots are one group apart, so one slot index addresses both
(what `kernels.dsla_decode_slots` takes). Group 0 is reserved as scratch for padded
rows of captured decode graphs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from kernels.reference import STATE_DTYPES
from kernels.state_pools import pair_views


def pool_layout(num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int = 16,
                state_dtypes: torch.dtype | tuple = torch.float32) -> dict:
    """How a pool of this model lays out its bytes, whatever its budget: the block size (reduced
    until it divides a state pair), a KV block's bytes, the blocks a pair takes and a group's bytes."""
    es = torch.empty((), dtype=dtype).element_size()
    dts = tuple(state_dtypes) if isinstance(state_dtypes, (tuple, list)) else (state_dtypes, state_dtypes)
    if len(dts) != 2 or any(d not in STATE_DTYPES for d in dts):  # the decode kernels take no other
        raise ValueError(f"state pools hold one of {STATE_DTYPES} (or a pair of them), not {state_dtypes}")
    sizes = [torch.empty((), dtype=d).element_size() for d in dts]
    pair_bytes = num_kv_heads * head_dim * head_dim * sum(sizes)
    bs = block_size
    while bs > 1 and pair_bytes % (2 * bs * num_kv_heads * head_dim * es):
        bs //= 2
    if pair_bytes % (2 * bs * num_kv_heads * head_dim * es):
        # no block size fits a pair exactly (fp32 weights, bf16 recency states, head dim 2 mod 4):
        # the configured size, and each pair's last block partly unused
        bs = block_size
    bb = 2 * bs * num_kv_heads * head_dim * es
    m = -(-pair_bytes // bb)
    return dict(state_dtypes=dts, pair_bytes=pair_bytes, block_size=bs, block_bytes=bb, blocks_per_pair=m,
                group_bytes=m * bb, min_budget_bytes=2 * m * bb)  # group 0 is scratch: two groups at least


class CachePool:
    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, budget_bytes: int,
                 block_size: int = 16, state_dtypes: torch.dtype | tuple = torch.float32):
        lay = pool_layout(num_kv_heads, head_dim, dtype, block_size, state_dtypes)
        dts, self.pair_bytes, self.block_size = lay["state_dtypes"], lay["pair_bytes"], lay["block_size"]
        self.block_bytes, self.blocks_per_pair = lay["block_bytes"], lay["blocks_per_pair"]
        bs, m, gb = self.block_size, self.blocks_per_pair, lay["group_bytes"]
        self.group_bytes = gb  # one pair, or m KV blocks
        self.num_groups = G = int(budget_bytes // gb)
        if G < 2:
            raise ValueError(f"cache budget {budget_bytes} B is too small (need at least {lay['min_budget_bytes']} B)")
        self.num_blocks = G * m
        self.budget_bytes = G * gb
        storage = torch.zeros(self.budget_bytes, dtype=torch.uint8, device=device)
        self.kv = storage.view(dtype).view(self.num_blocks, 2, bs, num_kv_heads, head_dim)
        self.s1, self.s2 = pair_views(storage, G, num_kv_heads, head_dim, head_dim, dts, gb)
        self._free = np.ones(self.num_blocks, dtype=bool)
        self._group_free = np.full(G, m, dtype=np.int64)
        self._free[:m] = False  # group 0: scratch
        self._group_free[0] = 0
        self.num_free = self.num_blocks - m

    # ---- sizing -------------------------------------------------------------------------
    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - self.blocks_per_pair

    def blocks_for(self, num_attn_layers: int, num_dsla_layers: int, seq_len: int) -> int:
        """Blocks one sequence of `seq_len` tokens needs under a layer configuration."""
        return num_attn_layers * math.ceil(seq_len / self.block_size) + num_dsla_layers * self.blocks_per_pair

    def ever_fits(self, num_attn_layers, num_dsla_layers, seq_len) -> bool:
        """Whether one such sequence fits the whole pool (when nothing else holds any of it)."""
        return self.blocks_for(num_attn_layers, num_dsla_layers, seq_len) <= self.usable_blocks

    def can_allocate(self, num_attn_layers, num_dsla_layers, seq_len) -> bool:
        if int(np.count_nonzero(self._group_free == self.blocks_per_pair)) < num_dsla_layers:
            return False
        return self.num_free >= self.blocks_for(num_attn_layers, num_dsla_layers, seq_len)

    # ---- allocation ---------------------------------------------------------------------
    def alloc_blocks(self, n: int) -> list[int]:
        """The n free blocks of lowest index. One scan of the free map for the whole request: a block at
        a time through a heap took 36 ms for an 8000-token prompt of a 30-layer model, as long as its
        whole prefill on an H200 (bench/results/engine_prefill.md)."""
        if n > self.num_free:
            raise RuntimeError(f"{n} KV blocks wanted, {self.num_free} free")
        idx = np.flatnonzero(self._free)[:n]
        self._free[idx] = False
        self._group_free -= np.bincount(idx // self.blocks_per_pair, minlength=self.num_groups)
        self.num_free -= n
        return idx.tolist()

    def free_blocks(self, blocks):
        idx = np.asarray(blocks, dtype=np.int64)
        self._free[idx] = True
        self._group_free += np.bincount(idx // self.blocks_per_pair, minlength=self.num_groups)
        self.num_free += len(idx)

    def alloc_pair(self) -> int:
        """A zeroed state pair; returns its slot index (its group)."""
        full = np.nonzero(self._group_free == self.blocks_per_pair)[0]
        if len(full) == 0:
            raise RuntimeError("no free state group")
        g = int(full[-1])
        m = self.blocks_per_pair
        self._free[g * m:(g + 1) * m] = False
        self._group_free[g] = 0
        self.num_free -= m
        self.s1[g].zero_()
        self.s2[g].zero_()
        return g

    def free_pair(self, slot: int):
        g = slot
        m = self.blocks_per_pair
        self._free[g * m:(g + 1) * m] = True
        self._group_free[g] = m
        self.num_free += m

    @property
    def used_bytes(self) -> int:
        return (self.usable_blocks - self.num_free) * self.block_bytes
