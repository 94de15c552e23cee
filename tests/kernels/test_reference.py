"""The three torch forms of the DSLA recurrence compute the same function."""
import pytest
import torch

from kernels import reference as ref


def _inputs(B, T, Hq, Hkv, Dk, Dv, dtype, seed, states=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    q = r(B, T, Hq, Dk).to(dtype)
    k = (r(B, T, Hkv, Dk) / Dk ** 0.5).to(dtype)
    v = r(B, T, Hkv, Dv).to(dtype)
    # a mix of slow and fast decays, as the two gates produce
    g1 = torch.nn.functional.logsigmoid(r(B, T, Hkv, Dk) + 3) / 16
    g2 = torch.nn.functional.logsigmoid(r(B, T, Hkv, Dk) - 2)
    w = torch.softmax(r(2), 0)
    s1 = r(B, Hkv, Dk, Dv) if states else None
    s2 = r(B, Hkv, Dk, Dv) if states else None
    return q, k, v, g1, g2, w, s1, s2


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


SHAPES = [  # B, T, Hq, Hkv, Dk, Dv, chunk
    (1, 1, 2, 2, 8, 8, 4),
    (2, 37, 6, 2, 16, 8, 8),
    (3, 64, 4, 4, 32, 32, 16),
    (1, 100, 9, 3, 16, 16, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_states", [False, True])
def test_chunk_matches_recurrent_fp32(shape, with_states):
    B, T, Hq, Hkv, Dk, Dv, C = shape
    args = _inputs(B, T, Hq, Hkv, Dk, Dv, torch.float32, seed=T + Hq, states=with_states)
    o_r, a1, a2 = ref.dsla_recurrent(*args)
    o_c, b1, b2 = ref.dsla_chunk(*args, chunk_size=C)
    assert o_c.shape == (B, T, Hq, Dv)
    assert _rel(o_c, o_r) < 1e-5
    assert _rel(b1, a1) < 1e-5 and _rel(b2, a2) < 1e-5


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_chunk_bf16_inputs_close(shape):
    B, T, Hq, Hkv, Dk, Dv, C = shape
    args = _inputs(B, T, Hq, Hkv, Dk, Dv, torch.bfloat16, seed=7)
    o_r, a1, _ = ref.dsla_recurrent(*args)
    o_c, b1, _ = ref.dsla_chunk(*args, chunk_size=C)
    assert o_c.dtype == torch.bfloat16 and b1.dtype == torch.float32
    assert _rel(o_c, o_r) < 1e-2
    assert _rel(b1, a1) < 1e-2


def test_step_by_step_equals_whole():
    q, k, v, g1, g2, w, s1, s2 = _inputs(2, 20, 6, 3, 16, 16, torch.float32, seed=3)
    o_whole, w1, w2 = ref.dsla_chunk(q, k, v, g1, g2, w, s1, s2, chunk_size=8)
    a, b = s1, s2
    outs = []
    for t in range(20):
        sl = slice(t, t + 1)
        o, a, b = ref.dsla_step(q[:, sl], k[:, sl], v[:, sl], g1[:, sl], g2[:, sl], w, a, b)
        outs.append(o)
    assert _rel(torch.cat(outs, 1), o_whole) < 1e-5
    assert _rel(a, w1) < 1e-5 and _rel(b, w2) < 1e-5


@pytest.mark.parametrize("split", [1, 13, 32])
def test_pieces_equal_whole(split):
    q, k, v, g1, g2, w, _, _ = _inputs(2, 45, 4, 2, 16, 16, torch.float32, seed=split, states=False)
    o_whole, w1, w2 = ref.dsla_chunk(q, k, v, g1, g2, w, chunk_size=16)
    first = [x[:, :split] for x in (q, k, v, g1, g2)]
    rest = [x[:, split:] for x in (q, k, v, g1, g2)]
    o_a, a1, a2 = ref.dsla_chunk(*first, w, chunk_size=16)
    o_b, b1, b2 = ref.dsla_chunk(*rest, w, a1, a2, chunk_size=16)
    assert _rel(torch.cat([o_a, o_b], 1), o_whole) < 1e-5
    assert _rel(b1, w1) < 1e-5 and _rel(b2, w2) < 1e-5


def test_strong_decay_is_finite():
    q, k, v, _, _, w, _, _ = _inputs(1, 64, 2, 2, 8, 8, torch.float32, seed=1, states=False)
    g = torch.full_like(k, -50.0)
    o, s1, _ = ref.dsla_chunk(q, k, v, g, g, w, chunk_size=64)
    o_r, r1, _ = ref.dsla_recurrent(q, k, v, g, g, w)
    assert torch.isfinite(o).all() and _rel(o, o_r) < 1e-5 and _rel(s1, r1) < 1e-5


def test_slot_pool_step_updates_only_its_slots():
    q, k, v, g1, g2, w, s1, s2 = _inputs(3, 1, 4, 2, 8, 8, torch.float32, seed=11)
    pool1 = torch.randn(6, 2, 8, 8)
    pool2 = torch.randn(6, 2, 8, 8)
    slots = torch.tensor([4, 0, 2])
    pool1[slots], pool2[slots] = s1, s2
    before1 = pool1.clone()
    o = ref.dsla_step_slots(q[:, 0], k[:, 0], v[:, 0], g1[:, 0], g2[:, 0], w, pool1, pool2, slots)
    o_ref, n1, n2 = ref.dsla_step(q, k, v, g1, g2, w, s1, s2)
    assert _rel(o, o_ref[:, 0]) < 1e-6
    assert torch.equal(pool1[slots], n1) and torch.equal(pool2[slots], n2)
    untouched = torch.tensor([1, 3, 5])
    assert torch.equal(pool1[untouched], before1[untouched])


def test_gradients_match_between_forms():
    args = list(_inputs(1, 24, 4, 2, 8, 8, torch.float32, seed=5))
    for i in (0, 1, 2, 3, 4):
        args[i] = args[i].clone().requires_grad_(True)
    o_r, _, _ = ref.dsla_recurrent(*args)
    grads_r = torch.autograd.grad(o_r.square().sum(), [args[i] for i in range(5)])
    o_c, _, _ = ref.dsla_chunk(*args, chunk_size=8)
    grads_c = torch.autograd.grad(o_c.square().sum(), [args[i] for i in range(5)])
    for a, b in zip(grads_c, grads_r):
        assert _rel(a, b) < 1e-4


def test_bad_shapes_raise():
    q, k, v, g1, g2, w, _, _ = _inputs(1, 4, 3, 2, 8, 8, torch.float32, seed=0, states=False)
    with pytest.raises(ValueError):
        ref.dsla_recurrent(q, k, v, g1, g2, w)
