"""The measured-damage sensitivity order: per-layer KL when a layer alone is converted."""
import torch

from distill_workers import damage
from distill_workers.damage import capture_all_layers, distil_independently, measure_damage, order_by_damage
from distill_workers.layer_data import capture_layer
from distill_workers.trainer import DistillConfig, freeze_teacher
from tests.distill.conftest import tiny_blocks, tiny_hybrid

CFG = DistillConfig(tokens_per_layer=48 * 4, train_blocks=3, block_size=48, train_chunk_size=8, kl_steps=0)


def test_capture_all_layers_equals_capturing_each_layer():
    h = tiny_hybrid()
    freeze_teacher(h)
    blocks = tiny_blocks(3)
    every = capture_all_layers(h, blocks, range(3))
    for layer in range(3):
        one = capture_layer(h, layer, blocks)
        torch.testing.assert_close(every[layer].x, one.x)
        torch.testing.assert_close(every[layer].y, one.y)


def test_damage_ranks_a_broken_layer_last_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    h = tiny_hybrid()
    freeze_teacher(h)
    h.convert(1)
    kept = h.attention(1).dsla
    data = capture_all_layers(h, tiny_blocks(4), range(3))
    mods = distil_independently(h, data, CFG)
    with torch.no_grad():  # a layer whose DSLA form is far off the teacher must rank last
        mods[0].out_bias.add_(5.0)
    dmg = measure_damage(h, mods, tiny_blocks(2, seed=1))
    assert set(dmg) == {0, 1, 2} and all(v >= 0 for v in dmg.values())
    assert order_by_damage(dmg)[-1] == 0 and dmg[0] > 2 * max(dmg[1], dmg[2])
    assert h.dsla_layers == [1] and h.attention(1).dsla is kept and h.attention(0).dsla is None
    # each number is the KL of that layer converted alone
    from dsla_model.evaluation import TeacherReference

    ref = TeacherReference(h, tiny_blocks(2, seed=1))
    h.set_dsla_layers([])
    h.install(2, mods[2])
    h.convert(2)
    assert abs(ref.score(h)["kl"] - dmg[2]) < 1e-6


def test_damage_order_is_cached_per_model(tiny_model_dir, tmp_path, monkeypatch):
    from dsla_model.hybrid import HybridModel
    from dsla_model.loading import load_model

    monkeypatch.setenv("DSLA_SERVE_CACHE", str(tmp_path))
    model, tok, _ = load_model(tiny_model_dir)
    h = HybridModel(model)
    cfg = DistillConfig(tokens_per_layer=64 * 2, train_blocks=2, block_size=64, train_chunk_size=8, kl_steps=0)
    order, dmg = damage.damage_order(h, tok, cfg)
    assert sorted(order) == [0, 1, 2] and order == order_by_damage(dmg)
    assert h.dsla_layers == [] and all(h.attention(i).dsla is None for i in range(3))
    assert list((tmp_path / "order").glob(f"{h.fingerprint}-damage-*.json"))

    def no_work(*a, **k):
        raise AssertionError("the cached order should have been used")

    monkeypatch.setattr(damage, "distil_independently", no_work)
    assert damage.damage_order(h, tok, cfg) == (order, dmg)
