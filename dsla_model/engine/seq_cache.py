"""A sequence's share of the cache pool, allocated whole at admission.

Admission reserves everything the request can need (prompt + max_tokens under
its pinned layer configuration), so a running request never has to be
preempted for memory. Attention layers get a block table each; DSLA layers get
one state pair each.
"""
from __future__ import annotations

import math

import torch

from dsla_model.engine.cache_pool import CachePool
from dsla_model.engine.layer_config import LayerConfig


class SeqCache:
    def __init__(self, pool: CachePool, conf: LayerConfig, max_len: int):
        self.pool = pool
        n_layers = len(conf.modules)
        nblk = math.ceil(max_len / pool.block_size)
        # State pairs first: each takes a whole free group, which taking single blocks first (lowest
        # index first) could break up after the pool's admission check counted it
        # (CachePool.can_allocate).
        self.slots = torch.zeros(n_layers, dtype=torch.int64)  # a DSLA layer's pair; 0 (scratch) elsewhere
        self.pairs, self.blocks = [], []
        try:
            for layer in conf.dsla_layers:
                s = pool.alloc_pair()
                self.pairs.append(s)
                self.slots[layer] = s
            blocks = pool.alloc_blocks(nblk * len(conf.attn_layers))
        except BaseException:  # nothing may stay taken by a cache that does not exist
            self.free()
            raise
        # table[layer] lists the blocks of an attention layer; rows of DSLA layers stay 0 (scratch)
        self.table = torch.zeros(n_layers, nblk, dtype=torch.int64)
        if conf.attn_layers:
            self.table[list(conf.attn_layers)] = torch.tensor(blocks, dtype=torch.int64).view(-1, nblk)
        self.blocks = blocks
        self.nbytes = (len(blocks) + len(self.pairs) * pool.blocks_per_pair) * pool.block_bytes

    def free(self):
        self.pool.free_blocks(self.blocks)
        for s in self.pairs:
            self.pool.free_pair(s)
        self.blocks, self.pairs = [], []
