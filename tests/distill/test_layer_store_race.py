"""A reader loading a layer while a writer republishes it."""
import torch

from dsla_model.layer_store import LayerStore
from tests.distill.conftest import tiny_hybrid


def _weights(hybrid, layer, seed):
    mod = hybrid.new_dsla_module(layer)
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in mod.state_dict().items()}


def test_load_during_a_republish_gets_the_new_version(tmp_path):
    """The reader has read the manifest naming v1; the writer publishes v2 and deletes v1 before
    the reader opens the file. The store is consistent throughout and holds the layer, so the
    reader must get it (v2), not an error that leaves a replica without the layer."""
    h = tiny_hybrid()
    writer, reader = LayerStore(tmp_path / "store"), LayerStore(tmp_path / "store")
    writer.init("tiny", h.fingerprint, [0, 1, 2], h.dsla_config)
    writer.publish(0, _weights(h, 0, seed=1), {})
    v2 = _weights(h, 0, seed=2)
    read = reader.read_manifest
    calls = []

    def read_then_republish():
        m = read()
        if not calls:
            writer.publish(0, v2, {})  # lands between the reader's manifest read and its file open
        calls.append(1)
        return m

    reader.read_manifest = read_then_republish
    got = reader.load_layer(0, h.fingerprint)
    assert all(torch.equal(got[k], v2[k].float()) for k in v2)


def test_publish_syncs_the_store_directory_after_each_rename(tmp_path, monkeypatch):
    """Renames are durable only once the directory is synced: after a power loss the store could
    come back with a manifest naming a layer file whose name was lost."""
    import os

    h = tiny_hybrid()
    store = LayerStore(tmp_path / "store")
    store.init("tiny", h.fingerprint, [0, 1, 2], h.dsla_config)
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.publish(0, _weights(h, 0, seed=1), {})
    d = str((tmp_path / "store").resolve())
    # the layer file, the directory (its new name), the manifest, the directory (the manifest's rename)
    assert synced.count(d) >= 2
    assert synced.index(d) < max(i for i, p in enumerate(synced) if p.endswith(".tmp" + str(os.getpid())))
