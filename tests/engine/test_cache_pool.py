"""The cache pool's bookkeeping under admission pressure (KV blocks and DSLA state pairs share it)."""
import numpy as np
import pytest
import torch

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from dsla_model.engine.cache_pool import CachePool
from tests.engine.conftest import tiny_hybrid


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0)


def test_admission_check_holds_when_blocks_would_break_up_a_free_group():
    """The admission check counts whole free groups for the state pairs; taking a request's KV
    blocks first (lowest index first) used to break one up, and its pair then failed inside the
    step ("no free state group"), leaving the request neither waiting nor running and its
    blocks leaked. 9 groups of 4 blocks here (group 0 scratch)."""
    eng = Engine(tiny_hybrid(dsla_layers=(1, 3)), None, EngineConfig(block_size=4, cache_memory_bytes=9 * 4096))
    p = eng.pool
    assert p.blocks_per_pair > 1
    eng.add_request(list(range(1, 16)), _greedy(1))
    eng.add_request([1], _greedy(3))
    eng.step()
    eng.add_request([1, 2, 3, 4, 5], _greedy(2))
    eng.add_request([1, 2], _greedy(2))
    while eng.has_unfinished():
        eng.step()
    assert not eng.requests and p.num_free == p.usable_blocks


def test_blocks_lowest_index_first_and_group_counts_exact_under_churn():
    """Blocks are handed out lowest free index first (pairs take the highest free groups), and the
    per-group free counts the admission check reads stay exact through any mix of allocations and
    frees (the allocation is vectorised over a whole request)."""
    rng = np.random.default_rng(0)
    p = CachePool(2, 8, torch.float32, "cpu", budget_bytes=40 * 4096, block_size=4)
    m = p.blocks_per_pair
    held_blocks, held_pairs = [], []
    for _ in range(400):
        op = rng.integers(4)
        if op == 0 and p.num_free:
            n = int(rng.integers(1, min(p.num_free, 9) + 1))
            want = np.flatnonzero(p._free)[:n].tolist()
            got = p.alloc_blocks(n)
            assert got == want
            held_blocks.append(got)
        elif op == 1 and held_blocks:
            p.free_blocks(held_blocks.pop(int(rng.integers(len(held_blocks)))))
        elif op == 2 and (p._group_free == m).any():
            held_pairs.append(p.alloc_pair())
        elif op == 3 and held_pairs:
            p.free_pair(held_pairs.pop(int(rng.integers(len(held_pairs)))))
        assert (p._group_free == p._free.reshape(-1, m).sum(1)).all()
        assert p.num_free == int(p._free.sum())
    with pytest.raises(RuntimeError):
        p.alloc_blocks(p.num_free + 1)
    for b in held_blocks:
        p.free_blocks(b)
    for s_ in held_pairs:
        p.free_pair(s_)
    assert p.num_free == p.usable_blocks


def test_pool_whole_again_after_many_requests():
    eng = Engine(tiny_hybrid(dsla_layers=(0, 1)), None, EngineConfig(block_size=4, cache_memory_bytes=16 * 4096))
    p = eng.pool
    for i in range(60):
        eng.add_request([1 + i % 50] * (1 + i % 7), _greedy(1 + i % 3))
        while eng.has_unfinished():
            eng.step()
    assert p.num_free == p.usable_blocks and (p._group_free == p.blocks_per_pair).sum() == p.num_groups - 1
