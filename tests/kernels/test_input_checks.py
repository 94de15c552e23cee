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
