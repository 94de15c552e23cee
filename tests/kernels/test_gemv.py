"""The skinny GEMM (kernels/triton_gemv.py) against its torch form x @ w.T (its epilogues:
test_gemv_epilogue.py).

CPU: small shapes through Triton's interpreter (tests/kernels/conftest.py sets it).
GPU (@gpu): the Llama-2-7B decode projections at M = 1, 4, 16, every config the tuner
may pick, and the dispatch. Outputs are poisoned (NaN) before each run, so an element
the kernel forgets to write fails the comparison; inputs are fresh random draws.
"""
import pytest
import torch

from kernels import triton_alloc

DEV = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def poison():
    triton_alloc.POISON = True
    yield
    triton_alloc.POISON = False


def _skip_interpreted_bf16(dtype):
    # Triton's CPU interpreter (3.9) returns garbage from tl.dot on bf16 operands; fp32 runs right
    if DEV == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot is wrong in Triton's CPU interpreter; covered by the @gpu tests")


def _rel(got, ref):
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) outputs"
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs(M, N, K, dtype, n2=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(DEV, dtype)
    w2 = (torch.randn(n2, K, generator=g) * K ** -0.5).to(DEV, dtype) if n2 else None
    return x, w, w2


def _check(M, N, K, dtype, n2=0, config=None, seed=0):
    from kernels.gemv_dispatch import CONFIGS
    from kernels.gemv_epilogue import gemv_reference
    from kernels.triton_gemv import gemv_triton

    x, w, w2 = _inputs(M, N, K, dtype, n2, seed)
    got = gemv_triton(x, w, w2, config or CONFIGS[0])
    # the torch form in x's dtype (what the kernel must match), and in float64 (how close both are)
    ref = gemv_reference(x, w, w2)
    exact = gemv_reference(x.double(), w.double(), None if w2 is None else w2.double())
    assert got.shape == (M, N + n2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(got, exact) < tol
    assert _rel(got, ref) < tol


@pytest.mark.parametrize("M,N,K", [(1, 48, 64), (3, 32, 100), (16, 40, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_small(M, N, K, dtype):
    _skip_interpreted_bf16(dtype)
    _check(M, N, K, dtype, config=(16, 32, 4, 2))


@pytest.mark.parametrize("n2", [24, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_second_matrix(n2, dtype):
    _skip_interpreted_bf16(dtype)
    _check(5, 48, 64, dtype, n2=n2, config=(16, 32, 4, 2))
    _check(2, 33, 80, dtype, n2=n2, config=(32, 16, 4, 3), seed=1)


def test_dispatch_cpu_is_reference():
    """Off CUDA (or above 16 rows) the dispatch is the torch form, with w2 split off."""
    from kernels.gemv_dispatch import linear
    from kernels.gemv_epilogue import gemv_reference

    x, w, w2 = _inputs(20, 32, 64, torch.float32, n2=8)
    y1, y2 = linear(x, w, w2)
    torch.testing.assert_close(torch.cat([y1, y2], 1), gemv_reference(x, w, w2))


def test_gemv_rejects_bad_shapes():
    from kernels.triton_gemv import gemv_triton

    x, w, _ = _inputs(17, 32, 64, torch.float32)
    with pytest.raises(ValueError):
        gemv_triton(x, w)
    with pytest.raises(ValueError):
        gemv_triton(x[:4, :32], w)


SHAPES_7B = [(12288, 4096, 0), (12288, 4096, 32), (4096, 4096, 0), (22016, 4096, 0), (4096, 11008, 0),
             (32000, 4096, 0)]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("N,K,n2", SHAPES_7B)
@pytest.mark.parametrize("M", [1, 4, 16])
def test_gemv_7b_shapes_every_config(N, K, n2, M):
    from kernels.gemv_dispatch import CONFIGS

    for i, cfg in enumerate(CONFIGS):
        _check(M, N, K, torch.bfloat16, n2, config=cfg, seed=i)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (7, 1000, 200), (16, 32000, 4096)])
def test_gemv_fp32_cuda(M, N, K):
    _check(M, N, K, torch.float32, config=(32, 128, 4, 3))


@cuda
@pytest.mark.gpu
def test_dispatch_cuda():
    from kernels.gemv_dispatch import choices, linear

    for M in (1, 4, 16, 17):
        x, w, w2 = _inputs(M, 12288, 4096, torch.bfloat16, n2=32, seed=M)
        y1, y2 = linear(x, w, w2)
        ref = x.double() @ torch.cat([w, w2]).double().T
        assert _rel(torch.cat([y1, y2], 1), ref) < 1e-2
        x, w, _ = _inputs(M, 4096, 11008, torch.bfloat16, seed=M + 1)
        assert _rel(linear(x, w), x.double() @ w.double().T) < 1e-2
    assert choices()



def test_the_residual_epilogue_refuses_a_norm_weight_it_would_misread():
    """The kernel reads norm_weight as a contiguous [N] vector: a strided one gave a wrong hg
    (5.25 off), a longer one was accepted."""
    from kernels.gemv_epilogue import Epilogue
    from kernels.triton_gemv import gemv_triton

    x, w = torch.randn(2, 32, device=DEV), torch.randn(32, 32, device=DEV)
    res = torch.randn(2, 32, device=DEV)
    for nw in (torch.randn(64, device=DEV)[::2], torch.randn(37, device=DEV)):
        with pytest.raises(ValueError, match="norm_weight"):
            gemv_triton(x, w, epi=Epilogue(residual=res, norm_weight=nw))
