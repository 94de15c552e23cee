"""Fused dual-state chunked prefill, backward (Triton).

Notation per state i: b = chunk-relative inclusive cumsum of the log decay,
h_c = state at the start of chunk c (recomputed by `_states_fwd`, fp32),
dS_c = gradient w.r.t. the state at the END of chunk c, dO' = scale * dO,
dP[t,s] = dO'_t . v_s for s < t (the diagonal s = t is handled apart, see below).

  1. `_states_bwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks backwards
     carrying both dS in registers:  dS_{c-1} = exp(b_last) dS_c + w_i sum_group (q exp(b))^T dO'
     storing dS_c for every chunk and, at the end, the initial states' gradients.
  2. `_dq_bwd` per (chunk, query head):
         dq~_i = (dO' h_i^T) exp(b_i) + sum_{s<t} dP[t,s] k_s exp(b_t - b_s)     (unweighted)
         dq    = sum_i w_i dq~_i + (w_0 + w_1) dpd k,   dpd_t = dO'_t . v_t (the diagonal)
     and writes dBq_i = w_i q dq~_i (the query half of the gate gradient) and per-chunk dw sums.
  3. `_dv_bwd` per (chunk, kv head): dv = sum_group A^T dO' + sum_i (k exp(b_last - b_i)) dS_i,
     with A the mixed scores the forward stored.
  4. `_dk_bwd` per (chunk, kv head):
         dk_i = w_i sum_{t>s} dP[t,s] q_t exp(b_t - b_s) + (v dS_i^T) exp(b_last - b_i)
         dk   = sum_i dk_i + (w_0 + w_1) sum_group dpd q
     and the gate gradient's chunk-local part: dB_i = sum_group dBq_i - k dk_i, reverse-cumsummed
     inside the chunk, plus each chunk's total (the host adds the later chunks' totals).
The diagonal pairs s = t cancel in the gate gradient, so they stay out of dq~ and dk_i.
The intra-chunk sums use the forward's block trick (triton_chunk_fwd.py): an output indexed by
the query row t (dq) runs over key blocks J with reference r_J; one indexed by the key row s
(dk) runs over query blocks I with reference r_I; each block is one tensor-core product whose
exponents are all bounded, with an exact fallback when a block decays by more than RANGE_MAX.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import chunk_tile, from_row, load_rows, mm, mm_precise, row_of, to_end


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
def pair_decay(gc, a, C: tl.constexpr):
    """exp(b_a - b_s) for every key row s <= a of the chunk, [C, BK] (rows s > a: 1).
    Summed directly over u = s+1..a, not as a difference of two long cumsums, so a pair
    a few steps apart stays exact even when the cumsums have grown to -1000s."""
    rows = tl.arange(0, C)
    gm = tl.where((rows <= a)[:, None], gc, 0.)
    return tl.exp(tl.cumsum(gm, axis=0, reverse=True) - gm)


@triton.jit
def dq_intra_state(dd, v_ptr, gc, g_ptr, t0, eos, t, mt, k_ptr, hk, Hkv, Dk: tl.constexpr, dk, mk,
                   Dv: tl.constexpr, dv, mv, C: tl.constexpr, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """sum_{s<t} dP[t,s] k_s exp(b_t - b_s), [C, BK], over key blocks J."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, SUB)
    out = tl.zeros_like(gc)
    for J in tl.static_range(C // SUB):
        tJ = t0 + J * SUB + cols
        mJ = tJ < eos
        kJ = load_rows(k_ptr, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
        vJ = load_rows(v_ptr, tJ, mJ, Hkv, hk, Dv, dv, mv).to(tl.float32)
        dP = tl.where(rows[:, None] > (J * SUB + cols)[None, :], mm(dd, tl.trans(vJ), IEEE), 0.)  # [C, SUB]
        gJ = load_rows(g_ptr, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
        if tl.max(-tl.sum(gJ, axis=0), axis=0) <= RANGE_MAX:
            kp = kJ * tl.exp(-tl.cumsum(gJ, axis=0))
            out += tl.exp(from_row(gc, J * SUB, C)) * mm(dP, kp, IEEE)  # rows before J: dP = 0
        else:  # exact, column by column
            for j in range(SUB):
                s = J * SUB + j
                e = tl.where((rows > s)[:, None], tl.exp(tl.cumsum(tl.where((rows > s)[:, None], gc, 0.), axis=0)), 0.)
                ps = tl.sum(tl.where((cols == j)[None, :], dP, 0.), axis=1)
                out += ps[:, None] * row_of(kJ, j, SUB)[None, :] * e
    return out


@triton.jit
def _dq_bwd(q, k, v, g1, g2, w, h1, h2, do, dq, dBq1, dBq2, dwp, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, query head): dq, the query half of both gate gradients, and dw's chunk sums."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    qf = load_rows(q, t, mt, Hq, hq, Dk, dk, mk).to(tl.float32)
    kf = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    vf = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv).to(tl.float32)
    dd = load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale
    dpd = tl.sum(dd * vf, axis=1)  # the diagonal of dO' v^T, in fp32
    qk_diag = tl.sum(dpd * tl.sum(qf * kf, axis=1), axis=0)
    dq_tot = (w0 + w1) * dpd[:, None] * kf
    out = (t[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :]
    m_out = mt[:, None] & mk[None, :]
    # state 1
    gc = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    dqi = mm(dd, tl.trans(tl.load(h1 + hoff, mask=mst, other=0.)), IEEE) * tl.exp(tl.cumsum(gc, axis=0))
    dqi += dq_intra_state(dd, v, gc, g1, t0, eos, t, mt, k, hk, Hkv, Dk, dk, mk, Dv, dv, mv, C, SUB, RANGE_MAX, IEEE)
    dq_tot += w0 * dqi
    tl.store(dBq1 + out, w0 * qf * dqi, mask=m_out)
    tl.store(dwp + (ic * Hq + hq) * 2, tl.sum(tl.sum(qf * dqi, axis=1), axis=0) + qk_diag)
    # state 2
    gc = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    dqi = mm(dd, tl.trans(tl.load(h2 + hoff, mask=mst, other=0.)), IEEE) * tl.exp(tl.cumsum(gc, axis=0))
    dqi += dq_intra_state(dd, v, gc, g2, t0, eos, t, mt, k, hk, Hkv, Dk, dk, mk, Dv, dv, mv, C, SUB, RANGE_MAX, IEEE)
    dq_tot += w1 * dqi
    tl.store(dBq2 + out, w1 * qf * dqi, mask=m_out)
    tl.store(dwp + (ic * Hq + hq) * 2 + 1, tl.sum(tl.sum(qf * dqi, axis=1), axis=0) + qk_diag)
    tl.store(dq + out, dq_tot.to(dq.dtype.element_ty), mask=m_out)


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
def dk_intra_state(q, do, g_ptr, gc, vf, t0, eos, t, mt, hk, Hq, Hkv, scale, G: tl.constexpr,
                   Dk: tl.constexpr, Dv: tl.constexpr, dk, mk, dv, mv,
                   C: tl.constexpr, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """sum_group sum_{t>s} dP[t,s] q_t exp(b_t - b_s), [C, BK], over query blocks I."""
    rows = tl.arange(0, C)
    sr = tl.arange(0, SUB)
    out = tl.zeros_like(gc)
    for I in tl.static_range(C // SUB):
        tI = t0 + I * SUB + sr
        mI = tI < eos
        gI = load_rows(g_ptr, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
        fast = tl.max(-tl.sum(gI, axis=0), axis=0) <= RANGE_MAX
        lI = tl.cumsum(gI, axis=0)  # b_t - r_I for t in I, direct
        # r_I - b_s, direct: sum_{u=s+1..first(I)-1} g_u before I, -sum_{u=first(I)..s} g_u from I on
        before = tl.where((rows < I * SUB)[:, None], gc, 0.)
        rI_b = tl.where((rows < I * SUB)[:, None], tl.cumsum(before, axis=0, reverse=True) - before,
                        -from_row(gc, I * SUB, C))
        for gi in range(G):
            hq = hk * G + gi
            qI = load_rows(q, tI, mI, Hq, hq, Dk, dk, mk).to(tl.float32)
            dI = load_rows(do, tI, mI, Hq, hq, Dv, dv, mv).to(tl.float32) * scale
            dP = tl.where((I * SUB + sr)[:, None] > rows[None, :], mm(dI, tl.trans(vf), IEEE), 0.)  # [SUB, C]
            if fast:
                out += tl.exp(tl.minimum(rI_b, RANGE_MAX)) * mm(tl.trans(dP), qI * tl.exp(lI), IEEE)
            else:  # exact, query row by query row
                for i in range(SUB):
                    a = I * SUB + i
                    e = tl.where((rows < a)[:, None], pair_decay(gc, a, C), 0.)
                    pa = row_of(dP, i, SUB)
                    out += pa[:, None] * row_of(qI, i, SUB)[None, :] * e
    return out


@triton.jit
def dk_one_state(q, k_f, do, g_ptr, dS, dBq, dgl, tot, wi, vf, t0, eos, t, mt, ic, hk, Hq, Hkv, hoff, mst, scale,
                 G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr, dk, mk, dv, mv,
                 C: tl.constexpr, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """dk_i of one state; stores the chunk-local reverse cumsum of dB_i and its chunk total."""
    gc = load_rows(g_ptr, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    # fp32 dS and a near-fp32 product: k.dk from the final state cancels against the
    # final-state term of the gate gradient (dS_T . S_T), computed in fp32
    dki = to_end(mm_precise(vf, tl.trans(tl.load(dS + hoff, mask=mst, other=0.)), IEEE), gc)
    dki += wi * dk_intra_state(q, do, g_ptr, gc, vf, t0, eos, t, mt, hk, Hq, Hkv, scale, G, Dk, Dv, dk, mk,
                               dv, mv, C, SUB, RANGE_MAX, IEEE)
    dB = -k_f * dki
    for gi in range(G):
        dB += load_rows(dBq, t, mt, Hq, hk * G + gi, Dk, dk, mk)
    tl.store(dgl + (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :], tl.cumsum(dB, axis=0, reverse=True),
             mask=mt[:, None] & mk[None, :])
    tl.store(tot + (ic * Hkv + hk).to(tl.int64) * Dk + dk, tl.sum(dB, axis=0), mask=mk)
    return dki


@triton.jit
def _dk_bwd(q, k, v, g1, g2, w, dS1, dS2, do, dBq1, dBq2, dk_out, dgl1, dgl2, tot1, tot2, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, kv head): dk (both states, the whole query group) and the gate gradients'
    chunk-local parts (reads dBq from `_dq_bwd`)."""
    ic = tl.program_id(0)
    hk = tl.program_id(1)
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    kf = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    vf = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv).to(tl.float32)
    dk_tot = dk_one_state(q, kf, do, g1, dS1, dBq1, dgl1, tot1, w0, vf, t0, eos, t, mt, ic, hk, Hq, Hkv, hoff, mst,
                          scale, G, Dk, Dv, dk, mk, dv, mv, C, SUB, RANGE_MAX, IEEE)
    dk_tot += dk_one_state(q, kf, do, g2, dS2, dBq2, dgl2, tot2, w1, vf, t0, eos, t, mt, ic, hk, Hq, Hkv, hoff,
                           mst, scale, G, Dk, Dv, dk, mk, dv, mv, C, SUB, RANGE_MAX, IEEE)
    for gi in range(G):  # the diagonal s = t
        hq = hk * G + gi
        dd = load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale
        qf = load_rows(q, t, mt, Hq, hq, Dk, dk, mk).to(tl.float32)
        dk_tot += (w0 + w1) * tl.sum(dd * vf, axis=1)[:, None] * qf
    tl.store(dk_out + (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :], dk_tot.to(dk_out.dtype.element_ty),
             mask=mt[:, None] & mk[None, :])


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
