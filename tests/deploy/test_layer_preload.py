"""A replica's preloading of the layer store (no Ray): new and republished layers are read
once, a corrupt layer is refused and never offered, the fingerprint is always checked."""
from __future__ import annotations

import pytest

from deploy.layer_preload import PreloadedLayers
from tests.conftest import tiny_model


@pytest.fixture()
def setup(tmp_path):
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import LayerStore

    hybrid = HybridModel(tiny_model(layers=4))
    store = LayerStore(tmp_path / "store")
    store.init("tiny", hybrid.fingerprint, [3, 1, 0, 2], hybrid.dsla_config)
    return hybrid, store


def publish(hybrid, store, layer):
    return store.publish(layer, hybrid.new_dsla_module(layer).state_dict(), {})


def test_new_layers_are_loaded_once_in_order(setup):
    hybrid, store = setup
    pre = PreloadedLayers(str(store.path), hybrid.fingerprint)
    assert pre.refresh() == [] and pre.order == []
    publish(hybrid, store, 3)
    publish(hybrid, store, 1)
    assert pre.refresh() == [3, 1]
    assert pre.order == [3, 1] and pre.store_version == 2
    assert pre.refresh() == []  # nothing new
    assert set(pre.weights_for([3, 1], {})) == {3, 1}
    installed = dict(pre.versions)  # what a replica records as it installs them
    assert pre.weights_for([3, 1], installed) == {}  # installed already
    publish(hybrid, store, 3)  # republished: version 2 of layer 3
    assert pre.refresh() == [3]
    assert set(pre.weights_for([3, 1], installed)) == {3}


def test_a_store_wiped_and_distilled_again_replaces_what_a_replica_holds(setup):
    """Versions start from 1 again in a new store: the replica kept the old weights (same layer
    version) and, once the new store's version caught up, skipped its manifest altogether."""
    import shutil

    from dsla_model.layer_store import LayerStore

    hybrid, store = setup
    publish(hybrid, store, 3)
    publish(hybrid, store, 1)
    pre = PreloadedLayers(str(store.path), hybrid.fingerprint)
    assert pre.refresh() == [3, 1]
    installed, old3 = dict(pre.versions), pre.weights[3]
    shutil.rmtree(store.path)
    fresh = LayerStore(store.path)
    fresh.init("tiny", hybrid.fingerprint, [3, 1, 0, 2], hybrid.dsla_config)
    publish(hybrid, fresh, 3)  # new weights (a new random module), version 1 again
    publish(hybrid, fresh, 1)  # the store's version is 2 again, as before the wipe
    assert pre.refresh() == [3, 1]
    assert pre.weights[3] is not old3 and set(pre.weights_for([3, 1], installed)) == {3, 1}
    shutil.rmtree(store.path)
    fresh.init("tiny", hybrid.fingerprint, [3, 1, 0, 2], hybrid.dsla_config)
    publish(hybrid, fresh, 3)
    pre.refresh()
    assert pre.usable([3, 1]) == [3] and pre.order == [3]  # layer 1 is gone from the store


def test_a_damaged_layer_of_a_store_distilled_again_does_not_keep_the_old_stores_weights(setup):
    """The held weights of layer 1 came from the wiped store: offering them would serve a layer
    the new store never published (or, with another DSLA config, fail every swap)."""
    import shutil

    from dsla_model.layer_store import LayerStore

    hybrid, store = setup
    publish(hybrid, store, 3)
    publish(hybrid, store, 1)
    pre = PreloadedLayers(str(store.path), hybrid.fingerprint)
    assert pre.refresh() == [3, 1]
    shutil.rmtree(store.path)
    fresh = LayerStore(store.path)
    fresh.init("tiny", hybrid.fingerprint, [3, 1, 0, 2], hybrid.dsla_config)
    publish(hybrid, fresh, 3)
    path = fresh.path / publish(hybrid, fresh, 1)["file"]
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))
    assert pre.refresh() == [3]
    assert 1 in pre.errors and pre.usable([3, 1]) == [3] and 1 not in pre.weights


def test_a_corrupt_layer_is_refused_and_never_offered(setup):
    hybrid, store = setup
    publish(hybrid, store, 3)
    entry = publish(hybrid, store, 1)
    path = store.path / entry["file"]
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # flip bits (the tail may be zeros already)
    path.write_bytes(bytes(data))
    publish(hybrid, store, 0)
    pre = PreloadedLayers(str(store.path), hybrid.fingerprint)
    assert pre.refresh() == [3, 0]
    assert 1 in pre.errors and pre.usable([3, 1]) == [3]
    # layer 0 was distilled with 1 converted: without 1 it is not offered either (a target the
    # controller computed before it heard this replica must not install [3, 0])
    assert pre.usable([3, 1, 0]) == [3]


def test_a_layer_that_failed_to_load_is_retried_without_a_new_publish(setup, monkeypatch):
    """A transient failure (here: the file missing for a while) used to wait for the next publish."""
    import deploy.layer_preload as lp

    hybrid, store = setup
    publish(hybrid, store, 3)
    entry = publish(hybrid, store, 1)
    path = store.path / entry["file"]
    hidden = path.with_suffix(".away")
    path.rename(hidden)
    clock = [100.0]
    monkeypatch.setattr(lp.time, "monotonic", lambda: clock[0])
    pre = PreloadedLayers(str(store.path), hybrid.fingerprint)
    assert pre.refresh() == [3] and 1 in pre.errors
    hidden.rename(path)
    assert pre.refresh() == []  # not yet: retries wait RETRY_S
    clock[0] += lp.RETRY_S
    assert pre.refresh() == [1]
    assert not pre.errors and pre.order == [3, 1] and pre.usable([3, 1]) == [3, 1]
    clock[0] += 2 * lp.RETRY_S
    assert pre.refresh() == []  # nothing failed: nothing re-read


def test_another_models_store_is_refused(setup):
    hybrid, store = setup
    publish(hybrid, store, 3)
    pre = PreloadedLayers(str(store.path), "not-this-model")
    assert pre.refresh() == [] and 3 in pre.errors
    with pytest.raises(RuntimeError):
        PreloadedLayers(str(store.path)).refresh()  # no fingerprint: refuses to load unchecked


def test_no_store(tmp_path):
    assert PreloadedLayers(None, "x").refresh() == []
    assert PreloadedLayers(str(tmp_path / "missing"), "x").refresh() == []


def test_a_replica_started_before_its_store_follows_the_store_settings(tmp_path):
    """A fresh --layers-dir with a distillation worker: the replica builds its model before the
    store exists (default DSLA settings), the worker then creates the store with its own; the
    replica used to preload the layers and fail every swap ("DSLA weights do not fit")."""
    from deploy.replica import refresh_layers
    from distill_workers.runner import DEFAULT_DSLA
    from dsla_model.dsla_attention import DSLAConfig
    from dsla_model.engine import Engine, EngineConfig
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import LayerStore

    path = tmp_path / "store"
    pre = PreloadedLayers(str(path))
    hybrid = HybridModel(tiny_model(layers=4), pre.dsla_config())
    pre.fingerprint = hybrid.fingerprint
    assert refresh_layers(pre, hybrid) == []
    worker = HybridModel(tiny_model(layers=4), DSLAConfig(**DEFAULT_DSLA))
    assert worker.dsla_config != hybrid.dsla_config  # the case: two different settings
    store = LayerStore(path)
    store.init("tiny", worker.fingerprint, [3, 1, 0, 2], worker.dsla_config)
    publish(worker, store, 3)
    assert refresh_layers(pre, hybrid) == [3] and hybrid.dsla_config == worker.dsla_config
    eng = Engine(hybrid, None, EngineConfig(cache_memory_bytes=4 << 20))
    eng.set_conversion([3], pre.store_version, pre.weights_for([3], {}))
    assert hybrid.dsla_layers == [3]


def test_a_republish_during_a_load_records_the_version_read(setup):
    """The distill worker republishes a layer between the preloader's manifest read and its file
    read: the weights are the new version's, and so must be the recorded version (it recorded the
    old one, reloaded the same file at the next poll and made the replica swap to identical weights)."""
    import torch

    hybrid, store = setup
    publish(hybrid, store, 3)
    pre = PreloadedLayers(str(store.path), hybrid.fingerprint)
    real = pre.store._read_layer_file

    def racing(layer, *a, **kw):  # the layer file read, just after the preloader read the manifest
        if not racing.fired:
            racing.fired = True
            sd = {k: v + 1 for k, v in hybrid.new_dsla_module(layer).state_dict().items()}
            store.publish(layer, sd, {})  # version 2
        return real(layer, *a, **kw)

    racing.fired = False
    pre.store._read_layer_file = racing
    assert pre.refresh() == [3]
    entry = store.read_manifest()["layers"]["3"]
    assert entry["version"] == 2 and pre.versions[3] == (2, entry["sha256"])
    held, v2 = pre.weights[3], store.load_layer(3, hybrid.fingerprint)
    assert all(torch.equal(held[k], v2[k]) for k in held)
    assert pre.refresh() == [] and pre.weights_for([3], {3: pre.versions[3]}) == {}


def test_the_prefix_stops_at_the_first_layer_not_loaded(setup):
    """initial_layers (and a replica with the controller disabled) converted `order[:n]`, the loaded
    layers with an unreadable one left out: with position 1 damaged, positions 0 and 2. Position 2 was
    distilled with position 1 converted; only the prefix before the gap may be converted."""
    hybrid, store = setup
    for layer in (3, 1, 0):
        publish(hybrid, store, layer)
    bad = store.path / store.read_manifest()["layers"]["1"]["file"]
    data = bad.read_bytes()
    bad.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
    pre = PreloadedLayers(str(store.path), hybrid.fingerprint)
    pre.refresh()
    assert pre.order == [3, 0] and pre.prefix == [3] and 1 in pre.errors


def test_a_swap_records_the_version_it_installed_when_a_refresh_lands_during_it(setup):
    """Swaps run beside the control loop's store polls: a republish refreshed during a swap recorded
    the new version as installed while the engine got the old weights, so it was never installed."""
    import asyncio
    from types import SimpleNamespace

    from deploy.replica import LLMReplica

    h, store = setup
    publish(h, store, 3)
    pre = PreloadedLayers(str(store.path), h.fingerprint)
    pre.refresh()
    old = pre.versions[3]
    r = SimpleNamespace(layers=pre, installed={}, replica_id="r0")
    swapped = []

    def set_conversion(layers, version, weights):
        swapped.append(weights)
        publish(h, store, 3)  # republished and refreshed while the swap waits
        pre.refresh()

    r.engine = SimpleNamespace(set_conversion=set_conversion, stats=lambda: {"dsla_layers": []})
    r._stats = lambda: LLMReplica.func_or_class._stats(r)
    asyncio.run(LLMReplica.func_or_class._apply(r, [3]))
    assert r.installed[3] == old != pre.versions[3]
    assert set(pre.weights_for([3], r.installed)) == {3}  # the next swap installs the new version
