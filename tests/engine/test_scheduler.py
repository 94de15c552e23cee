"""The scheduler's admission rules, seen through the engine: a request gets a cache only in a step
that runs some of its tokens, strictly in arrival order, and never waits behind a chained decode
that it could join."""
from dsla_model.engine import Engine, EngineConfig, SamplingParams
from tests.engine.conftest import pipelined, random_prompts, tiny_hybrid


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_no_admission_without_a_token_to_run():
    """A step whose token budget the earlier requests used up admits nobody: admitted with zero
    tokens, a request would hold its whole cache for nothing and stay pinned to a configuration a
    swap could still have changed."""
    eng = Engine(tiny_hybrid(), None, EngineConfig(max_running=4, max_batched_tokens=8, cache_memory_bytes=4 << 20))
    a = eng.add_request(list(range(1, 9)), _greedy(3))  # its prompt takes the whole budget
    b = eng.add_request([1, 2, 3], _greedy(3))
    items = eng.scheduler.schedule()
    assert [(it.req.id, it.start, it.n) for it in items] == [(a, 0, 8)]
    assert eng.requests[b].cache is None and list(eng.scheduler.waiting) == [eng.requests[b]]


def test_strict_fcfs_a_small_request_does_not_overtake_one_that_waits_for_memory():
    """39 usable blocks, 4 attention layers, 16-token blocks: a (105 tokens, 28 blocks) runs; b
    (65 tokens, 20 blocks) fits only once a is done; c (8 tokens, 4 blocks) would fit now but
    arrived after b, so it waits too (no starvation of long prompts)."""
    eng = Engine(tiny_hybrid(dsla_layers=()), None, EngineConfig(max_running=8, cache_memory_bytes=40 * 4096))
    assert eng.pool.usable_blocks == 39 and eng.pool.block_size == 16
    a = eng.add_request([1] * 5, _greedy(100))
    eng.step()
    b = eng.add_request([2] * 5, _greedy(60))
    c = eng.add_request([3] * 3, _greedy(5))
    admitted = []
    while eng.has_unfinished():
        eng.step()
        for rid in (b, c):
            if rid in eng.requests and eng.requests[rid].cache is not None and rid not in admitted:
                admitted.append(rid)
        if a in eng.requests:
            assert admitted == []  # neither b nor c while a holds the memory b needs
    assert admitted == [b, c]


def test_a_chained_decode_admits_a_request_that_fits():
    """Pipelined decode chains steps while the batch stays the same; a request that arrives and fits
    must join at the next step, not wait for a running request to finish."""
    h = tiny_hybrid(dsla_layers=(0, 2))
    pa, pb = random_prompts(2, 256, lo=4, hi=8, seed=4)
    eng = pipelined(Engine(h, None, EngineConfig(max_running=4, cache_memory_bytes=4 << 20)))
    a = eng.add_request(pa, _greedy(30))
    for _ in range(4):
        eng.step()
    assert eng.chained_steps  # a decodes on the chained path
    b = eng.add_request(pb, _greedy(3))
    eng.step()
    assert eng.requests[b].cache is not None and eng.stats()["running"] == 2
    while eng.has_unfinished():
        eng.step()
    assert a not in eng.requests
