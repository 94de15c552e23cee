"""The decode step's ends (kernels/decode_io.py): the Triton launches against the torch forms
on random inputs, outputs poisoned first (compiled on CUDA, interpreted on CPU)."""
import pytest
import torch

from kernels import decode_io
from tests.kernels.where import CUDA, DEV  # also skips this module where no Triton path runs


def _torch_path(monkeypatch):
    monkeypatch.setattr(decode_io, "_triton", lambda t: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,L", [(1, 96, 3), (5, 200, 4), (17, 64, 2)])
def test_step_inputs_match_torch(monkeypatch, dtype, B, H, L):
    g = torch.Generator().manual_seed(B * H)
    V, D, nb, bs, maxlen = 50, 8, 6, 4, 24
    ids = torch.randint(0, V, (B,), generator=g).to(DEV)
    pos = torch.randint(0, maxlen, (B,), generator=g).to(DEV)
    embed = torch.randn(V, H, generator=g).to(DEV, dtype)
    nw = torch.randn(H, generator=g).to(DEV, dtype)
    cos_t, sin_t = (torch.randn(maxlen, D, generator=g).to(DEV, dtype) for _ in range(2))
    tables = torch.randint(0, 100, (L, B, nb), generator=g).to(DEV)
    args = (ids, pos, embed, nw, cos_t, sin_t, tables, bs)
    _torch_path(monkeypatch)
    want = decode_io.step_inputs(*args)
    monkeypatch.setattr(decode_io, "_triton", lambda t: True)
    got = decode_io.step_inputs(*args)
    names = ("x", "hg", "sq", "cos", "sin", "wblk", "woff", "lens")
    for n, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        if n == "sq":  # a sum: the order differs
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        elif n == "hg" and dtype == torch.bfloat16 and not CUDA:
            # the interpreter rounds to bf16 toward zero, the GPU and torch to nearest: one step apart
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(a, b), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,V", [(1, 100), (4, 9000), (3, 4096)])
def test_greedy_next_matches_torch(monkeypatch, dtype, B, V):
    g = torch.Generator().manual_seed(V + B)
    logits = torch.randn(B, V, generator=g).to(DEV, dtype)
    logits[0, V // 2] = logits[0, V - 1] = 9.0  # a tie across chunks: the first one wins
    if B > 1:  # a tie in one lane of the kernel's 4096-wide chunks, and one inside a chunk
        logits[1, 7] = logits[1, 7 + 4096 if V > 4103 else V - 2] = 9.0
        logits[-1, 3] = logits[-1, 5] = 9.0
    live = torch.tensor([1] * (B - 1) + [0], device=DEV)
    ids0 = torch.randint(0, V, (B,), generator=g).to(DEV)
    pos0 = torch.randint(0, 50, (B,), generator=g).to(DEV)
    out = []
    for path in (False, True):
        monkeypatch.setattr(decode_io, "_triton", lambda t, p=path: p)
        ids, pos = ids0.clone(), pos0.clone()
        out.append((decode_io.greedy_next(logits, live, ids, pos), ids, pos))
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert out[1][0][0] == V // 2
    if B > 1:
        assert out[1][0][1] == 7 and out[1][0][-1] == 3
    assert out[1][1][-1] == 0 and out[1][2][-1] == pos0[-1]  # the padding row stays put


def test_greedy_next_takes_the_first_nan_as_torch_argmax_does(monkeypatch):
    """The kernel skipped NaN (x > best is false) where torch.argmax returns it: the graph and eager
    paths chose different tokens for one broken row."""
    logits = torch.tensor([[0.0, 1.0, float("nan"), 2.0, float("nan")], [3.0, 1.0, 2.0, -1.0, 0.0],
                           [float("nan")] * 5]).to(DEV)
    live = torch.ones(3, dtype=torch.long, device=DEV)
    out = []
    for path in (False, True):
        monkeypatch.setattr(decode_io, "_triton", lambda t, p=path: p)
        out.append(decode_io.greedy_next(logits, live, torch.zeros(3, dtype=torch.long, device=DEV),
                                         torch.zeros(3, dtype=torch.long, device=DEV)).tolist())
    assert out[0] == out[1] == [2, 0, 0]
