"""Bounded load test: 64 concurrent streaming clients, zero errors, latency percentiles."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

from tests.deploy.conftest import MODEL_NAME

CLIENTS = 64
MAX_TOKENS = 24
DEADLINE_S = 180


def percentiles(xs):
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": xs[-1], "mean": statistics.fmean(xs)}


async def one_client(aclient, i):
    t0 = time.perf_counter()
    first = None
    text, finish, usage = [], None, None
    stream = await aclient.completions.create(
        model=MODEL_NAME, prompt=f"Client {i} asks a question about load number {i * 7}", max_tokens=MAX_TOKENS,
        temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    end = time.perf_counter()
    return {"ttft": first - t0, "latency": end - t0, "tokens": usage.completion_tokens, "finish": finish}


def test_64_concurrent_streaming_clients(server, capsys):
    from openai import AsyncOpenAI

    async def main():
        aclient = AsyncOpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(one_client(aclient, i) for i in range(CLIENTS)), return_exceptions=True), DEADLINE_S)
        await aclient.close()
        return results, time.perf_counter() - t0

    results, wall = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    assert all(r["tokens"] == MAX_TOKENS and r["finish"] == "length" for r in results)
    report = {"clients": CLIENTS, "max_tokens": MAX_TOKENS, "errors": 0, "wall_s": round(wall, 2),
              "tokens_per_s": round(CLIENTS * MAX_TOKENS / wall, 1),
              "ttft_s": {k: round(v, 3) for k, v in percentiles([r["ttft"] for r in results]).items()},
              "latency_s": {k: round(v, 3) for k, v in percentiles([r["latency"] for r in results]).items()}}
    with capsys.disabled():
        print("\nload test:", json.dumps(report))
