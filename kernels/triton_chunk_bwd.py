"""Fused dual-state chunked prefill, backward (Triton).

Notation per state i: b = chunk-relative inclusive cumsum of the log decay,
h_c = state at the start of chunk c (recomputed by `_states_fwd`),
dS_c = gradient w.r.t. the state at the END of chunk c, dO' = scale * dO.

  1. `_states_bwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks
     backwards carrying both dS in registers:
         dS_{c-1} = exp(b_last) dS_c + w_i sum_{group heads} (q exp(b))^T dO'
     storing dS_c for every chunk and, at the end, the initial states' gradients.
  2. `_dq_bwd` (per chunk, query head, sub-chunk) and `_dkv_bwd` (per chunk, query
     head), in parallel, for both states:
         dq~_i = dO' h^T * exp(b) + intra          (unweighted by w_i; dq = sum w_i dq~_i)
         dk_i  = w_i intra + exp(b_last - b) * (v dS^T)   (state part once per group)
     where the intra parts of dq~ and dk leave out the diagonal s = t (added on the host
     from dpd = dO'.v, which keeps the gate gradient free of its cancelling terms)
         dv   += w_i A_i^T dO' + (k exp(b_last - b)) dS
     with the same sub-chunk reference points (and exact fallback) as the forward.
The gate gradients are assembled from these on the host side (see triton_dsla.py):
dB_i = w_i q.dq~_i - k.dk_i, reverse-cumsummed within each sequence.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import load_rows, mm, mm_precise, pair_decay, sub_cumsum, sub_rows


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
def _dq_one_state(g, h, dq_out, kf, dP, dR, t, mt, tr, mr, t0, eos, i, hq, hk, Hq, Hkv, hoff, mst,
                  Dk: tl.constexpr, dk, mk, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
                  RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """dq~ rows of sub-chunk i for one state (not weighted by w): inter + strict intra."""
    gc = load_rows(g, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    b = tl.cumsum(gc, axis=0)
    bR, bref, bl = sub_rows(g, gc, i, t0, eos, hk, Hkv, Dk, dk, mk, C, SUB)
    hh = tl.load(h + hoff, mask=mst, other=0.)
    dq = mm(dR.to(hh.dtype), tl.trans(hh), IEEE) * tl.exp(bR)
    sr = tl.arange(0, SUB)
    cols = tl.arange(0, C)
    if tl.max(bref - bl, axis=0) <= RANGE_MAX:
        kq = kf * tl.exp(tl.minimum(bref[None, :] - b, RANGE_MAX))
        dq += mm(dP, kq, IEEE) * tl.exp(bR - bref[None, :])
    else:  # exact row by row, every exponent a direct sum of log decays
        for tt in range(SUB):
            sel = (sr == tt)[:, None]
            pt = tl.sum(tl.where(sel, dP, 0.), axis=0)
            e = tl.where((cols < i * SUB + tt)[:, None], pair_decay(gc, i * SUB + tt, C), 0.)
            dq += tl.where(sel, tl.sum(pt[:, None] * kf * e, axis=0)[None, :], 0.)
    tl.store(dq_out + (tr[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :], dq, mask=mr[:, None] & mk[None, :])


@triton.jit
def _dq_bwd(q, k, v, g1, g2, h1, h2, do, dq1, dq2, dpd, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, query head, sub-chunk): dq~ of both states and the diagonal dpd = dO'.v."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    i = tl.program_id(2)
    hk = hq // G
    n = tl.load(cseq + ic)
    t0 = tl.load(cu + n).to(tl.int64) + (ic - tl.load(coff + n)).to(tl.int64) * C
    eos = tl.load(cu + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, C)
    mt = t < eos
    sr = tl.arange(0, SUB)
    tr = t0 + i * SUB + sr
    mr = tr < eos
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    kf = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    vf = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv).to(tl.float32)
    dR = load_rows(do, tr, mr, Hq, hq, Dv, dv, mv).to(tl.float32) * scale
    # the diagonal of dP in fp32: the host adds its share to dq and dk
    vR = load_rows(v, tr, mr, Hkv, hk, Dv, dv, mv).to(tl.float32)
    tl.store(dpd + tr * Hq + hq, tl.sum(dR * vR, axis=1), mask=mr)
    # strict (s < t): the diagonal pairs cancel in the gate gradient, see the module docstring
    cols = tl.arange(0, C)
    dP = tl.where(cols[None, :] < (i * SUB + sr)[:, None], mm(dR, tl.trans(vf), IEEE), 0.)
    _dq_one_state(g1, h1, dq1, kf, dP, dR, t, mt, tr, mr, t0, eos, i, hq, hk, Hq, Hkv, hoff, mst,
                  Dk, dk, mk, C, SUB, BK, RANGE_MAX, IEEE)
    _dq_one_state(g2, h2, dq2, kf, dP, dR, t, mt, tr, mr, t0, eos, i, hq, hk, Hq, Hkv, hoff, mst,
                  Dk, dk, mk, C, SUB, BK, RANGE_MAX, IEEE)


@triton.jit
def _dk_one_state(q, g, dS, do, dk_out, kf, vf, wi, first, t, mt, t0, eos, hq, hk, Hq, Hkv, hoff, mst, scale,
                  Dk: tl.constexpr, Dv: tl.constexpr, dk, mk, dv, mv, C: tl.constexpr, SUB: tl.constexpr,
                  BK: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """dk of one state for one chunk and query head: w_i * strict intra (+ the state part once
    per kv head). Loops over the query sub-chunks, accumulating the full [C, BK] tile."""
    NSUB: tl.constexpr = C // SUB
    gc = load_rows(g, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    b = tl.cumsum(gc, axis=0)
    sr = tl.arange(0, SUB)
    cols = tl.arange(0, C)
    dk_acc = tl.zeros([C, BK], dtype=tl.float32)
    base = tl.zeros_like(tl.sum(gc, axis=0))
    for i in tl.static_range(NSUB):
        bR, bref, bl = sub_cumsum(g, t0 + i * SUB, eos, hk, Hkv, Dk, dk, mk, base, SUB)
        tr = t0 + i * SUB + sr
        mr = tr < eos
        qR = load_rows(q, tr, mr, Hq, hq, Dk, dk, mk).to(tl.float32)
        dR = load_rows(do, tr, mr, Hq, hq, Dv, dv, mv).to(tl.float32) * scale
        dP = tl.where(cols[None, :] < (i * SUB + sr)[:, None], mm(dR, tl.trans(vf), IEEE), 0.)
        if tl.max(bref - bl, axis=0) <= RANGE_MAX:
            qr = qR * tl.exp(bR - bref[None, :])
            dk_acc += tl.exp(tl.minimum(bref[None, :] - b, RANGE_MAX)) * mm(tl.trans(dP), qr, IEEE)
        else:  # exact row by row
            for tt in range(SUB):
                sel = (sr == tt)[:, None]
                qt = tl.sum(tl.where(sel, qR, 0.), axis=0)
                pt = tl.sum(tl.where(sel, dP, 0.), axis=0)
                e = tl.where((cols < i * SUB + tt)[:, None], pair_decay(gc, i * SUB + tt, C), 0.)
                dk_acc += pt[:, None] * qt[None, :] * e
        base = bl
    dkt = wi * dk_acc
    if first:
        # fp32 dS and a near-fp32 product: k.dk from the final state cancels against the
        # final-state term of the gate gradient (dS_T . S_T), computed in fp32
        dSS = tl.load(dS + hoff, mask=mst, other=0.)
        dkt += mm_precise(vf, tl.trans(dSS), IEEE) * tl.exp(tl.sum(gc, axis=0)[None, :] - b)
    tl.store(dk_out + (t[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :], dkt, mask=mt[:, None] & mk[None, :])


@triton.jit
def _dv_state_part(g, dS, kk, t, mt, hk, Hkv, hoff, mst, Dk: tl.constexpr, dk, mk, IEEE: tl.constexpr):
    gc = load_rows(g, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    kd = (kk * tl.exp(tl.sum(gc, axis=0)[None, :] - tl.cumsum(gc, axis=0))).to(kk.dtype)
    return mm(kd, tl.load(dS + hoff, mask=mst, other=0.).to(kk.dtype), IEEE)


@triton.jit
def _dkv_bwd(q, k, v, g1, g2, w, A, dS1, dS2, do, dk1, dk2, dvp, cu, cseq, coff, scale,
             Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
             C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, query head): dk of both states and dv = A^T dO' (+ state parts)."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    hk = hq // G
    first = (hq % G) == 0
    n = tl.load(cseq + ic)
    t0 = tl.load(cu + n).to(tl.int64) + (ic - tl.load(coff + n)).to(tl.int64) * C
    eos = tl.load(cu + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, C)
    mt = t < eos
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    kf = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    vf = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv).to(tl.float32)
    _dk_one_state(q, g1, dS1, do, dk1, kf, vf, tl.load(w), first, t, mt, t0, eos, hq, hk, Hq, Hkv, hoff, mst,
                  scale, Dk, Dv, dk, mk, dv, mv, C, SUB, BK, RANGE_MAX, IEEE)
    _dk_one_state(q, g2, dS2, do, dk2, kf, vf, tl.load(w + 1), first, t, mt, t0, eos, hq, hk, Hq, Hkv, hoff,
                  mst, scale, Dk, Dv, dk, mk, dv, mv, C, SUB, BK, RANGE_MAX, IEEE)
    # dv: the saved mixed scores give the intra part in one product
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    cols = tl.arange(0, C)
    Am = tl.load(A + (t[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], mask=mt[:, None], other=0.)
    dd = (load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale).to(kk.dtype)
    dv_acc = mm(tl.trans(Am.to(kk.dtype)), dd, IEEE)
    if first:
        dv_acc += _dv_state_part(g1, dS1, kk, t, mt, hk, Hkv, hoff, mst, Dk, dk, mk, IEEE)
        dv_acc += _dv_state_part(g2, dS2, kk, t, mt, hk, Hkv, hoff, mst, Dk, dk, mk, IEEE)
    tl.store(dvp + (t[:, None] * Hq + hq).to(tl.int64) * Dv + dv[None, :], dv_acc, mask=mt[:, None] & mv[None, :])
