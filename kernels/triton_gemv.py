"""Skinny GEMM for decode steps (M <= 16 rows): y = x @ w.T in Triton, with the decoder's
elementwise neighbours fused into its epilogue. The dispatch that picks a config or cuBLAS
per shape is kernels/gemv_dispatch.py.

Why: a decode step of a 7B model reads ~13 GB of weights at 1..16 rows of x. Each program
owns BN rows of w; the K loop is software-pipelined (num_stages) so that several weight
tiles are in flight per program. x is padded to 16 rows for the tensor-core dot; its tiles
are tiny and come from L2. Sums run in a fixed order (deterministic).
Split-K (each row block's K range cut over 2-4 programs, the last one summing fp32
partials in a fixed order) was measured inside the chain of bench/gemv_chain.py on an H200
and lost to this form on every shape, o and down included (gemv_chain.split-h200.md).
Epilogues (`Epilogue`), so that a decode layer is four GEMVs and its mixer, with no norm
or activation kernels between them:
  - residual + norm_weight: y = residual + x @ w.T (the new residual stream), and the next
    RMSNorm's input without its 1/rms: hg = y * norm_weight, plus fp32 sums of y^2 per row
    block (`sq`). The 1/rms needs all of y, which no program has;
  - rstd_sq: the consumer of (hg, sq) sums the partials and scales its rows by
    rsqrt(mean + eps): hg @ w.T * rstd = rmsnorm(y) @ w.T, rounded once instead of twice;
  - gated: w = [gate; up] (2N rows), y = silu(x @ gate.T) * (x @ up.T).
Prologues fused into the x load cost more than they save (measured on an H200: a
silu(gate) * up prologue made down_proj 2-3x slower, a per-head scale o_proj ~10%): x
feeds the tensor-core dot untouched; everything else happens on the accumulator.
`w2` appends a second weight matrix: y = x @ [w; w2].T in one launch (a DSLA layer's
q/k/v and gate-down projections share their input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_alloc
from kernels.gemv_epilogue import MAX_M, PLAIN, Epilogue


@triton.jit
def _gemv(X, W, W2, Y, M, N, N2, K, s_xm, s_wn, s_w2n, s_ym, SQI, NSQI, R, s_rm, G, HG, SQO, eps,
          HAS_W2: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          BK: tl.constexpr, RSTD: tl.constexpr, GATED: tl.constexpr, RESNORM: tl.constexpr, NSQ_B: tl.constexpr):
    """Row block nb of [w; w2] against all of x, summed over K in order, then the epilogue."""
    nb = tl.program_id(0)
    if GATED:
        # half the block's rows from gate, the same rows of up below: one weight tile per K step,
        # as in the plain form (two tiles per step measured 9% slower on an H200)
        i = tl.arange(0, BN)
        rn = nb * (BN // 2) + i % (BN // 2)
        n_ok = rn < N
        wp = W + (rn + (i >= BN // 2) * N)[:, None] * s_wn
        ycol = nb * (BN // 2) + tl.arange(0, BN // 2)
    else:
        rn = nb * BN + tl.arange(0, BN)
        n_ok = rn < N
        ycol = rn
        wp = W + rn[:, None] * s_wn
        if HAS_W2:
            nb1 = tl.cdiv(N, BN)
            if nb >= nb1:  # this block's rows come from w2; its outputs follow w's N columns
                rn = (nb - nb1) * BN + tl.arange(0, BN)
                n_ok = rn < N2
                ycol = N + rn
                wp = W2 + rn[:, None] * s_w2n
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    # The epilogue's operands are loaded before the loop: their latency hides behind the weights.
    if RSTD:
        p = tl.arange(0, NSQ_B)  # the producer's partials, one per its row blocks
        sq = tl.load(SQI + p[:, None] * BM + rm[None, :], mask=(p < NSQI)[:, None] & m_ok[None, :], other=0.0)
    if RESNORM:
        ym = n_ok[:, None] & m_ok[None, :]
        res = tl.load(R + rm[None, :] * s_rm + ycol[:, None], mask=ym, other=0.0).to(tl.float32)
        g = tl.load(G + ycol, mask=n_ok, other=0.0).to(tl.float32)
    wp += rk[None, :]
    xp = X + rm[:, None] * s_xm + rk[None, :]
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for k in range(0, K, BK):
        if EVEN_K:
            wm = n_ok[:, None]
            xm = m_ok[:, None]
        else:
            k_ok = (k + rk) < K
            wm = n_ok[:, None] & k_ok[None, :]
            xm = m_ok[:, None] & k_ok[None, :]
        w = tl.load(wp, mask=wm, other=0.0)
        x = tl.load(xp, mask=xm, other=0.0)
        if IEEE:
            acc += tl.dot(w, tl.trans(x), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(x))
        wp += BK
        xp += BK
    if RSTD:
        acc = acc * tl.rsqrt(tl.sum(sq, 0) / K + eps)[None, :]
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BN // 2, BM)), (1, 2, 0)))
        acc = gate / (1.0 + tl.exp(-gate)) * up
        n_ok = ycol < N
    ym = n_ok[:, None] & m_ok[None, :]
    if RESNORM:
        acc += res
    y = acc.to(Y.dtype.element_ty)
    tl.store(Y + rm[None, :] * s_ym + ycol[:, None], y, mask=ym)
    if RESNORM:
        yf = y.to(tl.float32)  # the rounded residual, as the next RMSNorm reads it (zero where masked)
        tl.store(HG + rm[None, :] * s_ym + ycol[:, None], (yf * g[:, None]).to(HG.dtype.element_ty), mask=ym)
        tl.store(SQO + nb * BM + rm, tl.sum(yf * yf, 0))


def _check_args(x, w, w2, epi):
    M, K = x.shape
    if M > MAX_M or x.stride(1) != 1 or not w.is_contiguous() or (w2 is not None and not w2.is_contiguous()):
        raise ValueError("gemv_triton needs M <= 16, x with unit stride along K and contiguous weights")
    if w.shape[1] != K or (w2 is not None and w2.shape[1] != K):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}")
    if epi.gated and (w2 is not None or w.shape[0] % 2):
        raise ValueError("a gated GEMV takes one [gate; up] matrix with an even row count")
    if (epi.residual is None) != (epi.norm_weight is None):
        raise ValueError("residual and norm_weight come together")
    if epi.residual is not None and (w2 is not None or epi.gated):
        raise ValueError("the residual epilogue is for a plain projection")
    n_out = w.shape[0] // 2 if epi.gated else w.shape[0] + (w2.shape[0] if w2 is not None else 0)
    if epi.residual is not None and (epi.residual.shape != (M, n_out) or epi.residual.stride(1) != 1):
        raise ValueError(f"residual must be [{M}, {n_out}] with unit column stride")
    if epi.norm_weight is not None and (tuple(epi.norm_weight.shape) != (n_out,) or not epi.norm_weight.is_contiguous()):
        raise ValueError(f"norm_weight must be a contiguous [{n_out}] tensor")
    if epi.rstd_sq is not None and (epi.rstd_sq.dim() != 2 or epi.rstd_sq.shape[1] != MAX_M
                                    or not epi.rstd_sq.is_contiguous()):
        raise ValueError(f"rstd_sq must be a contiguous [P, {MAX_M}] tensor of row sums of squares")
    return n_out


def gemv_triton(x, w, w2=None, config=(32, 128, 4, 6), epi: Epilogue = PLAIN):
    """x [M,K] (M <= 16, unit stride along K) -> x @ [w; w2].T [M, N + N2] with `epi` applied;
    with a residual epilogue, (y, hg, sq). config: (BN, BK, warps, stages); a gated GEMV's
    BN counts gate and up rows together."""
    BN, BK, warps, stages = config
    n_out = _check_args(x, w, w2, epi)
    M, K = x.shape
    N = w.shape[0] // 2 if epi.gated else w.shape[0]
    N2 = w2.shape[0] if w2 is not None else 0
    y = triton_alloc.empty(M, n_out, dtype=x.dtype, device=x.device)
    nb = triton.cdiv(N, BN // 2) if epi.gated else triton.cdiv(N, BN) + triton.cdiv(N2, BN)
    res = epi.residual is not None
    hg = triton_alloc.empty(M, n_out, dtype=x.dtype, device=x.device) if res else y
    sq = triton_alloc.empty(nb, MAX_M, dtype=torch.float32, device=x.device) if res else y
    if nb == 0:
        return (y, hg, sq) if res else y
    sqi = epi.rstd_sq
    args = (x, w, w2 if w2 is not None else w, y, M, N, N2, K, x.stride(0), w.stride(0),
            w2.stride(0) if w2 is not None else 0, y.stride(0),
            sqi if sqi is not None else y, sqi.shape[0] if sqi is not None else 0,
            epi.residual if res else y, epi.residual.stride(0) if res else 0,
            epi.norm_weight if res else y, hg, sq, float(epi.eps))
    flags = dict(HAS_W2=w2 is not None, EVEN_K=K % BK == 0, IEEE=x.dtype == torch.float32, BM=MAX_M, BN=BN,
                 BK=BK, RSTD=sqi is not None, GATED=epi.gated, RESNORM=res,
                 NSQ_B=triton.next_power_of_2(sqi.shape[0]) if sqi is not None else 1,
                 num_warps=warps, num_stages=stages)
    _gemv[(nb,)](*args, **flags)
    return (y, hg, sq) if res else y
