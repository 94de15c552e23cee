"""Who may write a layer store: one distiller at a time, and only into the store it was built for;
weights of another DSLA config are refused as not fitting, never loaded by halves."""
from __future__ import annotations

import shutil
import threading

import pytest
import torch

from distill_workers.trainer import ChainedDistiller, DistillConfig
from dsla_model.dsla_attention import DSLAConfig
from dsla_model.layer_store import LayerStore, LayerStoreError
from tests.distill.conftest import tiny_blocks, tiny_hybrid

CFG = DistillConfig(tokens_per_layer=96, train_blocks=4, block_size=48, lr=2e-2, train_chunk_size=8, kl_steps=0)


def test_weights_of_another_gate_rank_are_refused_as_not_fitting(tmp_path):
    """load_state_dict reported the shape mismatch as a RuntimeError, which neither the distiller's
    check of published layers nor the CLI caught."""
    h = tiny_hybrid(dsla=DSLAConfig(gate_rank=16))
    w = h.new_dsla_module(0, None, DSLAConfig(gate_rank=8)).state_dict()
    with pytest.raises(ValueError, match="do not fit"):
        h.new_dsla_module(0, w)
    store = LayerStore(tmp_path / "s")
    store.init("tiny", h.fingerprint, [0, 1], h.dsla_config)
    store.publish(0, w, {})
    with pytest.raises(LayerStoreError, match="do not fit"):
        store.apply(h, [0])
    assert h.dsla_layers == []


def test_a_distiller_of_a_store_wiped_since_does_not_publish_into_its_successor(tmp_path):
    """The store was wiped and initialised again with another DSLA config while a distiller built
    on the old one lived (a worker restarted by Ray, start() after an error): it published its
    config's layers into the new store, and every reader then failed on them."""
    torch.set_num_threads(1)
    path, blocks = tmp_path / "s", tiny_blocks(4)
    ha = tiny_hybrid(dsla=DSLAConfig(delta_rank=2, output_bias=True, chunk_size=8))
    a = ChainedDistiller(ha, None, "tiny", LayerStore(path), [2, 0, 1], CFG, ha.dsla_config, num_layers=2,
                         blocks=blocks)
    shutil.rmtree(path)
    hb = tiny_hybrid(dsla=DSLAConfig(delta_rank=4, output_bias=True, chunk_size=8))
    b = ChainedDistiller(hb, None, "tiny", LayerStore(path), [2, 0, 1], CFG, hb.dsla_config, num_layers=1,
                         blocks=blocks)
    assert b.run() == [2]
    before = LayerStore(path).read_manifest()
    with pytest.raises(LayerStoreError, match="initialised again"):
        a.run()
    assert LayerStore(path).read_manifest() == before
    LayerStore(path).apply(tiny_hybrid(dsla=hb.dsla_config), [2])  # the new store's layer still loads


def test_a_second_writer_is_refused_while_one_distils(tmp_path):
    """Two distillers on one store (the CLI beside the app's worker) both distilled the chain; the
    store could end up with a layer trained over a predecessor the other writer replaced."""
    torch.set_num_threads(1)
    path, blocks = tmp_path / "s", tiny_blocks(4)
    ha, hb = tiny_hybrid(), tiny_hybrid()
    a = ChainedDistiller(ha, None, "tiny", LayerStore(path), [2, 0, 1], CFG, ha.dsla_config, num_layers=1,
                         blocks=blocks)
    b = ChainedDistiller(hb, None, "tiny", LayerStore(path), [2, 0, 1], CFG, hb.dsla_config, num_layers=1,
                         blocks=blocks)
    inside, go = threading.Event(), threading.Event()
    real = a.store.publish

    def held(*args, **kw):  # A stops right before its publish, holding the store
        inside.set()
        go.wait(60)
        return real(*args, **kw)
    a.store.publish = held
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("a", a.run()))
    t.start()
    assert inside.wait(120)
    with pytest.raises(LayerStoreError, match="another writer"):
        b.run()
    go.set()
    t.join(120)
    assert out["a"] == [2]
    assert b.run() == []  # once A is done, B may run: nothing is left to do


def test_a_store_of_a_deeper_model_is_refused_as_another_models(tmp_path):
    """Its order was read as this model's layers first: 'layer 5 out of range 0..2'."""
    from distill_workers.runner import DEFAULT_DSLA, build_distiller
    from tests.conftest import tiny_model

    path = tmp_path / "s"
    LayerStore(path).init("big", "f" * 32, [5, 4, 3, 2, 1, 0], DSLAConfig(**DEFAULT_DSLA))
    with pytest.raises(LayerStoreError, match="holds layers of model 'big'"):
        build_distiller(store=str(path), loaded=(tiny_model(layers=3), None, "tiny"))
