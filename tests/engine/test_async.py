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
