"""The skinny GEMM's epilogues (kernels/triton_gemv.py, `Epilogue`) and their torch forms
(kernels/gemv_epilogue.py) against float64 Llama math: residual add and the next RMSNorm's
parts, the RMSNorm applied from those parts, SiLU(gate) * up. CPU: fp32 through Triton's
interpreter; GPU (@gpu): bf16 at the Llama-2-7B shapes. Outputs are NaN-poisoned."""
import pytest
import torch

from kernels import triton_alloc
from kernels.gemv_epilogue import Epilogue, gemv_reference, norm_parts, rms_normalize
from tests.kernels.where import CUDA, DEV

EPS = 1e-5


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(triton_alloc, "POISON", True)


def _rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _rel(got, ref):
    assert not torch.isnan(got.float()).any(), "unwritten (NaN-poisoned) outputs"
    return ((got.double() - ref).norm() / ref.norm()).item()


def _rmsnorm(y, g):
    y = y.double()
    return y * torch.rsqrt(y.pow(2).mean(1, keepdim=True) + EPS) * g.double()


def _dtypes():
    # the interpreter's bf16 tl.dot is wrong (test_gemv.py); bf16 runs compiled on the GPU
    return [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1.5e-2


def _run(triton, x, w, w2, epi, config):
    from kernels.triton_gemv import gemv_triton

    return gemv_triton(x, w, w2, config, epi) if triton else gemv_reference(x, w, w2, epi)


CASES = [(3, 48, 96, (16, 32, 4, 2)), (1, 40, 200, (32, 64, 4, 2)), (16, 64, 64, (32, 16, 4, 3))]


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("M,N,K,config", CASES)
def test_residual_and_norm_parts(M, N, K, config, dtype, triton):
    x, r = _rand(M, K, seed=1).to(DEV, dtype), _rand(M, N, seed=2).to(DEV, dtype)
    w = (_rand(N, K, seed=3, scale=K ** -0.5)).to(DEV, dtype)
    g = (torch.rand(N, generator=torch.Generator().manual_seed(4)) + 0.5).to(DEV, dtype)
    y, hg, sq = _run(triton, x, w, None, Epilogue(residual=r, norm_weight=g), config)
    ref = r.double() + x.double() @ w.double().T
    tol = _tol(dtype)
    assert _rel(y, ref) < tol
    assert _rel(hg, ref * g.double()) < tol
    assert sq.shape[1] == 16 and not sq[:, M:].any()
    assert _rel(sq.sum(0)[:M], (y.double() ** 2).sum(1)) < 1e-5  # of the stored (rounded) y
    # the consumer's RMSNorm from (hg, sq) is rmsnorm(y) * g
    assert _rel(rms_normalize(hg, sq, EPS), _rmsnorm(y, g)) < tol


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("M,N,K,config", CASES)
def test_rstd_from_partials(M, N, K, config, dtype, triton):
    """A consumer of (hg, sq) computes rmsnorm(y) @ [w; w2].T, whichever producer made them."""
    y = _rand(M, K, seed=5, scale=3.0).to(DEV, dtype)
    g = (torch.rand(K, generator=torch.Generator().manual_seed(6)) + 0.5).to(DEV, dtype)
    w, w2 = _rand(N, K, seed=7, scale=K ** -0.5).to(DEV, dtype), _rand(8, K, seed=8, scale=K ** -0.5).to(DEV, dtype)
    hg, sq = norm_parts(y, g)
    sq = torch.cat([sq, torch.zeros_like(sq)])  # more partials than one: zeros must not count
    got = _run(triton, hg, w, w2, Epilogue(rstd_sq=sq, eps=EPS), config)
    assert _rel(got, _rmsnorm(y, g) @ torch.cat([w, w2]).double().T) < _tol(dtype)


@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("rstd", [False, True])
@pytest.mark.parametrize("M,N,K", [(3, 40, 96), (16, 24, 130)])
def test_gated(M, N, K, rstd, dtype, triton):
    x = _rand(M, K, seed=9).to(DEV, dtype)
    w = _rand(2 * N, K, seed=10, scale=K ** -0.5).to(DEV, dtype)
    g = (torch.rand(K, generator=torch.Generator().manual_seed(11)) + 0.5).to(DEV, dtype)
    h = _rmsnorm(x, g) if rstd else x.double()
    if rstd:
        x, sq = norm_parts(x, g)
    got = _run(triton, x, w, None, Epilogue(rstd_sq=sq if rstd else None, eps=EPS, gated=True), (16, 32, 4, 2))
    a = h @ w.double().T
    ref = torch.nn.functional.silu(a[:, :N]) * a[:, N:]
    assert got.shape == (M, N)
    assert _rel(got, ref) < _tol(dtype)


def test_a_decoder_layer_through_epilogues():
    """q/k/v, o (+residual), gate/up (SiLU*up), down (+residual), lm_head: one Llama layer with
    its mixer replaced by q's columns, against float64 (fp32 inputs; Triton where it runs)."""
    from kernels.triton_gemv import gemv_triton

    H, I, M, V = 64, 96, 4, 80
    ws = [_rand(n, k, seed=20 + i, scale=k ** -0.5).to(DEV) for i, (n, k) in
          enumerate(((3 * H, H), (H, H), (2 * I, H), (H, I), (V, H)))]
    g1, g2, gf = (torch.rand(H, generator=torch.Generator().manual_seed(30 + i)).to(DEV) + 0.5 for i in range(3))
    x = _rand(M, H, seed=33).to(DEV)
    cfg = (16, 32, 4, 2)
    hg, sq = norm_parts(x, g1)
    qkv = gemv_triton(hg, ws[0], None, cfg, Epilogue(rstd_sq=sq, eps=EPS))
    x1, hg, sq = gemv_triton(qkv[:, :H], ws[1], None, cfg, Epilogue(residual=x, norm_weight=g2))
    m = gemv_triton(hg, ws[2], None, cfg, Epilogue(rstd_sq=sq, eps=EPS, gated=True))
    x2, hg, sq = gemv_triton(m, ws[3], None, cfg, Epilogue(residual=x1, norm_weight=gf))
    logits = gemv_triton(hg, ws[4], None, cfg, Epilogue(rstd_sq=sq, eps=EPS))
    d = [w.double() for w in ws]
    r1 = x.double() + (_rmsnorm(x, g1) @ d[0].T)[:, :H] @ d[1].T
    a = _rmsnorm(r1, g2) @ d[2].T
    r2 = r1 + (torch.nn.functional.silu(a[:, :I]) * a[:, I:]) @ d[3].T
    assert _rel(x2, r2) < 1e-5
    assert _rel(logits, _rmsnorm(r2, gf) @ d[4].T) < 1e-5


def test_dispatch_above_16_rows_runs_the_torch_forms():
    """The engine's larger decode buckets: every epilogue through the dispatch at M = 20 (cuBLAS
    on CUDA, torch on CPU), chained as a layer chains them."""
    from kernels.gemv_dispatch import linear

    M, H, I = 20, 48, 40
    x = _rand(M, H, seed=60).to(DEV)
    g = torch.rand(H, generator=torch.Generator().manual_seed(61)).to(DEV) + 0.5
    wo, wgu = _rand(H, H, seed=62, scale=H ** -0.5).to(DEV), _rand(2 * I, H, seed=63, scale=H ** -0.5).to(DEV)
    y, hg, sq = linear(x, wo, epi=Epilogue(residual=x, norm_weight=g))
    m = linear(hg, wgu, epi=Epilogue(rstd_sq=sq, eps=EPS, gated=True))
    r = x.double() + x.double() @ wo.double().T
    a = _rmsnorm(r, g) @ wgu.double().T
    assert _rel(y, r) < 1e-5
    assert _rel(m, torch.nn.functional.silu(a[:, :I]) * a[:, I:]) < 1e-5


def test_bad_epilogues_raise():
    from kernels.triton_gemv import gemv_triton

    x, w = _rand(2, 32, seed=40).to(DEV), _rand(16, 32, seed=41).to(DEV)
    r, g = torch.zeros(2, 16, device=DEV), torch.ones(16, device=DEV)
    bad = [(w[:15], Epilogue(gated=True), (16, 32, 4, 2)),  # odd row count
           (w, Epilogue(residual=r), (16, 32, 4, 2)),  # residual without the norm weight
           (w, Epilogue(residual=r[:, :8], norm_weight=g), (16, 32, 4, 2)),  # wrong residual shape
           (w, Epilogue(rstd_sq=torch.zeros(3, 8, device=DEV)), (16, 32, 4, 2))]  # partials not [P, 16]
    for ww, epi, cfg in bad:
        with pytest.raises(ValueError):
            gemv_triton(x, ww, None, cfg, epi)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 4, 16])
def test_7b_layer_epilogues_every_config(M):
    """bf16 at the Llama-2-7B shapes, every config the dispatch may pick for each epilogue."""
    from kernels.gemv_dispatch import CONFIGS
    from kernels.triton_gemv import gemv_triton

    H, I = 4096, 11008
    x = _rand(M, H, seed=50).to(DEV, torch.bfloat16)
    g = (torch.rand(H, generator=torch.Generator().manual_seed(51)) + 0.5).to(DEV, torch.bfloat16)
    wo = _rand(H, H, seed=52, scale=H ** -0.5).to(DEV, torch.bfloat16)
    wgu = _rand(2 * I, H, seed=53, scale=H ** -0.5).to(DEV, torch.bfloat16)
    wd = _rand(H, I, seed=54, scale=I ** -0.5).to(DEV, torch.bfloat16)
    m = _rand(M, I, seed=55).to(DEV, torch.bfloat16)
    hg, sq = norm_parts(x, g)
    epi_res, epi_gate = Epilogue(residual=x, norm_weight=g), Epilogue(rstd_sq=sq, eps=EPS, gated=True)
    a = _rmsnorm(x, g) @ wgu.double().T
    ref_gate = torch.nn.functional.silu(a[:, :I]) * a[:, I:]
    for w, inp, epi, ref in ((wo, x, epi_res, x.double() + x.double() @ wo.double().T),
                             (wd, m, epi_res, x.double() + m.double() @ wd.double().T),
                             (wgu, hg, epi_gate, ref_gate)):
        for cfg in CONFIGS:
            out = gemv_triton(inp, w, None, cfg, epi)
            y = out[0] if isinstance(out, tuple) else out
            assert _rel(y, ref) < 1.5e-2, cfg
