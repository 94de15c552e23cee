"""What a step that raises leaves behind (a transient CUDA OOM in a later layer, a device fault):
no request computed again on a half-updated DSLA state, no event lost, no cache leaked, and every
async stream ended even when the recovery itself fails."""
from __future__ import annotations

import asyncio

import pytest

from dsla_model.engine import AsyncEngine, Engine, EngineConfig, SamplingParams
from tests.engine.conftest import pipelined, random_prompts, tiny_hybrid

CACHE = EngineConfig(cache_memory_bytes=4 << 20)


def _fail_once(obj, name="forward"):
    """obj.<name> raises once."""
    orig = getattr(obj, name)
    armed = [True]

    def fn(*a, **kw):
        if armed[0]:
            armed[0] = False
            raise RuntimeError("transient failure (e.g. CUDA out of memory)")
        return orig(*a, **kw)
    setattr(obj, name, fn)


def _pool_whole(eng):
    return eng.pool.num_free == eng.pool.usable_blocks


def _fail_next_allocation(pool):
    """The pool's next KV-block allocation raises (once)."""
    orig = pool.alloc_blocks

    def boom(n):
        pool.alloc_blocks = orig
        raise RuntimeError("allocation failed")
    pool.alloc_blocks = boom


def test_a_request_whose_step_failed_part_way_is_aborted_not_computed_again():
    """The failure comes after DSLA layer 1 folded the prompt into its states. The request used to
    stay admitted with nothing marked computed, so the next step fed the prompt again and layer 1's
    states held it twice: every later logprob differed from a clean run, with no error."""
    h = tiny_hybrid(dsla_layers=(1, 3))
    eng = Engine(h, None, CACHE)
    p = random_prompts(1, 256, lo=20, hi=21, seed=3)[0]
    rid = eng.add_request(p, SamplingParams(max_tokens=8, temperature=0))
    other = eng.add_request(p, SamplingParams(max_tokens=8, temperature=0))
    eng.abort(other)  # its abort event waits for the next step, which fails
    _fail_once(h.model.model.layers[2].mlp)
    with pytest.raises(RuntimeError, match="transient"):
        eng.step()
    events = eng.step()  # the failed step's aborts, and the event queued before it
    assert {(e.request_id, e.finish_reason) for e in events} == {(rid, "abort"), (other, "abort")}
    assert not eng.has_unfinished() and _pool_whole(eng)
    # the engine serves on: a new request gives what a fresh engine gives
    again = eng.generate([p], SamplingParams(max_tokens=8, temperature=0))
    fresh = Engine(tiny_hybrid(dsla_layers=(1, 3)), None, CACHE).generate([p], SamplingParams(max_tokens=8,
                                                                                              temperature=0))
    assert again == fresh


def test_requests_the_failed_step_did_not_compute_run_on():
    """One configuration fails (a layer only it converts): the other's requests are not touched."""
    h = tiny_hybrid(dsla_layers=(1, 3))
    eng = Engine(h, None, CACHE)
    ps = random_prompts(2, 256, lo=8, hi=12, seed=5)
    sp = SamplingParams(max_tokens=6, temperature=0)
    a = eng.add_request(ps[0], sp)  # pinned to layers (1, 3)
    eng.step()
    eng.set_conversion([1, 3, 2])
    b = eng.add_request(ps[1], sp)  # pinned to (1, 2, 3): its forward runs layer 2's DSLA module
    _fail_once(h.attention(2).dsla, "project")
    with pytest.raises(RuntimeError, match="transient"):
        eng.step()
    assert a in eng.requests and b not in eng.requests
    out = {a: []}
    while eng.has_unfinished():
        for e in eng.step():
            if e.request_id == a and e.token_id >= 0:
                out[a].append(e.token_id)
    alone = Engine(tiny_hybrid(dsla_layers=(1, 3)), None, CACHE).generate([ps[0]], sp)[0]
    assert out[a] == alone[1:]  # its first token came with the step before the failure
    assert _pool_whole(eng)


def test_generate_leaves_nothing_behind_when_a_step_raises():
    h = tiny_hybrid(dsla_layers=(1, 3))
    eng = Engine(h, None, CACHE)
    _fail_once(h.model.model.layers[2].mlp)
    with pytest.raises(RuntimeError, match="transient"):
        eng.generate(random_prompts(2, 256, seed=1), SamplingParams(max_tokens=4, temperature=0))
    assert not eng.has_unfinished() and _pool_whole(eng)


def test_a_cache_allocation_that_fails_part_way_takes_nothing():
    """SeqCache took the state pairs, then failed on the KV blocks: the pairs belonged to no cache
    and the request to neither queue."""
    h = tiny_hybrid(dsla_layers=(1, 3))
    eng = Engine(h, None, CACHE)
    _fail_next_allocation(eng.pool)
    rid = eng.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(RuntimeError, match="allocation"):
        eng.step()
    assert _pool_whole(eng) and eng.scheduler.waiting[0].id == rid
    out = []
    while eng.has_unfinished():
        out += [e.token_id for e in eng.step() if e.token_id >= 0]
    assert len(out) == 4


def test_every_stream_ends_and_admissions_are_refused_when_the_recovery_fails_too():
    """A step fails while a request of a swapped-out configuration runs; aborting it drops that
    configuration's graphs, which synchronizes a device that has failed and raises again. The
    engine thread died of it without a word, and every stream waited for ever."""
    h = tiny_hybrid(dsla_layers=(1, 3))
    eng = AsyncEngine(h, None, CACHE)
    pipelined(eng.engine)
    step = eng.engine.step

    def failing():
        ev = step()
        if eng.engine.swaps and any(r.num_generated >= 2 for r in eng.engine.requests.values()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return ev

    def broken(*a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    eng.engine.step = failing
    eng.engine.graphs.drop = broken
    eng.engine.scheduler.remove = broken  # the abort itself fails, not only the graph drop

    async def main():
        out = []
        async for ev in eng.generate([1, 2, 3], SamplingParams(max_tokens=50, temperature=0)):
            out.append(ev)
            if len(out) == 1:
                await asyncio.to_thread(eng.set_conversion, [0])  # the running request keeps its old config
        with pytest.raises(RuntimeError, match="engine failed"):
            async for _ in eng.generate([4, 5], SamplingParams(max_tokens=2, temperature=0)):
                pass
        return out

    try:
        out = asyncio.run(asyncio.wait_for(main(), 60))
        assert out[-1].finish_reason == "abort" and "illegal memory access" in str(eng.error)
    finally:
        eng.shutdown()


def test_a_failure_after_the_step_in_flight_was_collected_leaves_its_requests_running():
    """Pipelined decode: the step in flight was collected whole, then admitting a new request failed
    (its cache allocation). The running request was aborted with it, though none of its work failed."""
    h = tiny_hybrid(dsla_layers=(1, 3))
    eng = pipelined(Engine(h, None, CACHE))
    sp = SamplingParams(max_tokens=12, temperature=0)
    a = eng.add_request([5, 6, 7, 8], sp)
    out = []
    for _ in range(4):  # prefill, then decode steps launched ahead (a step in flight)
        out += [e.token_id for e in eng.step() if e.request_id == a and e.token_id >= 0]
    assert eng._inflight is not None
    _fail_next_allocation(eng.pool)
    b = eng.add_request([9, 10], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(RuntimeError, match="allocation"):
        eng.step()
    assert a in eng.requests
    while eng.has_unfinished():
        out += [e.token_id for e in eng.step() if e.request_id == a and e.token_id >= 0]
    alone = Engine(tiny_hybrid(dsla_layers=(1, 3)), None, CACHE).generate([[5, 6, 7, 8]], sp)[0]
    assert out == alone and b not in eng.requests and _pool_whole(eng)
