"""Triton decode-step kernels against torch forms (CUDA only; also runs as a script)."""
import math

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _pool(nblocks, bs, hkv, d, dtype):
    return torch.randn(nblocks, 2, bs, hkv, d, device="cuda", dtype=dtype)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,D,bs,dtype", [(3, 8, 2, 64, 16, torch.float32), (5, 32, 32, 128, 16, torch.bfloat16),
                                                  (2, 9, 3, 64, 8, torch.bfloat16), (1, 32, 8, 128, 16, torch.float16)])
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_paged_decode_matches_torch(B, Hq, Hkv, D, bs, dtype, splits):
    from dsla_model.engine.attention import paged_decode_torch
    from kernels.triton_paged_attention import paged_decode_attention

    torch.manual_seed(0)
    pool = _pool(64, bs, Hkv, D, dtype)
    lens = torch.tensor([1, 37, 200, 5, 130][:B], device="cuda")
    nb = 300 // bs + 1
    table = torch.stack([torch.randperm(63, device="cuda")[:nb] + 1 for _ in range(B)]) if nb <= 63 else None
    table = torch.randint(1, 64, (B, nb), device="cuda")
    q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
    scale = D ** -0.5
    got = paged_decode_attention(q, pool, table, lens, scale, splits)
    ref = paged_decode_torch(q.float(), pool.float(), table, lens, scale).to(dtype)
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@cuda
@pytest.mark.gpu
def test_rope_write_and_add_rms_norm():
    from dsla_model.dsla_attention import apply_rope
    from kernels.triton_paged_attention import add_rms_norm, rope_and_cache_write

    torch.manual_seed(1)
    B, Hq, Hkv, D, bs = 4, 8, 2, 64, 16
    pool = torch.zeros(10, 2, bs, Hkv, D, device="cuda")
    q, k, v = (torch.randn(B, h * D, device="cuda") for h in (Hq, Hkv, Hkv))
    ang = torch.rand(B, D // 2, device="cuda") * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    blk, off = torch.tensor([1, 2, 3, 1], device="cuda"), torch.tensor([0, 5, 15, 3], device="cuda")
    qo = rope_and_cache_write(q, k, v, cos, sin, pool, blk, off)
    rq = apply_rope(q.view(B, 1, Hq, D), cos[:, None], sin[:, None])[:, 0]
    rk = apply_rope(k.view(B, 1, Hkv, D), cos[:, None], sin[:, None])[:, 0]
    torch.testing.assert_close(qo, rq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[blk, 0, off], rk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool[blk, 1, off], v.view(B, Hkv, D))
    x, dx, w = torch.randn(3, 4096, device="cuda"), torch.randn(3, 4096, device="cuda"), torch.rand(4096, device="cuda")
    xo, n = add_rms_norm(x, dx, w, 1e-6)
    s = x + dx
    torch.testing.assert_close(xo, s)
    torch.testing.assert_close(n, w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    import itertools

    for args, sp in itertools.product([(3, 8, 2, 64, 16, torch.float32), (5, 32, 32, 128, 16, torch.bfloat16),
                                       (2, 9, 3, 64, 8, torch.bfloat16), (1, 32, 8, 128, 16, torch.float16)],
                                      [None, 1, 7]):
        test_paged_decode_matches_torch(*args, sp)
    test_rope_write_and_add_rms_norm()
    print("kernel tests passed")
