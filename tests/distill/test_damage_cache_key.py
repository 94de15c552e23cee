"""The cached damage order is keyed by everything the measurement depends on."""
import dataclasses

from distill_workers import damage
from distill_workers.trainer import DistillConfig
from dsla_model.dsla_attention import DSLAConfig
from tests.conftest import tiny_model
from tests.distill.conftest import tiny_blocks

CFG = DistillConfig(tokens_per_layer=48 * 2, train_blocks=2, block_size=48, train_chunk_size=8, kl_steps=0)


def _stub_measurement(monkeypatch):
    """Replace the costly steps by a recorder: which DSLA config and budget each measurement used."""
    seen = []
    monkeypatch.setattr(damage, "training_blocks", lambda tok, cfg: tiny_blocks(2, T=cfg.block_size))
    monkeypatch.setattr(damage, "damage_blocks", lambda tok, cfg: tiny_blocks(1, T=cfg.block_size, seed=1))
    monkeypatch.setattr(damage, "capture_all_layers", lambda h, blocks, layers: {i: None for i in layers})

    def distil(h, data, cfg, dsla_config=None, log=None):
        seen.append((h.dsla_config, cfg))
        return {i: None for i in data}

    monkeypatch.setattr(damage, "distil_independently", distil)
    # the damage differs with the DSLA config, so a reused result shows up in the order
    monkeypatch.setattr(damage, "measure_damage",
                        lambda h, mods, blocks: {i: float(i if h.dsla_config.delta_rank else -i) for i in mods})
    return seen


def test_damage_order_is_not_reused_across_dsla_configs_or_budgets(tmp_path, monkeypatch):
    from dsla_model.hybrid import HybridModel

    monkeypatch.setenv("DSLA_SERVE_CACHE", str(tmp_path))
    seen = _stub_measurement(monkeypatch)
    model = tiny_model(layers=3)
    with_deltas = HybridModel(model, DSLAConfig(delta_rank=2))
    order, _ = damage.damage_order(with_deltas, None, CFG)
    assert order == [0, 1, 2]
    gates_only = HybridModel(tiny_model(layers=3), DSLAConfig(delta_rank=0))
    assert gates_only.fingerprint == with_deltas.fingerprint  # same teacher
    order, _ = damage.damage_order(gates_only, None, CFG)
    assert order == [2, 1, 0] and len(seen) == 2
    damage.damage_order(gates_only, None, dataclasses.replace(CFG, block_size=32))
    assert len(seen) == 3
    damage.damage_order(gates_only, None, CFG)  # same everything: the cache answers
    assert len(seen) == 3
