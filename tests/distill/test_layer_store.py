"""The layer store: atomic publish, manifest, integrity and model checks, apply."""
import json
import multiprocessing as mp

import pytest
import torch

from dsla_model.layer_store import LayerStore, LayerStoreError
from tests.distill.conftest import tiny_blocks, tiny_hybrid


def _store(tmp_path, hybrid, order=(2, 0, 1)):
    st = LayerStore(tmp_path / "store")
    st.init("tiny", hybrid.fingerprint, list(order), hybrid.dsla_config)
    return st


def _weights(hybrid, layer, seed=0):
    mod = hybrid.new_dsla_module(layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return mod.state_dict()


def test_publish_roundtrip_manifest_and_versions(tmp_path):
    h = tiny_hybrid()
    st = _store(tmp_path, h)
    assert st.published_layers() == [] and st.version == 0
    w = _weights(h, 0)
    st.publish(0, w, {"rel_mse": 0.5})
    st.publish(2, _weights(h, 2), {"rel_mse": 0.4})
    assert st.published_layers() == [2, 0]  # in the order's positions, not publish order
    m = st.read_manifest()
    assert m["version"] == 2 and m["model_id"] == "tiny" and m["order"] == [2, 0, 1]
    e = m["layers"]["0"]
    assert set(e) >= {"position", "version", "metrics", "sha256", "time", "file"} and e["position"] == 1
    got = st.load_layer(0, h.fingerprint)
    assert set(got) == set(w) and all(torch.equal(got[k], w[k]) for k in w)
    st.publish(0, _weights(h, 0, seed=1), {"rel_mse": 0.3})  # republish: version 2, old file gone
    m = st.read_manifest()
    assert m["layers"]["0"]["version"] == 2 and m["version"] == 3
    files = sorted(p.name for p in st.path.iterdir() if p.suffix == ".safetensors")
    assert files == ["layer_000.v2.safetensors", "layer_002.v1.safetensors"]
    assert not list(st.path.glob(".*.tmp*"))  # no temporary left behind


def test_corrupted_layer_is_refused(tmp_path):
    h = tiny_hybrid()
    st = _store(tmp_path, h)
    st.publish(0, _weights(h, 0), {})
    f = st.path / st.read_manifest()["layers"]["0"]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(LayerStoreError, match="corrupt"):
        st.load_layer(0, h.fingerprint)
    f.write_bytes(b"not a safetensors file")
    with pytest.raises(LayerStoreError, match="corrupt"):
        st.load_layer(0, h.fingerprint)


def test_foreign_model_or_layer_is_refused(tmp_path):
    h, other = tiny_hybrid(seed=0), tiny_hybrid(seed=5)
    assert h.fingerprint != other.fingerprint
    st = _store(tmp_path, h)
    st.publish(0, _weights(h, 0), {})
    with pytest.raises(LayerStoreError, match="distilled for model"):
        st.load_layer(0, other.fingerprint)
    with pytest.raises(LayerStoreError, match="not published"):
        st.load_layer(1, h.fingerprint)
    # a file from another model's store, with the manifest edited to match its hash
    foreign = LayerStore(tmp_path / "foreign")
    foreign.init("other", other.fingerprint, [0, 1, 2], other.dsla_config)
    fe = foreign.publish(1, _weights(other, 1), {})
    m = st.read_manifest()
    (st.path / fe["file"]).write_bytes((foreign.path / fe["file"]).read_bytes())
    m["layers"]["1"] = dict(fe, position=2)
    (st.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LayerStoreError, match="another model"):
        st.load_layer(1, h.fingerprint)
    with pytest.raises(LayerStoreError, match="holds layers of model"):
        LayerStore(tmp_path / "store").init("other", other.fingerprint, [0, 1, 2], other.dsla_config)


def test_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(LayerStoreError, match="not a layer store"):
        LayerStore(tmp_path).read_manifest()
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(LayerStoreError, match="not valid JSON"):
        LayerStore(tmp_path).read_manifest()


def test_published_files_are_readable_by_other_users(tmp_path):
    import stat

    h = tiny_hybrid()
    st = _store(tmp_path, h)
    entry = st.publish(2, _weights(h, 2), {})
    mode = (st.path / entry["file"]).stat().st_mode
    assert mode & stat.S_IRGRP and mode & stat.S_IROTH


def test_a_layer_outside_the_order_is_refused(tmp_path):
    """Its position was made up (the count of published layers) and could repeat a real one."""
    h = tiny_hybrid()
    st = _store(tmp_path, h, order=(2, 0))
    with pytest.raises(LayerStoreError, match="not in this store's order"):
        st.publish(1, _weights(h, 1), {})
    assert st.published_layers() == [] and not list(st.path.glob("layer_*"))


@pytest.mark.parametrize("damage", ["version", "order", "sha256", "model_fingerprint", "dsla_config",
                                    "layer key", "order item", "file type", "file path", "sha256 type",
                                    "unknown setting"])
def test_an_incomplete_manifest_is_a_clear_error(tmp_path, damage):
    """Readers index these keys directly: a manifest without one raised KeyError in the
    controller's tick, which then stopped deciding; a malformed one (a layer key 'layer3', a file
    or sha256 of another type, a dsla_config setting of a later version) a ValueError or TypeError
    that got past every caller's except, stopping the controller and replicas from starting."""
    h = tiny_hybrid()
    st = _store(tmp_path, h)
    st.publish(2, _weights(h, 2), {})
    m = json.loads((st.path / "manifest.json").read_text())
    entry = m["layers"]["2"]
    if damage == "sha256":
        del entry["sha256"]
    elif damage == "layer key":
        m["layers"]["layer2"] = m["layers"].pop("2")
    elif damage == "order item":
        m["order"][0] = "2"
    elif damage in ("file type", "sha256 type"):
        entry["file" if damage == "file type" else "sha256"] = None
    elif damage == "file path":
        entry["file"] = "../" + entry["file"]
    elif damage == "unknown setting":
        m["dsla_config"]["a_setting_of_a_later_version"] = 1
    else:
        del m[damage]
    (st.path / "manifest.json").write_text(json.dumps(m))
    for read in (st.read_manifest, lambda: st.version, st.published_layers):
        with pytest.raises(LayerStoreError, match="manifest incomplete"):
            read()


def test_init_refuses_an_existing_store_of_another_order(tmp_path):
    h = tiny_hybrid()
    st = _store(tmp_path, h, order=(2, 0, 1))
    assert st.init("tiny", h.fingerprint, [2, 0, 1], h.dsla_config)["order"] == [2, 0, 1]
    with pytest.raises(LayerStoreError, match="order"):
        st.init("tiny", h.fingerprint, [0, 1, 2], h.dsla_config)


def _publisher(path, fingerprint, layer, n):
    st = LayerStore(path)
    for i in range(n):
        st.publish(layer, {"alpha": torch.full((2,), float(i))}, {"i": i})


def test_concurrent_publishers_keep_a_consistent_manifest(tmp_path):
    h = tiny_hybrid()
    st = _store(tmp_path, h)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_publisher, args=(st.path, h.fingerprint, layer, 5)) for layer in (0, 1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    m = st.read_manifest()
    assert m["version"] == 15 and sorted(m["layers"]) == ["0", "1", "2"]
    for layer in (0, 1, 2):
        assert m["layers"][str(layer)]["version"] == 5
        assert torch.equal(st.load_layer(layer, h.fingerprint)["alpha"], torch.full((2,), 4.0))


def test_apply_converts_with_stored_weights_all_or_nothing(tmp_path):
    h = tiny_hybrid()
    st = _store(tmp_path, h)
    w = _weights(h, 2)
    st.publish(2, w, {})
    ids = tiny_blocks(1)
    st.apply(h, [2])
    assert h.dsla_layers == [2]
    assert all(torch.equal(v, w[k]) for k, v in h.attention(2).dsla.state_dict().items())
    with torch.no_grad():
        a = h(ids)
    h.set_dsla_layers([])
    with pytest.raises(LayerStoreError, match="not published"):
        st.apply(h, [2, 0])
    assert h.dsla_layers == []  # nothing converted when one layer is missing
    st.apply(h, [2])
    with torch.no_grad():
        assert torch.equal(h(ids), a)


def test_a_store_from_before_config_fingerprints_is_accepted_by_its_weights(tmp_path, caplog):
    """Stores distilled before the config joined the fingerprint carry the weights-only one: they were
    all refused as "another model"; they load (with a warning), and another model's are still refused."""
    from dsla_model.loading import legacy_fingerprint

    h = tiny_hybrid()
    old = legacy_fingerprint(h.fingerprint)
    assert old and old != h.fingerprint
    st = LayerStore(tmp_path / "old")
    st.init("tiny", old, [2, 0, 1], h.dsla_config)
    st.publish(2, _weights(h, 2), {})
    with caplog.at_level("WARNING"):
        assert st.load_layer(2, h.fingerprint)
    assert "predates config fingerprints" in caplog.text
    assert st.init("tiny", h.fingerprint, [2, 0, 1], h.dsla_config)  # a distillation resumes on it
    other = LayerStore(tmp_path / "other")
    other.init("tiny", legacy_fingerprint(tiny_hybrid(seed=1).fingerprint), [2, 0, 1], h.dsla_config)
    other.publish(2, _weights(h, 2), {})
    with pytest.raises(LayerStoreError, match="not this one"):
        other.load_layer(2, h.fingerprint)


def test_a_file_of_another_layer_is_refused(tmp_path):
    """Layer 2's file (same model) under layer 0's entry, its hash updated to match: the layer the file
    names is checked, not just the model."""
    h = tiny_hybrid()
    st = _store(tmp_path, h)
    e0 = st.publish(0, _weights(h, 0), {})
    e2 = st.publish(2, _weights(h, 2, seed=1), {})
    m = st.read_manifest()
    m["layers"]["0"] = dict(e0, file=e2["file"], sha256=e2["sha256"])
    (st.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LayerStoreError, match="another model or layer"):
        st.load_layer(0, h.fingerprint)


def test_a_store_is_applied_with_its_own_dsla_config(tmp_path):
    """A store distilled with another DSLA config than the hybrid's default (here: low-rank deltas and
    an output bias) builds its modules with the store's."""
    from dsla_model.dsla_attention import DSLAConfig
    from dsla_model.hybrid import HybridModel
    from tests.conftest import tiny_model

    h = tiny_hybrid()  # delta_rank 2, output bias, chunk 8
    st = _store(tmp_path, h)
    w = _weights(h, 2)
    st.publish(2, w, {})
    plain = HybridModel(tiny_model(layers=3), DSLAConfig())  # same teacher weights, default config
    assert plain.fingerprint == h.fingerprint
    st.apply(plain, [2])
    mod = plain.attention(2).dsla
    assert mod.cfg == h.dsla_config and set(mod.state_dict()) == set(w)
    h.install(2, h.new_dsla_module(2, w))
    h.convert(2)
    ids = tiny_blocks(1)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), h(ids))


def test_init_refuses_an_existing_store_of_another_dsla_config(tmp_path):
    from dsla_model.dsla_attention import DSLAConfig

    h = tiny_hybrid()
    _store(tmp_path, h)
    with pytest.raises(LayerStoreError, match="DSLA config"):
        LayerStore(tmp_path / "store").init("tiny", h.fingerprint, [2, 0, 1], DSLAConfig(delta_rank=4))
