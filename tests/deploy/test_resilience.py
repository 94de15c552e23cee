"""Killing an LLM replica mid-stream loses no accepted request (the client retries at most once);
killing the conversion controller does not stop serving and Serve brings it back."""
from __future__ import annotations

import asyncio
import threading
import time

import ray

from tests.deploy.conftest import MODEL_NAME, get_json, wait_for, wait_for_replicas

CLIENTS = 16
MAX_TOKENS = 60


async def request_with_one_retry(aclient, i, log):
    for attempt in range(2):
        try:
            stream = await aclient.completions.create(
                model=MODEL_NAME, prompt=f"resilient request {i}", max_tokens=MAX_TOKENS, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            finish, usage, text = None, None, []
            async for chunk in stream:
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                    text.append(chunk.choices[0].text)
                usage = chunk.usage or usage
            if finish == "length" and usage and usage.completion_tokens == MAX_TOKENS:
                return {"attempts": attempt + 1, "text": "".join(text)}
            log.append(f"client {i} attempt {attempt}: incomplete ({finish}, {usage})")
        except Exception as e:  # noqa: BLE001 - the one retry the client is allowed
            log.append(f"client {i} attempt {attempt}: {e!r}")
    raise AssertionError(f"client {i} failed twice")


def test_killing_a_replica_loses_no_request(server):
    from openai import AsyncOpenAI

    before = wait_for_replicas(server["base"], 2, 60)["replicas"]
    victim_id, victim = next(iter(before.items()))
    results, log = [], []

    async def main():
        aclient = AsyncOpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=180)
        out = await asyncio.gather(*(request_with_one_retry(aclient, i, log) for i in range(CLIENTS)),
                                   return_exceptions=True)
        await aclient.close()
        results.extend(out)

    thread = threading.Thread(target=lambda: asyncio.run(main()))
    thread.start()
    # kill while its requests are mid-stream
    wait_for(lambda: get_json(server["base"] + "/status")["replicas"][victim_id]["running"] > 0, 60,
             interval=0.1, what="requests running on the victim replica")
    time.sleep(0.3)
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"))
    thread.join(timeout=240)
    assert not thread.is_alive()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, (failures[:3], log[:5])
    assert len(results) == CLIENTS
    # the ingress resumes interrupted streams on the surviving replica, so clients rarely need their retry
    print(f"\nreplica kill: {sum(r['attempts'] - 1 for r in results)} of {CLIENTS} clients retried")

    # Serve replaces the replica; the fleet is back to two reporting replicas
    def replaced():
        reps = get_json(server["base"] + "/status")["replicas"]
        return len(reps) == 2 and victim_id not in reps
    wait_for(replaced, 180, interval=1.0, what="a replacement replica")


def test_killing_the_controller_keeps_serving_and_serve_restarts_it(server, client):
    s = get_json(server["base"] + "/status")
    old = s["controller"]["actor_name"]
    ray.kill(ray.get_actor(old, namespace="serve"))
    # replicas keep serving with the layers they have while Serve restarts the controller
    for i in range(3):
        r = client.completions.create(model=MODEL_NAME, prompt=f"no controller {i}", max_tokens=4,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4

    def restarted():
        st = get_json(server["base"] + "/status")
        return st if st["controller"]["actor_name"] != old and len(st["replicas"]) == 2 else None
    st = wait_for(restarted, 180, interval=1.0, what="a restarted controller hearing from both replicas")
    assert st["store"]["published_layers"] == [2, 0, 3, 1]
