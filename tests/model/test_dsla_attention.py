"""The DSLA attention module: what it shares, what it trains, how it starts."""
import torch

from dsla_model.dsla_attention import DSLAConfig
from dsla_model.hybrid import HybridModel
from tests.conftest import tiny_model


def test_trainable_parameters_are_exactly_the_dsla_ones():
    h = HybridModel(tiny_model(hidden=64, heads=4, kv_heads=2))
    h.convert(1)
    dsla = h.attention(1).dsla
    names = {n for n, _ in dsla.named_parameters()}
    assert names == {"gate1.down.weight", "gate1.up.weight", "gate1.up.bias", "gate2.down.weight",
                     "gate2.up.weight", "gate2.up.bias", "alpha", "log_head_scale"}
    teacher_ids = {id(p) for p in h.attention(1).teacher.parameters()}
    assert not teacher_ids & {id(p) for p in dsla.parameters()}
    # q/k/v/o are the teacher's own modules, not copies
    assert dsla.teacher.q_proj is h.attention(1).teacher.q_proj
    # a small addition: gates at rank 16 on a tiny model are still well under the layer's weights
    assert sum(p.numel() for p in dsla.parameters()) < sum(p.numel() for p in dsla.teacher.parameters())


def test_delta_rank_adds_zero_initialised_corrections():
    h = HybridModel(tiny_model(), DSLAConfig(delta_rank=4))
    x = torch.randn(1, 5, 64)
    h.convert(0)
    d = h.attention(0).dsla
    assert set(d.deltas.keys()) == {"q", "k", "v", "o"}
    torch.testing.assert_close(d._proj("q", x), d.teacher.q_proj(x))


def test_history_gate_remembers_longer_than_recency_gate():
    h = HybridModel(tiny_model())
    h.convert(0)
    g1, g2 = h.attention(0).dsla.gates(torch.randn(2, 7, 64))
    assert g1.shape == (2, 7, 2, 16)
    assert (g1 <= 0).all() and (g2 <= 0).all()
    assert g1.mean() > -0.01 and g2.mean() < -0.03  # decays ~1 for history, clearly <1 for recency
    assert torch.softmax(h.attention(0).dsla.alpha, 0).tolist() == [0.5, 0.5]


def test_gqa_state_is_per_kv_head():
    h = HybridModel(tiny_model(heads=4, kv_heads=1))
    h.convert(0)
    cache = h.new_cache()
    h(torch.tensor([[5, 6, 7]]), cache=cache)
    s1, s2 = cache.dsla_state(0)
    assert s1.shape == (1, 1, 16, 16) and s1.dtype == torch.float32
