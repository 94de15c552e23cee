"""DSLAConfig.output_bias: off by default, zero-initialised, a pure additive constant."""
import torch

from dsla_model.dsla_attention import DSLAConfig
from tests.distill.conftest import tiny_blocks, tiny_hybrid


def test_output_bias_is_off_by_default_and_additive():
    h = tiny_hybrid(dsla=DSLAConfig())
    assert h.new_dsla_module(0).out_bias is None
    assert "out_bias" not in h.new_dsla_module(0).state_dict()
    hb = tiny_hybrid(dsla=DSLAConfig(output_bias=True))
    mod = hb.new_dsla_module(0)
    assert mod.out_bias is not None and torch.equal(mod.out_bias, torch.zeros(64))
    assert any(p is mod.out_bias for p in mod.parameters())
    x = torch.randn(1, 16, 64)
    cos, sin = torch.ones(1, 16, 16), torch.zeros(1, 16, 16)
    with torch.no_grad():
        a = mod(x, cos, sin)[0]
        mod.out_bias.fill_(0.5)
        b = mod(x, cos, sin)[0]
    torch.testing.assert_close(b - a, torch.full_like(a, 0.5))


def test_output_bias_is_saved_and_applied_through_convert():
    hb = tiny_hybrid(dsla=DSLAConfig(output_bias=True))
    w = hb.new_dsla_module(1).state_dict()
    w["out_bias"] = torch.full((64,), 0.25)
    hb.convert(1, w)
    assert torch.equal(hb.attention(1).dsla.out_bias, w["out_bias"])
    with torch.no_grad():
        hb(tiny_blocks(1))
