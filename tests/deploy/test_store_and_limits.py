"""A second application with tight limits and a distill worker filling an empty store:
backpressure answers 429 / 503 with a retry hint; replicas preload newly published
layers without a restart; killing the distill actor loses no published layer."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import ray

from tests.deploy.conftest import MODEL_NAME, STORE_ORDER, app_config, get_json, wait_for, wait_for_replicas


@pytest.fixture(scope="module")
def aux(ray_session, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from deploy.app import build_app
    from distill_workers.runner import DEFAULT_DSLA
    from dsla_model.dsla_attention import DSLAConfig
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import LayerStore
    from dsla_model.loading import load_model

    # an empty store with the order fixed, so the worker skips computing the sensitivity order
    model, _, model_id = load_model(tiny_model_dir)
    store = LayerStore(tmp_path_factory.mktemp("growing_store"))
    fingerprint = HybridModel(model).fingerprint
    store.init(model_id, fingerprint, STORE_ORDER, DSLAConfig(**DEFAULT_DSLA))
    cfg = app_config(tiny_model_dir, str(store.path),
                     replica={"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                              "retry_after_s": 2},
                     ingress={"max_ongoing_requests": 4, "max_queued_requests": 2, "retry_after_s": 3},
                     distill={"num_workers": 1, "num_cpus": 0, "worker_kwargs": {
                         "tokens_per_layer": 6144, "train_blocks": 2, "block_size": 64, "threads": 1}})
    serve.run(build_app(cfg), name="aux", route_prefix="/aux")
    base = f"http://127.0.0.1:{ray_session['http_port']}/aux"
    wait_for_replicas(base, 1, 180)
    yield {"base": base, "store": store, "fingerprint": fingerprint}
    serve.delete("aux")


def status(aux):
    return get_json(aux["base"] + "/status")


def test_backpressure_answers_429_and_503_with_retry_after(aux):
    body = {"model": MODEL_NAME, "prompt": "busy busy busy", "max_tokens": 48, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(aux["base"] + "/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, codes
    assert 200 in codes and (429 in codes or 503 in codes), codes
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 48
        else:
            assert int(r.headers["retry-after"]) >= 1
        if r.status_code == 429:  # refused by the ingress: an OpenAI error body
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    print(f"\nbackpressure: {sorted(codes)}")
    # and it serves again right after
    r = httpx.post(aux["base"] + "/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


def test_killing_the_distill_actor_loses_no_published_layer(aux):
    store = aux["store"]
    s = wait_for(lambda: (lambda s: s if s["distill"]["workers"] else None)(status(aux)), 120, what="a distill worker")
    name = next(iter(s["distill"]["workers"]))
    actor = ray.get_actor(name, namespace=s["distill"]["namespace"])
    # kill while a layer is published and the worker itself (not the controller's 2 s old copy)
    # is training with more to come: killed after its last layer, no replacement would publish
    worker = wait_for(lambda: (lambda w: w if w["state"] == "training" and len(w["remaining"]) >= 2
                               and store.published_layers() else None)(ray.get(actor.status.remote(), timeout=30)),
                      240, interval=0.2, what="a published layer and training in progress")
    replica_before = next(iter(status(aux)["replicas"].values()))
    manifest = store.read_manifest()
    published = {k: v["sha256"] for k, v in manifest["layers"].items()}
    assert len(published) < len(STORE_ORDER), "the chain finished before the kill: the test lost its race"

    ray.kill(actor)

    # a new worker (new process) takes over and publishes the next layer
    s = wait_for(lambda: (lambda s: s if s["distill"]["restarts"] >= 1 and
                          len(s["store"]["published_layers"]) > len(published) else None)(status(aux)),
                 240, interval=1.0, what="the replacement worker publishing")
    assert s["distill"]["workers"][name]["pid"] != worker["pid"]
    after = store.read_manifest()["layers"]
    for layer, sha in published.items():  # nothing published was lost or changed
        assert after[layer]["sha256"] == sha
    for layer in published:  # still verified against this model's weights
        store.load_layer(int(layer), aux["fingerprint"])
    pub = store.published_layers()  # read once: the replacement is still publishing
    assert pub == STORE_ORDER[:len(pub)]

    # the replica preloaded the new layers in place: same actor, newer store version
    def preloaded():
        r = next(iter(status(aux)["replicas"].values()))
        return r if r["loaded_store_version"] >= s["store"]["version"] else None
    r = wait_for(preloaded, 30, what="the replica preloading the new layer")
    assert r["actor_name"] == replica_before["actor_name"]
    assert r["loaded_store_version"] > replica_before["loaded_store_version"]

