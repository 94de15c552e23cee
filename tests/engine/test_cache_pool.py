"""The cache pool's bookkeeping under admission pressure (KV blocks and DSLA state pairs share it)."""
from dsla_model.engine import Engine, EngineConfig, SamplingParams
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


def test_free_block_heap_stays_bounded():
    """Freed state pairs used to push their blocks onto the free-block heap again each time,
    though their entries were still there: the heap grew with every request."""
    eng = Engine(tiny_hybrid(dsla_layers=(0, 1, 2, 3)), None, EngineConfig(block_size=4, cache_memory_bytes=16 * 4096))
    p = eng.pool
    for i in range(60):
        eng.add_request([1 + i % 50], _greedy(1))
        while eng.has_unfinished():
            eng.step()
    assert len(p._heap) <= p.num_blocks and p.num_free == p.usable_blocks
