"""A load ramp makes the controller convert layers, a quiet period makes it revert;
every request in between completes, and the decisions show in Ray's metrics."""
from __future__ import annotations

import asyncio
import re
import threading
import urllib.request

from tests.deploy.conftest import MODEL_NAME, get_json, wait_for

MAX_TOKENS = 40


def status(server):
    return get_json(server["base"] + "/status")


def scrape(server) -> str:
    with urllib.request.urlopen(server["metrics"], timeout=10) as r:
        return r.read().decode()


def metric_sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Load:
    """Keeps `concurrency` streaming requests in flight on a background thread until stopped."""

    def __init__(self, server, concurrency):
        self.server, self.concurrency = server, concurrency
        self.results, self.errors = [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _worker(self, aclient, w):
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                stream = await aclient.completions.create(
                    model=MODEL_NAME, prompt=f"worker {w} request {i} " * 4, max_tokens=MAX_TOKENS,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True})
                finish, usage = None, None
                async for chunk in stream:
                    if chunk.choices:
                        finish = chunk.choices[0].finish_reason or finish
                    usage = chunk.usage or usage
                self.results.append((finish, usage.completion_tokens if usage else None))
            except Exception as e:  # noqa: BLE001 - collected and asserted empty
                self.errors.append(repr(e))

    async def _main(self):
        from openai import AsyncOpenAI

        aclient = AsyncOpenAI(base_url=self.server["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)
        await asyncio.gather(*(self._worker(aclient, w) for w in range(self.concurrency)))
        await aclient.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=120)


def test_ramp_converts_and_quiet_reverts(server):
    wait_for(lambda: status(server)["controller"]["target_layers"] == 0, 60, what="quiet start")
    with Load(server, concurrency=48) as load:
        s = wait_for(lambda: (lambda s: s if s["controller"]["target_layers"] >= 2 and all(
            len(r["dsla_layers"]) >= 1 for r in s["replicas"].values()) else None)(status(server)),
            90, what="conversion under load")
        peak = s["controller"]["target_layers"]
    assert not load.errors, load.errors[:3]
    assert load.results and all(r == ("length", MAX_TOKENS) for r in load.results), load.results[:5]
    # never past the ratio cap (0.75 of 4 layers) nor the store's order
    assert peak <= 3
    assert s["controller"]["target_dsla_layers"] == [2, 0, 3, 1][:peak]

    s = wait_for(lambda: (lambda s: s if s["controller"]["target_layers"] == 0 and all(
        r["dsla_layers"] == [] for r in s["replicas"].values()) else None)(status(server)),
        60, what="revert when quiet")
    actions = [h["action"] for h in s["controller"]["history"]]
    assert "convert" in actions and "revert" in actions
    assert s["controller"]["decisions"]["convert"] >= 2 and s["controller"]["decisions"]["revert"] >= 1
    assert all(r["swaps"] >= 2 for r in s["replicas"].values())

    def decisions_in_metrics():
        text = scrape(server)
        conv = metric_sum(text, "ray_dsla_serve_conversion_decisions_total", action="convert") or \
            metric_sum(text, "ray_dsla_serve_conversion_decisions", action="convert")
        rev = metric_sum(text, "ray_dsla_serve_conversion_decisions_total", action="revert") or \
            metric_sum(text, "ray_dsla_serve_conversion_decisions", action="revert")
        return (conv, rev) if conv >= 2 and rev >= 1 else None

    wait_for(decisions_in_metrics, 60, interval=1.0, what="decisions in the metrics endpoint")
    text = scrape(server)
    for name in ("dsla_layers", "conversion_ratio", "queue_depth", "running_requests", "cache_usage",
                 "generated_tokens", "ttft_seconds_bucket", "tpot_seconds_bucket", "swaps",
                 "target_dsla_layers", "store_published_layers"):
        assert re.search(rf"^ray_dsla_serve_{name}(_total)?[{{ ]", text, re.M), f"{name} missing from metrics"
