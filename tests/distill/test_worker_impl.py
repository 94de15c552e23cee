"""The distillation worker's lifecycle and what it reports, without Ray (DistillWorkerImpl)."""
import time

import distill_workers.worker as worker
from distill_workers.trainer import ChainedDistiller, DistillConfig
from dsla_model.layer_store import LayerStore
from tests.distill.conftest import tiny_blocks, tiny_hybrid

CFG = DistillConfig(tokens_per_layer=48 * 30, train_blocks=4, block_size=48, lr=2e-2, train_chunk_size=8, kl_steps=0)


def _worker(monkeypatch, tmp_path, cfg=CFG, slow=0.02):
    h = tiny_hybrid()
    d = ChainedDistiller(h, None, "tiny", LayerStore(tmp_path / "s"), [2, 0, 1], cfg, h.dsla_config, num_layers=2,
                         blocks=tiny_blocks(4))
    real = d._progress
    d._progress = lambda *a: (time.sleep(slow), real(*a))[1]  # a step that takes a while, as on a real model
    monkeypatch.setattr(worker, "build_distiller", lambda *a, **k: d)
    return worker.DistillWorkerImpl(store=str(tmp_path / "s"), autostart=True), d


def _wait_for(w, state):
    deadline = time.monotonic() + 60
    while w.status()["state"] != state and time.monotonic() < deadline:
        time.sleep(0.01)


def test_start_after_a_stop_that_timed_out_goes_on(monkeypatch, tmp_path):
    """A stop whose join timed out left the thread finishing its step: start() saw it alive and
    returned True without clearing the stop, so the chain stopped anyway and dropped its layer."""
    w, _ = _worker(monkeypatch, tmp_path)
    _wait_for(w, "training")
    w.stop(timeout=0.01)
    assert w.start()
    w.wait(120)
    s = w.status()
    assert s["state"] == "done" and s["remaining"] == [] and s["published"] == [2, 0]


def test_the_eta_counts_the_batch_a_step_really_takes(monkeypatch, tmp_path):
    """With batch_blocks above the training blocks, a step trains on fewer blocks than batch_blocks:
    the ETA counted batch_blocks and came out 4x too long."""
    cfg = DistillConfig(**{**CFG.to_dict(), "batch_blocks": 8, "tokens_per_layer": 48 * 2 * 200})
    w, d = _worker(monkeypatch, tmp_path, cfg, slow=0.0)
    _wait_for(w, "training")
    w.wait(120)
    assert d._step_tokens == 48 * 3  # 4 blocks: 3 to train on, 1 held out
    w.stop()


def test_a_random_order_is_the_seeds_alone(monkeypatch, tmp_path):
    """'random' shuffled the measured damage order: another DSLA setting (another damage order) gave
    another 'random' order for one seed, and it ran a whole damage calibration it did not need."""
    import distill_workers.damage as damage
    from distill_workers.runner import build_distiller
    from tests.conftest import tiny_model

    def no_calibration(*a, **k):
        raise AssertionError("a random order needs no damage calibration")
    monkeypatch.setattr(damage, "damage_order", no_calibration)
    orders = []
    for rank in (2, 4):
        d = build_distiller(model=None, store=str(tmp_path / f"s{rank}"), order="random", seed=3, delta_rank=rank,
                            loaded=(tiny_model(layers=6), None, "tiny"))
        orders.append(d.order)
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(6))
