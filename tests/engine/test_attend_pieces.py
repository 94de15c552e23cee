"""attend_pieces (the prefill attention over the paged pool) against softmax attention written out
token by token: pieces that start mid-sequence see every earlier token, GQA heads share KV."""
import math

import pytest
import torch

from dsla_model.engine.attention import attend_pieces


def _reference(q, k, v, start, scale):
    """q [n,Hq,D] at positions start..; k, v [length,Hkv,D] -> [n,Hq,D], one softmax per token and head."""
    Hq, Hkv = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        for h in range(Hq):
            kh, vh = k[:start + t + 1, h // (Hq // Hkv)], v[:start + t + 1, h // (Hq // Hkv)]
            w = torch.softmax((kh.double() @ q[t, h].double()) * scale, 0)
            out[t, h] = (w[:, None] * vh.double()).sum(0).to(q.dtype)
    return out


CASES = [("cpu", torch.float32)] + [pytest.param("cuda", dt, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")]) for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 8), (6, 2, 8), (3, 1, 8), (4, 2, 64)])
def test_pieces_match_token_by_token_softmax(Hq, Hkv, D, device, dtype):
    """On CUDA the lower-right causal bias takes flash attention (bf16) or another kernel (fp32)."""
    g = torch.Generator().manual_seed(Hq * 10 + Hkv)
    bs, nblocks = 4, 16
    pool = torch.randn(nblocks, 2, bs, Hkv, D, generator=g)
    pool[0] = float("nan")  # the scratch block: never read for a real token
    tables = torch.tensor([[5, 9, 2, 7, 13], [3, 11, 0, 0, 0], [14, 0, 0, 0, 0]])
    pieces = [(6, 11), (0, 7), (2, 1)]  # mid-sequence chunk across blocks, a whole prompt, a decode token
    q = torch.randn(sum(n for _, n in pieces), Hq, D, generator=g)
    scale = 1 / math.sqrt(D)
    o = attend_pieces(q.to(device, dtype), pool.to(device, dtype), tables.to(device), pieces, scale).float().cpu()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    if dtype == torch.bfloat16:  # the reference sees the same rounded inputs
        q, pool = q.bfloat16().float(), pool.bfloat16().float()
    a = 0
    for i, (start, n) in enumerate(pieces):
        length = start + n
        kv = pool[tables[i, :math.ceil(length / bs)]]  # [nb, 2, bs, Hkv, D]
        k = kv[:, 0].reshape(-1, Hkv, D)[:length]
        v = kv[:, 1].reshape(-1, Hkv, D)[:length]
        torch.testing.assert_close(o[a:a + n], _reference(q[a:a + n], k, v, start, scale), **tol)
        a += n
