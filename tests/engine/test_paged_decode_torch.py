"""The CPU stand-in for the paged decode kernel reads whole table rows: entries past a sequence's
blocks point at the scratch block, which padded rows fill with garbage."""
import torch

from dsla_model.engine.attention import attend_pieces, paged_decode_torch


def test_garbage_in_the_scratch_block_does_not_reach_real_rows():
    g = torch.Generator().manual_seed(0)
    bs, Hkv, Hq, D = 4, 2, 4, 8
    pool = torch.randn(6, 2, bs, Hkv, D, generator=g)
    pool[0] = float("nan")  # scratch block: what a padded row or the scratch state pair left there
    pool[0, 1, 1] = float("inf")
    table = torch.tensor([[3, 5, 0, 0], [1, 0, 0, 0]])  # rows padded with the scratch block
    lens = torch.tensor([7, 2])
    q = torch.randn(2, Hq, D, generator=g)
    o = paged_decode_torch(q, pool, table, lens, D ** -0.5)
    assert torch.isfinite(o).all()
    want = attend_pieces(q, pool, table, [(6, 1), (1, 1)], D ** -0.5)  # reads each sequence's length only
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)
