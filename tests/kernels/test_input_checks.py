"""Inputs the kernels cannot serve are refused the same way on both paths (torch reference and
Triton; on CPU the Triton path runs through the interpreter), instead of a silent broadcast,
unwritten rows or writes outside the buffers."""
import pytest
import torch

from kernels import ops
from kernels import reference as ref
from kernels.state_pools import pair_views
from tests.kernels.where import DEV  # also skips this module where no Triton path runs

from kernels.triton_dsla import dsla_chunk_fused, dsla_decode_fused  # noqa: E402


def _prefill(B, T, H=1, D=16, dev=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(dev) for _ in range(3))
    g1, g2 = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, generator=g) + 3).to(dev) / 16 for _ in range(2))
    return q, k, v, g1, g2, torch.tensor([0.4, 0.6], device=dev)


def test_states_of_another_batch_are_refused_by_both_prefill_paths_and_decode():
    """A state of batch 1 for B=2 broadcast in torch and was read past its end by the kernels
    (2.5e37 or NaN), and the fused decode wrote past a cloned one (heap corruption)."""
    q, k, v, g1, g2, w = _prefill(2, 5)
    s = torch.zeros(1, 1, 16, 16, device=DEV)
    with pytest.raises(ValueError, match="states must be"):
        ref.dsla_chunk(q.cpu(), k.cpu(), v.cpu(), g1.cpu(), g2.cpu(), w.cpu(), s.cpu(), s.cpu())
    with pytest.raises(ValueError, match="states must be"):
        dsla_chunk_fused(q, k, v, g1, g2, w, s, s)
    with pytest.raises(ValueError, match="states must be"):
        ops.dsla_decode(q[:, :1], k[:, :1], v[:, :1], g1[:, :1], g2[:, :1], w, s, s)


@pytest.mark.parametrize("bounds", [[0, 2, 4], [1, 3, 6], [0, 4, 2, 6], []])
def test_cu_seqlens_must_rise_from_zero_to_the_packed_length(bounds):
    """The reference returned an o of another length; the kernels left rows unwritten."""
    q, k, v, g1, g2, w = _prefill(1, 6)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="cu_seqlens"):
        dsla_chunk_fused(q, k, v, g1, g2, w, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.dsla_prefill_varlen(*(x.cpu() for x in (q, k, v, g1, g2, w)), cu.cpu())
    s = torch.zeros(3, 1, 16, 16)
    with pytest.raises(ValueError, match="states must be"):  # 3 states for 2 sequences
        ops.dsla_prefill_varlen(*(x.cpu() for x in (q, k, v, g1, g2, w)), torch.tensor([0, 2, 6]), s, s)


def test_the_fused_paths_check_every_shape_the_reference_checks():
    q, k, v, g1, g2, w = _prefill(1, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        dsla_chunk_fused(q, k[..., :8], v, g1[..., :8], g2[..., :8], w)
    B = 3
    q, k, v, g1, g2 = (torch.randn(B, 1, 16, device=DEV) for _ in range(5))
    p1, p2 = torch.zeros(6, 1, 16, 16, device=DEV), torch.zeros(6, 1, 16, 16, device=DEV)
    slots = torch.tensor([0, 2, 4], device=DEV)
    for bad in (dict(slots=slots[:1]), dict(g1=g1[..., :1]), dict(k=k[:1])):
        args = {**dict(q=q, k=k, v=v, g1=g1, g2=g2, w=w, s1_pool=p1, s2_pool=p2, slots=slots), **bad}
        with pytest.raises(ValueError, match="do not match"):
            dsla_decode_fused(**args)
    assert not p1.any() and not p2.any()


def test_a_slot_outside_the_pool_writes_nothing():
    """The pools share their bytes with the KV blocks: a stray slot overwrote another sequence's
    cache (checked in the kernel: a host check would need a sync, and the step is graph-captured)."""
    q, k, v, g1, g2 = (torch.randn(2, 1, 16, device=DEV) for _ in range(5))
    w = torch.tensor([0.5, 0.5], device=DEV)
    buf = torch.zeros(4, 2, 1, 16, 16, device=DEV)  # slots 0, 1 of each pool, then guard bytes
    p1, p2, guard = buf[0, :2], buf[1, :2], buf[2:]
    dsla_decode_fused(q, k, v, g1, g2, w, p1, p2, torch.tensor([1, 5], device=DEV))
    assert p1[1].any() and not p1[0].any() and not guard.any()


def test_state_pairs_cannot_overlap_and_reference_slots_may_be_int32():
    storage = torch.zeros(4 * 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="cannot hold both states"):
        pair_views(storage, 4, 1, 4, 4, (torch.float32, torch.float32), 64)  # a pair is 128 bytes
    p1, p2 = torch.zeros(3, 1, 4, 4), torch.zeros(3, 1, 4, 4)
    q, k, v, g1, g2 = (torch.randn(2, 1, 4) for _ in range(5))
    w = torch.tensor([0.5, 0.5])
    o32 = ref.dsla_step_slots(q, k, v, g1, g2, w, p1, p2, torch.tensor([0, 2], dtype=torch.int32))
    assert p1[2].any() and not p1[1].any() and torch.isfinite(o32).all()


def test_the_reference_prefill_of_an_empty_batch_is_empty():
    """B = 0 with T > 0 failed to reshape 0 elements on the CPU path; the fused one returned empty."""
    o, s1, s2 = ref.dsla_chunk(*_prefill(0, 5, H=2))
    assert o.shape == (0, 5, 2, 16) and s1.shape == s2.shape == (0, 2, 16, 16)


@pytest.mark.parametrize("n", [1, 3])
def test_mixing_weights_must_be_two(n):
    """With one weight the fused kernels read w[1] past the tensor: a silent wrong result."""
    args = (*_prefill(1, 6, H=2)[:5], torch.full((n,), 0.5, device=DEV))
    for fn in (ref.dsla_chunk, ref.dsla_recurrent, ops.dsla_prefill):
        with pytest.raises(ValueError, match="mixing weights"):
            fn(*args)
    with pytest.raises(ValueError, match="mixing weights"):
        dsla_chunk_fused(*args)


def test_the_decode_steps_mixing_weights_must_be_two():
    B, H, D, R = 2, 2, 16, 4
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, 3 * H * D, generator=g)
    t = torch.randn(B, 2 * R, generator=g)
    up = (torch.randn(H * D, R, generator=g), torch.randn(H * D, generator=g))
    cs = torch.randn(B, D, generator=g)
    pools = torch.zeros(3, H, D, D), torch.zeros(3, H, D, D)
    with pytest.raises(ValueError, match="mixing weights"):
        ref.dsla_decode_step(qkv, t, up, up, cs, cs, torch.ones(1), torch.ones(H), *pools,
                                   torch.tensor([1, 2]), H, H, 16.0, -1.0)


def test_cu_seqlens_must_be_integers():
    args = _prefill(1, 6, H=2)
    with pytest.raises(ValueError, match="integer"):
        dsla_chunk_fused(*args, cu_seqlens=torch.tensor([0.0, 3.0, 6.0], device=DEV))


def test_rope_write_refuses_strides_it_would_misread():
    """sin was read with cos's row stride: a sin of another layout gave wrong k in the cache."""
    from kernels.triton_paged_attention import rope_and_cache_write

    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, v = (torch.randn(B, h * D, device=DEV) for h in (Hq, Hkv, Hkv))
    cos = torch.randn(B, D, device=DEV)
    sin = torch.randn(B, 2 * D, device=DEV)[:, :D]  # row stride 2D
    pool = torch.zeros(4, 2, 16, Hkv, D, device=DEV)
    blk, off = torch.tensor([1, 2], device=DEV), torch.tensor([0, 3], device=DEV)
    with pytest.raises(ValueError, match="same strides"):
        rope_and_cache_write(q, k, v, cos, sin, pool, blk, off)
    with pytest.raises(ValueError, match="power of two"):
        rope_and_cache_write(q[:, :40], k[:, :20], v[:, :20], cos[:, :10], cos[:, :10],
                             torch.zeros(4, 2, 16, Hkv, 10, device=DEV), blk, off)


def test_paged_attention_refuses_a_table_without_unit_row_stride():
    from kernels.triton_paged_attention import paged_decode_attention

    B, Hq, Hkv, D = 2, 4, 2, 16
    pool = torch.zeros(8, 2, 16, Hkv, D, device=DEV)
    table = torch.ones(4, B, dtype=torch.long, device=DEV).t()  # [B, 4] with row stride 1, column stride B
    with pytest.raises(ValueError, match="unit stride"):
        paged_decode_attention(torch.randn(B, Hq, D, device=DEV), pool, table, torch.tensor([3, 5], device=DEV), 0.25)


def test_silu_mul_and_add_rms_norm_refuse_layouts_they_would_misread():
    from kernels.triton_paged_attention import add_rms_norm, silu_mul

    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(torch.randn(8, 4, device=DEV).t())
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(torch.randn(4, 7, device=DEV))  # an odd width dropped its last column
    with pytest.raises(ValueError, match="contiguous"):
        add_rms_norm(torch.randn(8, 4, device=DEV).t(), None, torch.ones(8, device=DEV), 1e-6)
