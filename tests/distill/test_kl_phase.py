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


def test_kl_phase_never_trains_on_the_block_it_is_judged_on(monkeypatch):
    import distill_workers.kl_phase as kl

    h = tiny_hybrid()
    freeze_teacher(h)
    blocks = tiny_blocks(3)
    lp = teacher_logprobs(h, blocks)
    d = capture_layer(h, 1, blocks, resid_blocks=3)
    real, calls = kl.tail_logits, []

    def spy(hybrid, layer, resid, cos, sin):
        rows = [i for i in range(3) if any(torch.equal(resid[j], d.resid[i]) for j in range(resid.shape[0]))]
        calls.append((torch.is_grad_enabled(), rows))
        return real(hybrid, layer, resid, cos, sin)
    monkeypatch.setattr(kl, "tail_logits", spy)
    m = kl_phase(h, 1, h.new_dsla_module(1), d, lp, steps=4, lr=1e-2, batch=2)
    assert m["kl_held_out"] and all(2 not in rows for grad, rows in calls if grad)
    assert [rows for grad, rows in calls if not grad] == [[2], [2]]  # before and after, on block 2 only


def test_kl_phase_lowers_or_keeps_the_kl():
    h = tiny_hybrid()
    freeze_teacher(h)
    blocks = tiny_blocks(2)
    lp = teacher_logprobs(h, blocks)
    d = capture_layer(h, 1, blocks, resid_blocks=2)
    mod = h.new_dsla_module(1)
    saved = {k: v.clone() for k, v in mod.state_dict().items()}
    m = kl_phase(h, 1, mod, d, lp, steps=10, lr=1e-2)
    assert m["kl_before"] > 0 and m["kl_kept"] == (m["kl_after"] <= m["kl_before"])
    if not m["kl_kept"]:  # judged worse on the held-out block: the weights it came with are back
        assert all(torch.equal(v, saved[k]) for k, v in mod.state_dict().items())
    assert h.dsla_layers == []  # the layer is left as it was found
