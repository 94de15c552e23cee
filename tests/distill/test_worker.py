"""The Ray DistillWorker: status while training, and a kill mid-layer loses nothing published."""
import time

import pytest
import torch

from dsla_model.layer_store import LayerStore

ray = pytest.importorskip("ray")

KW = dict(tokens_per_layer=64 * 150, train_blocks=3, block_size=64, delta_rank=2, lr=1e-2)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def _wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _status(w):
    """The actor's status, or None while it is restarting."""
    try:
        return ray.get(w.status.remote(), timeout=60)
    except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def test_kill_mid_layer_and_restart_loses_no_published_layer(ray_local, tiny_model_dir, tmp_path):
    from distill_workers.worker import DistillWorker

    store_path = str(tmp_path / "store")
    store = LayerStore(store_path)
    # the first layer trains a few steps, then every later one is long enough to be killed in
    w = DistillWorker.options(max_restarts=2).remote(model=tiny_model_dir, store=store_path, threads=1,
                                                     layers=3, **KW)
    st = ray.get(w.status.remote())
    assert set(st) >= {"layer", "step", "loss", "eta_s", "state", "published"}
    # kill while the second layer is training, after the first was published
    _wait(lambda: len(store.published_layers()) == 1, 240, "first layer")
    _wait(lambda: (lambda s: s and s["state"] == "training" and s["step"] >= 2)(_status(w)), 120,
          "second layer training")
    before = store.read_manifest()
    pid = ray.get(w.status.remote())["pid"]
    ray.kill(w, no_restart=False)  # a crash, as Ray sees it: the actor is restarted
    st = _wait(lambda: (lambda s: s if s and s["pid"] != pid else None)(_status(w)), 180, "restart")
    after = store.read_manifest()
    for k, e in before["layers"].items():
        assert after["layers"][k]["sha256"] == e["sha256"]  # published layers untouched
    # the restarted worker resumes with the interrupted layer and finishes the chain
    st = _wait(lambda: (lambda s: s if s and s["state"] in ("done", "error") else None)(_status(w)), 300, "done")
    assert st["error"] is None and st["remaining"] == []
    m = store.read_manifest()
    assert store.published_layers() == m["order"][:3]
    assert all(e["version"] == 1 for e in m["layers"].values())  # each layer published exactly once
    from dsla_model.loading import load_model

    hf, _, _ = load_model(tiny_model_dir)
    from dsla_model.hybrid import HybridModel

    fp = HybridModel(hf).fingerprint
    for layer in store.published_layers():
        assert torch.is_tensor(store.load_layer(layer, fp)["alpha"])  # every file intact
    assert not list(store.path.glob(".*.tmp*"))
    ray.kill(w)
