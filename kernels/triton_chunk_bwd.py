"""Fused dual-state chunked prefill, backward (Triton).

Notation per state i: b = chunk-relative inclusive cumsum of the log decay,
h_c = state at the start of chunk c (recomputed by `_states_fwd`),
dS_c = gradient w.r.t. the state at the END of chunk c, dO' = scale * dO.

  1. `_states_bwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks
     backwards carrying both dS in registers:
         dS_{c-1} = exp(b_last) dS_c + w_i sum_{group heads} (q exp(b))^T dO'
     storing dS_c for every chunk and, at the end, the initial states' gradients.
  2. `_grads_bwd`: per (chunk, query head), in parallel, for both states:
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

from kernels.triton_chunk_fwd import load_rows, mm, mm_precise, pair_decay, sub_cumsum


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
def _one_state_bwd(q, g, h, dS, do, dq_out, dk_out, qq, kk, vv, dd, dv_acc, wi, first,
                   t, mt, t0, eos, hq, hk, Hq, Hkv, hoff, mst, scale,
                   Dk: tl.constexpr, Dv: tl.constexpr, dk, mk, dv, mv,
                   C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, RANGE_MAX: tl.constexpr,
                   IEEE: tl.constexpr):
    # The intra-chunk products run on fp32 operands (tf32 for bf16 inputs, exact fp32 for
    # fp32 inputs): each pair (t, s) enters the gate gradient twice, through q.dq at t and
    # k.dk at s, and those two must round alike for their cancellation in the reverse
    # cumsum to hold; bf16 operands left the recency gate's gradient ~10% off.
    NSUB: tl.constexpr = C // SUB
    dt = kk.dtype
    gf = load_rows(g, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    b = tl.cumsum(gf, axis=0)
    blast = tl.sum(gf, axis=0)
    hh = tl.load(h + hoff, mask=mst, other=0.)
    dq_inter = mm(dd, tl.trans(hh), IEEE) * tl.exp(b)
    dq3 = tl.zeros([NSUB, SUB, BK], dtype=tl.float32)
    dk_acc = tl.zeros([C, BK], dtype=tl.float32)
    subs = tl.arange(0, NSUB)
    sr = tl.arange(0, SUB)
    cols = tl.arange(0, C)
    kf = kk.to(tl.float32)
    vf = vv.to(tl.float32)
    base = tl.zeros_like(blast)
    for i in tl.static_range(NSUB):
        bR, bref, bl = sub_cumsum(g, t0 + i * SUB, eos, hk, Hkv, Dk, dk, mk, base, SUB)
        tr = t0 + i * SUB + sr
        mr = tr < eos
        qR = load_rows(q, tr, mr, Hq, hq, Dk, dk, mk).to(tl.float32)
        dR = load_rows(do, tr, mr, Hq, hq, Dv, dv, mv).to(tl.float32) * scale
        causal = cols[None, :] <= (i * SUB + sr)[:, None]
        # dq and dk leave out the diagonal pair s = t: its terms cancel exactly in the gate
        # gradient (q.dq - k.dk) and, kept, would drown strongly decayed gates in rounding
        # noise. The host adds the diagonal back into dq and dk in fp32 (dpd).
        dP = tl.where(cols[None, :] < (i * SUB + sr)[:, None], mm(dR, tl.trans(vf), IEEE), 0.)
        rng = tl.max(bref - bl, axis=0)
        if rng <= RANGE_MAX:
            ek = tl.exp(tl.minimum(bref[None, :] - b, RANGE_MAX))
            kq = kf * ek
            eq = tl.exp(bR - bref[None, :])
            qr = qR * eq
            A = mm(qr, tl.trans(kq), IEEE)
            dqR = mm(dP, kq, IEEE) * eq
            dk_acc += ek * mm(tl.trans(dP), qr, IEEE)
        else:
            # Exact row-by-row form: every exponent a direct sum of log decays (<= 0).
            A = tl.zeros([SUB, C], dtype=tl.float32)
            dqR = tl.zeros([SUB, BK], dtype=tl.float32)
            for tt in range(SUB):
                sel = (sr == tt)[:, None]
                qt = tl.sum(tl.where(sel, qR, 0.), axis=0)
                pt = tl.sum(tl.where(sel, dP, 0.), axis=0)
                e = pair_decay(gf, i * SUB + tt, C)
                A = tl.where(sel, tl.sum(kf * e * qt[None, :], axis=1)[None, :], A)
                e = tl.where((cols < i * SUB + tt)[:, None], e, 0.)  # strict, as dP
                dqR = tl.where(sel, tl.sum(pt[:, None] * kf * e, axis=0)[None, :], dqR)
                dk_acc += pt[:, None] * qt[None, :] * e
        A = tl.where(causal, A, 0.)
        dv_acc += wi * mm(tl.trans(A), dR, IEEE)
        dq3 = tl.where((subs == i)[:, None, None], dqR[None, :, :], dq3)
        base = bl
    dq = dq_inter + tl.reshape(dq3, [C, BK])
    tl.store(dq_out + (t[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :], dq, mask=mt[:, None] & mk[None, :])
    dkt = wi * dk_acc
    if first:
        # the state path feeds k and v once per kv head, not once per query head
        # fp32 dS and a near-fp32 product: k.dk from the final state cancels against the
        # final-state term of the gate gradient (dS_T . S_T), computed in fp32
        dSS = tl.load(dS + hoff, mask=mst, other=0.)
        kd = tl.exp(blast[None, :] - b)
        dkt += mm_precise(vf, tl.trans(dSS), IEEE) * kd
        dv_acc += mm((kk * kd).to(dt), dSS.to(dt), IEEE)
    tl.store(dk_out + (t[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :], dkt, mask=mt[:, None] & mk[None, :])
    return dv_acc


@triton.jit
def _grads_bwd(q, k, v, g1, g2, w, h1, h2, dS1, dS2, do, dq1, dq2, dk1, dk2, dvp, dpd, cu, cseq, coff, scale,
               Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
               C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
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
    qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk)
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
    ddf = load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale
    dd = ddf.to(kk.dtype)
    # diagonal of dP = dO'.v, in fp32: the host adds its share to dq and dk
    tl.store(dpd + t * Hq + hq, tl.sum(ddf * vv.to(tl.float32), axis=1), mask=mt)
    dv_acc = tl.zeros([C, BV], dtype=tl.float32)
    dv_acc = _one_state_bwd(q, g1, h1, dS1, do, dq1, dk1, qq, kk, vv, dd, dv_acc, tl.load(w), first,
                            t, mt, t0, eos, hq, hk, Hq, Hkv, hoff, mst, scale,
                            Dk, Dv, dk, mk, dv, mv, C, SUB, BK, RANGE_MAX, IEEE)
    dv_acc = _one_state_bwd(q, g2, h2, dS2, do, dq2, dk2, qq, kk, vv, dd, dv_acc, tl.load(w + 1), first,
                            t, mt, t0, eos, hq, hk, Hq, Hkv, hoff, mst, scale,
                            Dk, Dv, dk, mk, dv, mv, C, SUB, BK, RANGE_MAX, IEEE)
    tl.store(dvp + (t[:, None] * Hq + hq).to(tl.int64) * Dv + dv[None, :], dv_acc, mask=mt[:, None] & mv[None, :])
