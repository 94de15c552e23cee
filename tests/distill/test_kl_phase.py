"""The logits-KL phase replays the model's tail exactly and does not make the fit worse."""
import torch

from distill_workers.kl_phase import kl_phase, tail_logits, teacher_logprobs
from distill_workers.layer_data import capture_layer
from distill_workers.trainer import freeze_teacher
from tests.distill.conftest import tiny_blocks, tiny_hybrid


def test_tail_replay_equals_the_full_forward():
    h = tiny_hybrid()
    h.convert(2)
    blocks = tiny_blocks(2)
    d = capture_layer(h, 1, blocks, resid_blocks=2)
    h.convert(1)
    with torch.no_grad():
        full = h(blocks)
        tail = tail_logits(h, 1, d.resid, d.cos, d.sin)
    torch.testing.assert_close(tail, full, rtol=1e-4, atol=1e-4)


def test_kl_phase_lowers_or_keeps_the_kl():
    h = tiny_hybrid()
    freeze_teacher(h)
    blocks = tiny_blocks(2)
    lp = teacher_logprobs(h, blocks)
    d = capture_layer(h, 1, blocks, resid_blocks=2)
    mod = h.new_dsla_module(1)
    m = kl_phase(h, 1, mod, d, lp, steps=10, lr=1e-2)
    assert m["kl_after"] <= m["kl_before"] and m["kl_before"] > 0
    assert h.dsla_layers == []  # the layer is left as it was found
