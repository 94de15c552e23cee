"""AsyncEngine: streams from a background thread, cancellation aborts, swaps between steps."""
import asyncio

import pytest

from dsla_model.engine import AsyncEngine, Engine, EngineConfig, SamplingParams
from tests.engine.conftest import random_prompts


def test_concurrent_streams_cancel_and_swap(hybrid):
    prompts = random_prompts(6, 256, seed=11)
    sp = SamplingParams(max_tokens=8, temperature=0)
    expected = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20)).generate(prompts, sp)
    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))

    async def collect(p):
        return [ev async for ev in eng.generate(p, sp)]

    async def cancelled(p):
        agen = eng.generate(p, SamplingParams(max_tokens=200, temperature=0), request_id="victim")
        async for ev in agen:
            break  # leaving early must abort the request
        await agen.aclose()

    async def main():
        results = await asyncio.gather(*(collect(p) for p in prompts), cancelled(prompts[0]))
        eng.set_conversion([0, 1, 3])  # thread-safe, lands between steps
        after = await collect(prompts[0])
        return results[:-1], after

    try:
        results, after = asyncio.run(main())
        for evs, exp in zip(results, expected):
            assert [e.token_id for e in evs] == exp and evs[-1].finish_reason == "length"
        assert len(after) == 8
        st = eng.stats()
        assert st["running"] == 0 and st["cache_used_bytes"] == 0 and st["dsla_layers"] == [0, 1, 3]
        assert eng.capacity(100) >= 1

        async def bad():
            async for _ in eng.generate([], sp):
                pass
        with pytest.raises(ValueError):
            asyncio.run(bad())
    finally:
        eng.shutdown()


def test_every_stream_ends_when_a_step_fails_or_the_engine_shuts_down(hybrid):
    """A step that raises aborts every open stream, also one whose request finished inside that
    step (its events are lost with the step); shutdown ends the streams still open."""
    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    step = eng.engine.step

    def failing():  # fails the step in which the short request finishes: its last events are lost
        events = step()
        if any(e.request_id == "short" and e.finish_reason for e in events):
            raise RuntimeError("injected")
        return events
    eng.engine.step = failing

    async def reasons(p, n, rid, started=None):
        sp = SamplingParams(max_tokens=n, temperature=0)
        out = []
        async for e in eng.generate(p, sp, request_id=rid):
            out.append(e.finish_reason)
            if started is not None:
                started.set()
        return out

    async def main():
        started = asyncio.Event()  # the long request is running before the short one comes
        long_ = asyncio.create_task(reasons([4, 5, 6], 400, "l", started))
        await started.wait()
        return await asyncio.wait_for(asyncio.gather(reasons([1, 2, 3], 2, "short"), long_), 30)

    try:
        short, long_ = asyncio.run(main())
        assert short[-1] == "abort" and long_[-1] == "abort" and isinstance(eng.error, RuntimeError)
        eng.engine.step = step
        eng.error = None

        async def shut():
            agen = eng.generate([7, 8, 9], SamplingParams(max_tokens=400, temperature=0))
            first = await agen.__anext__()
            eng.shutdown()
            rest = [e.finish_reason async for e in agen]
            return first, rest
        first, rest = asyncio.run(asyncio.wait_for(shut(), 30))
        assert first.finish_reason is None and rest[-1] == "abort"
    finally:
        eng.shutdown()


def test_reused_request_id_does_not_get_the_old_requests_abort(hybrid):
    """An id aborted and added again before the next step: the abort event of the old request is
    not emitted under the new one, which runs to its end."""
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=8, temperature=0), request_id="x")
    eng.step()
    eng.abort("x")
    eng.add_request([4, 5, 6], SamplingParams(max_tokens=3, temperature=0), request_id="x")
    reasons = []
    while eng.has_unfinished():
        reasons += [e.finish_reason for e in eng.step()]
    assert reasons == [None, None, "length"]


def test_admitting_and_leaving_never_wait_for_a_step_on_the_event_loop(hybrid):
    """The engine lock is held for a whole step (seconds for a CPU prefill): taken on the event loop,
    every admission and every early exit froze all the other streams of that loop meanwhile."""
    import time

    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    step = eng.engine.step

    def slow():
        time.sleep(0.3)
        return step()
    eng.engine.step = slow
    sp = SamplingParams(max_tokens=50, temperature=0)

    async def main():
        gaps, done = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
        t = asyncio.create_task(ticker())
        a = eng.generate([1, 2, 3], sp, request_id="a")
        await a.__anext__()  # a step is running from here on
        b = eng.generate([4, 5, 6], sp, request_id="b")
        await b.__anext__()  # admitted during a step
        await a.aclose()  # both leave early
        await b.aclose()
        done.set()
        await t
        return max(gaps)

    try:
        assert asyncio.run(main()) < 0.2
        deadline = time.monotonic() + 10
        while eng.engine.has_unfinished() and time.monotonic() < deadline:  # the aborts land between steps
            time.sleep(0.05)
        assert not eng.engine.has_unfinished() and not eng._streams
    finally:
        eng.shutdown()


def test_an_abort_queued_for_a_finished_request_does_not_abort_its_ids_next_request(hybrid):
    """A client leaving after its request finished (before reading the finish) queued an abort that
    the idle engine applied later, to the next request of that id."""
    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    sp = SamplingParams(max_tokens=3, temperature=0)

    async def main():
        a = eng.generate([1, 2, 3], sp, request_id="x")
        await a.__anext__()
        while eng.engine.has_unfinished():  # finished in the engine...
            await asyncio.sleep(0.01)
        await a.aclose()  # ...but the client leaves before reading the finish
        return [e.finish_reason async for e in eng.generate([1, 2, 3], sp, request_id="x")]

    try:
        reasons = asyncio.run(asyncio.wait_for(main(), 30))
        assert reasons[-1] == "length" and len(reasons) == 3
    finally:
        eng.shutdown()


def test_stats_do_not_wait_for_a_running_step(hybrid):
    """A prefill step holds the engine lock for seconds on a CPU: a replica reading its stats waited
    for it, reported its load too late and was dropped by the controller as silent (/status showed no
    replica under load). During a step, stats are those the previous step left."""
    import threading
    import time

    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    step, slow = eng.engine.step, threading.Event()

    def slow_step():
        events = step()
        if slow.is_set():
            time.sleep(2.0)
        return events
    eng.engine.step = slow_step

    async def main():
        agen = eng.generate([1, 2, 3], SamplingParams(max_tokens=50, temperature=0))
        await agen.__anext__()  # the request is running
        slow.set()
        await asyncio.sleep(0.3)  # inside a slow step
        t = time.perf_counter()
        st = eng.stats()
        waited = time.perf_counter() - t
        await agen.aclose()
        return st, waited

    try:
        st, waited = asyncio.run(asyncio.wait_for(main(), 30))
        assert waited < 0.5 and st["running"] == 1
    finally:
        slow.clear()
        eng.shutdown()


def test_an_admission_while_a_step_holds_the_lock_leaves_the_event_loop_running(hybrid):
    """Deterministic form of the race above: the step is held inside the engine lock until the test
    lets it go (a timer lets it go after 2 s at the latest). An admission made meanwhile waits for the
    lock on a worker thread; taken on the event loop, it froze every coroutine until then."""
    import threading
    import time

    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    step, entered, release = eng.engine.step, threading.Event(), threading.Event()
    timer = threading.Timer(2.0, release.set)

    def held_step():
        entered.set()
        release.wait(10)
        return step()
    eng.engine.step = held_step
    sp = SamplingParams(max_tokens=3, temperature=0)

    async def main():
        a = asyncio.ensure_future(eng.generate([1, 2, 3], sp, request_id="a").__anext__())
        while not entered.is_set():  # a's first step holds the lock now
            await asyncio.sleep(0.01)
        timer.start()
        b = eng.generate([4, 5, 6], sp, request_id="b")
        first_b = asyncio.ensure_future(b.__anext__())
        t = time.perf_counter()
        await asyncio.sleep(0.05)
        waited = time.perf_counter() - t
        release.set()
        await a
        return waited, (await first_b).token_id

    try:
        waited, tok = asyncio.run(asyncio.wait_for(main(), 30))
        assert waited < 1.0 and tok >= 0
    finally:
        release.set()
        timer.cancel()
        eng.shutdown()


def test_a_stream_id_is_taken_until_its_stream_has_read_its_finish(hybrid):
    """The request finished in the engine, but its client has not read the finish yet: a second stream
    with that id is refused (it took over the first one's events, and the first one's end then
    unregistered the second, which waited forever)."""
    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    sp = SamplingParams(max_tokens=2, temperature=0)

    async def main():
        a = eng.generate([1, 2, 3], sp, request_id="x")
        first = await a.__anext__()
        while eng.engine.has_unfinished():
            await asyncio.sleep(0.01)
        with pytest.raises(ValueError, match="already in use"):
            await eng.generate([1, 2, 3], sp, request_id="x").__anext__()
        rest = [e async for e in a]
        again = [e async for e in eng.generate([1, 2, 3], sp, request_id="x")]  # free once read
        return [first] + rest, again

    try:
        evs, again = asyncio.run(asyncio.wait_for(main(), 30))
        assert [e.finish_reason for e in evs] == [None, "length"]
        assert [e.token_id for e in again] == [e.token_id for e in evs]
    finally:
        eng.shutdown()


def test_a_resumed_sampled_request_skips_its_earlier_draws_outside_the_engine_lock(hybrid, monkeypatch):
    """The skipped draws (~1 ms each at a 49K vocabulary) ran inside a step, holding up every stream
    for seconds on a long failover resume; they now run at admission, before the lock, and the
    resumed request still continues the uninterrupted one's draws."""
    import dsla_model.engine.engine as engine_mod

    p = random_prompts(1, 256, seed=13)[0]
    sp = dict(temperature=1.2, seed=5, ignore_eos=True)
    full = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20)).generate(
        [p], SamplingParams(max_tokens=12, **sp))[0]
    eng = AsyncEngine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    held = []
    real = engine_mod.skip_draws

    def spy(g, vocab, n):
        held.append((eng._lock.locked(), n))
        real(g, vocab, n)

    monkeypatch.setattr(engine_mod, "skip_draws", spy)
    k = 5

    async def main():
        return [ev.token_id async for ev in eng.generate(p + full[:k], SamplingParams(max_tokens=12 - k,
                                                                                      resume_tokens=k, **sp))]
    try:
        got = asyncio.run(main())
    finally:
        eng.shutdown()
    assert got == full[k:]
    assert held and held[0] == (False, k)
