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


def test_pairs_take_the_highest_free_groups_and_need_a_whole_one():
    """State pairs come from the top (KV blocks from the bottom), and a pair needs a whole free group:
    free blocks scattered over every group are no room for one, however many there are."""
    p = CachePool(2, 16, torch.float32, "cpu", budget_bytes=12 * 4096, block_size=4)
    m, G = p.blocks_per_pair, p.num_groups
    assert m == 4 and G == 12
    assert [p.alloc_pair(), p.alloc_pair()] == [G - 1, G - 2]
    p.free_pair(G - 1)
    assert p.alloc_pair() == G - 1
    p.free_pair(G - 1)
    p.free_pair(G - 2)
    blocks = p.alloc_blocks(p.num_free)  # everything but the scratch group
    p.free_blocks(blocks[::2])  # half the blocks free again, but no group whole
    assert p.num_free == len(blocks) // 2 and p.num_free >= 2 * m
    assert p.can_allocate(1, 0, 4 * m)  # KV blocks fit anywhere
    assert not p.can_allocate(0, 1, 1) and not p.can_allocate(1, 1, 4)
    p.free_blocks(blocks[1:m:2])  # group 1 whole again
    assert p.can_allocate(0, 1, 1) and not p.can_allocate(0, 2, 1)
    assert p.alloc_pair() == 1


def test_a_sequence_that_needs_exactly_the_whole_pool_fits():
    p = CachePool(2, 16, torch.float32, "cpu", budget_bytes=12 * 4096, block_size=4)
    tokens = p.usable_blocks * p.block_size  # one attention layer: every usable block
    assert p.blocks_for(1, 0, tokens) == p.usable_blocks
    assert p.ever_fits(1, 0, tokens) and not p.ever_fits(1, 0, tokens + 1)
    assert p.can_allocate(1, 0, tokens) and not p.can_allocate(1, 0, tokens + 1)
    # 2 layers: 1 pair + the rest as KV
    kv = (p.usable_blocks - p.blocks_per_pair) * p.block_size
    assert p.ever_fits(1, 1, kv) and not p.ever_fits(1, 1, kv + 1)


def test_a_sequences_share_is_what_the_pool_counts_used_and_frees_once():
    from dsla_model.engine.layer_config import LayerConfig
    from dsla_model.engine.seq_cache import SeqCache

    h = tiny_hybrid(dsla_layers=(1, 3))
    p = CachePool(h.num_kv_heads, h.head_dim, torch.float32, "cpu", budget_bytes=40 * 4096, block_size=4)
    conf = LayerConfig.snapshot(h, 0)
    sc = SeqCache(p, conf, max_len=10)  # 2 attention layers x 3 blocks, 2 state pairs
    assert len(sc.blocks) == 6 and len(sc.pairs) == 2
    assert sc.nbytes == p.used_bytes == (6 + 2 * p.blocks_per_pair) * p.block_bytes
    assert sorted(sc.slots[[1, 3]].tolist()) == sorted(sc.pairs) and sc.slots[[0, 2]].tolist() == [0, 0]
    assert (sc.table[[1, 3]] == 0).all() and sorted(sc.table[[0, 2]].flatten().tolist()) == sorted(sc.blocks)
    sc.free()
    sc.free()  # a second free gives nothing back twice
    assert p.used_bytes == 0 and p.num_free == p.usable_blocks
    assert (p._group_free[1:] == p.blocks_per_pair).all()
