"""Fused dual-state chunked prefill, backward: the state walks, dv and the gate-gradient finish (Triton).

Notation per state i: b = chunk-relative inclusive cumsum of the log decay,
h_c = state at the start of chunk c (recomputed by `_states_fwd`, fp32),
dS_c = gradient w.r.t. the state at the END of chunk c, dO' = scale * dO.

  1. `_states_bwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks backwards
     carrying both dS in registers:  dS_{c-1} = exp(b_last) dS_c + w_i sum_group (q exp(b))^T dO'
     storing dS_c for every chunk and, at the end, the initial states' gradients.
  2. dP, dq and dk: kernels/triton_chunk_dqk.py.
  3. `_dv_bwd` per (chunk, kv head): dv = sum_group A^T dO' + sum_i (k exp(b_last - b_i)) dS_i,
     with A the mixed scores the forward stored.
  4. `_dg_finish`: the gate gradient = `_dk_bwd`'s chunk-local reverse cumsum + the later
     chunks' totals of the sequence (summed on the host).
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import chunk_tile, load_rows, mm, to_end


@triton.jit
def _states_bwd(q, g1, g2, w, do, dsT1, dsT2, dS1, dS2, ds01, ds02, cu, coff, scale,
                Hq, Hkv, G, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr, IEEE: tl.constexpr):
    ik = tl.program_id(0)
    iv = tl.program_id(1)
    inh = tl.program_id(2)
    n = inh // Hkv
    hk = inh % Hkv
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(coff + n).to(tl.int64)
    nc = tl.cdiv(eos - bos, C)
    dk = ik * BK + tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    st = ((n * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    if HAS_DST:
        D1 = tl.load(dsT1 + st, mask=mst, other=0.).to(tl.float32)
        D2 = tl.load(dsT2 + st, mask=mst, other=0.).to(tl.float32)
    else:
        D1 = tl.zeros([BK, BV], dtype=tl.float32)
        D2 = tl.zeros([BK, BV], dtype=tl.float32)
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    rows = tl.arange(0, C)
    for cc in range(nc):
        c = nc - 1 - cc
        hoff = (((c0 + c) * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
        tl.store(dS1 + hoff, D1.to(dS1.dtype.element_ty), mask=mst)
        tl.store(dS2 + hoff, D2.to(dS2.dtype.element_ty), mask=mst)
        t = bos + c * C + rows
        mt = t < eos
        ga = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
        gb = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
        b1 = tl.cumsum(ga, axis=0)
        b2 = tl.cumsum(gb, axis=0)
        acc1 = tl.zeros([BK, BV], dtype=tl.float32)
        acc2 = tl.zeros([BK, BV], dtype=tl.float32)
        for gi in range(G):
            hq = hk * G + gi
            qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk)
            dd = (load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale).to(qq.dtype)
            acc1 += mm(tl.trans((qq * tl.exp(b1)).to(qq.dtype)), dd, IEEE)
            acc2 += mm(tl.trans((qq * tl.exp(b2)).to(qq.dtype)), dd, IEEE)
        D1 = D1 * tl.exp(tl.sum(ga, axis=0))[:, None] + w0 * acc1
        D2 = D2 * tl.exp(tl.sum(gb, axis=0))[:, None] + w1 * acc2
    tl.store(ds01 + st, D1, mask=mst)
    tl.store(ds02 + st, D2, mask=mst)


@triton.jit
def _dv_bwd(k, g1, g2, A, dS1, dS2, do, dv_out, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, kv head, Dv block): dv = sum_group A^T dO' + sum_i (k exp(b_last - b_i)) dS_i."""
    ic = tl.program_id(0)
    hk = tl.program_id(1)
    iv = tl.program_id(2)
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    gc = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    kd = to_end(kk, gc).to(kk.dtype)
    acc = mm(kd, tl.load(dS1 + hoff, mask=mst, other=0.).to(kk.dtype), IEEE)
    gc = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    kd = to_end(kk, gc).to(kk.dtype)
    acc += mm(kd, tl.load(dS2 + hoff, mask=mst, other=0.).to(kk.dtype), IEEE)
    cols = tl.arange(0, C)
    for gi in range(G):
        hq = hk * G + gi
        Am = tl.load(A + (t[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], mask=mt[:, None], other=0.)
        dd = (load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale).to(kk.dtype)
        acc += mm(tl.trans(Am.to(kk.dtype)), dd, IEEE)
    tl.store(dv_out + (t[:, None] * Hkv + hk).to(tl.int64) * Dv + dv[None, :], acc.to(dv_out.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


@triton.jit
def _dg_finish(dgl, suf, dg, cu, cseq, coff, Hkv, Dk: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """dg = chunk-local reverse cumsum + the later chunks' totals of the same sequence."""
    ic = tl.program_id(0)
    hk = tl.program_id(1)
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    mk = dk < Dk
    x = load_rows(dgl, t, mt, Hkv, hk, Dk, dk, mk)
    x += tl.load(suf + (ic * Hkv + hk).to(tl.int64) * Dk + dk, mask=mk, other=0.)[None, :]
    tl.store(dg + (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :], x.to(dg.dtype.element_ty),
             mask=mt[:, None] & mk[None, :])
