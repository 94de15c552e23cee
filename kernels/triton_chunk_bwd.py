"""Fused dual-state chunked prefill, backward (Triton).

Notation per state i: b = chunk-relative inclusive cumsum of the log decay,
h_c = state at the start of chunk c (fp32, kept by the forward when a gradient is wanted),
dS_c = gradient w.r.t. the state at the END of chunk c, dO' = scale * dO,
dP[t,s] = dO'_t . v_s for s < t (the diagonal s = t is handled apart, see below).

  1. `_states_bwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks backwards
     carrying both dS in registers:  dS_{c-1} = exp(b_last) dS_c + w_i sum_group (q exp(b))^T dO'
     storing dS_c for every chunk and, at the end, the initial states' gradients.
  2. `_inter_bwd` per (chunk, head, Dk block), at M = C rows: the inter-chunk terms
         Xq_i = exp(b) (dO' h_i^T)   (query heads)    Xk_i = exp(b_last - b) (v dS_i^T)   (kv heads)
     into the buffers dq / dk later overwrite with the gate gradients' parts (read first, same rows).
     Done per 16-row block inside dq / dk they cost ~3 of their 11 ms at T=16K (H200); the key
     side inside `_states_bwd` (dS is in its registers) made that walk 1.1 -> 5.3 ms.
  3. `_dA_bwd` per (chunk, query head): dP = dO' v^T of the chunk's pairs s < t and its
     diagonal dpd_t = dO'_t . v_t, to memory (fp32) once: dq and dk split Dk, and recomputing
     dP in each of their programs (over all of Dv) cost more than their own products.
  4. `_dq_bwd` per (chunk, query head, 16-row query block, Dk block):
         dq~_i = (dO' h_i^T) exp(b_i) + sum_{s<t} dP[t,s] k_s exp(b_t - b_s)     (unweighted)
         dq    = sum_i w_i dq~_i + (w_0 + w_1) dpd k
     and writes dBq_i = w_i q dq~_i (the query half of the gate gradient) and per-program dw sums.
  5. `_dv_bwd` per (chunk, kv head): dv = sum_group A^T dO' + sum_i (k exp(b_last - b_i)) dS_i,
     with A the mixed scores the forward stored.
  6. `_dk_bwd` per (chunk, kv head, 16-row key block, Dk block):
         dk_i = w_i sum_{t>s} dP[t,s] q_t exp(b_t - b_s) + (v dS_i^T) exp(b_last - b_i)
         dk   = sum_i dk_i + (w_0 + w_1) sum_group dpd q
     and the gate gradient's block-local part dB_i = sum_group dBq_i - k dk_i with each block's
     total; `_dg_suffix` sums the later blocks' totals of the sequence (and the final state's
     term) and `_dg_finish` reverse-cumsums dB_i inside each block and adds them.
The diagonal pairs s = t cancel in the gate gradient, so they stay out of dq~ and dk_i.
Every output column depends only on the same column of k, q and g (dP does not depend on Dk),
so dq and dk also split Dk across programs, which keeps their tiles small.
The intra-chunk sums use the forward's block walk (triton_chunk_fwd.py): a program
owns one block and walks the other blocks carrying the decay of the blocks strictly between,
so every exponent is <= 0 and bounded by one block's decay plus whole-block totals. The
exponents come from the forward's block cumsums b (no scans here: a 16-row scan is a chain of
shuffles, and dq / dk / dv / the walk ran 25-45% faster without them, H200); the diagonal block
factors exp(b) when it decays by at most RANGE_MAX, else takes an exact form from the log decays.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import (block_end_total, block_rows, chunk_head_cols, chunk_state_tile, chunk_tile,
                                     decay_from_start, decay_to_end, from_row, load_rows, load_state_pair, mm,
                                     mm_precise, row_of, walk_tile)


@triton.jit
def _states_bwd(q, b1, b2, w, do, dsT1, dsT2, dS1, dS2, ds01, ds02, cu, coff, scale,
                Hq, Hkv, G, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr, IEEE: tl.constexpr, SUB: tl.constexpr):
    hk, bos, eos, c0, nc, dk, dv, mk, mv, st, mst = walk_tile(cu, coff, Hkv, Dk, Dv, C, BK, BV)
    D1, D2 = load_state_pair(dsT1, dsT2, st, mst, HAS_DST, BK, BV)
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    rows = tl.arange(0, C)
    for cc in range(nc):
        c = nc - 1 - cc
        hoff = (((c0 + c) * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
        tl.store(dS1 + hoff, D1.to(dS1.dtype.element_ty), mask=mst)
        tl.store(dS2 + hoff, D2.to(dS2.dtype.element_ty), mask=mst)
        t0 = bos + c * C
        t = t0 + rows
        mt = t < eos
        e1, tot1 = decay_from_start(load_rows(b1, t, mt, Hkv, hk, Dk, dk, mk), b1, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
        e2, tot2 = decay_from_start(load_rows(b2, t, mt, Hkv, hk, Dk, dk, mk), b2, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
        acc1 = tl.zeros([BK, BV], dtype=tl.float32)
        acc2 = tl.zeros([BK, BV], dtype=tl.float32)
        for gi in range(G):
            hq = hk * G + gi
            qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk)
            dd = (load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale).to(qq.dtype)
            acc1 += mm(tl.trans((qq * e1).to(qq.dtype)), dd, IEEE)
            acc2 += mm(tl.trans((qq * e2).to(qq.dtype)), dd, IEEE)
        D1 = D1 * tot1[:, None] + w0 * acc1
        D2 = D2 * tot2[:, None] + w1 * acc2
    tl.store(ds01 + st, D1, mask=mst)
    tl.store(ds02 + st, D2, mask=mst)


@triton.jit
def _inter_bwd(x, st1, st2, b1, b2, X1, X2, cu, cseq, coff, scale, Hx, Hkv, G: tl.constexpr,
               Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, BVH: tl.constexpr, FROM_START: tl.constexpr, PRECISE: tl.constexpr,
               IEEE: tl.constexpr):
    """Per (chunk, head hx of x, Dk block): X_i = scale * decay * (x S_i^T) for both states, x a [C, Dv]
    row tile (dO or v), S_i the chunk's [Dk, Dv] state (h_i or dS_i) of hx's kv head. decay is
    exp(b) (FROM_START: the query side) or exp(b_last - b) (the key side), from the block cumsums.
    PRECISE: a near-fp32 product, for the key side: k.dk from the final state cancels against
    the gate gradient's final-state term (dS_T . S_T), computed in fp32."""
    ic = tl.program_id(0)
    hx = tl.program_id(1)
    ik = tl.program_id(2)
    hk = hx // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = ik * BK + tl.arange(0, BK)
    mk = dk < Dk
    srow = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv
    a1 = tl.zeros([C, BK], dtype=tl.float32)
    a2 = tl.zeros([C, BK], dtype=tl.float32)
    for iv in tl.static_range(0, BV, BVH):
        dvh = iv + tl.arange(0, BVH)
        mvh = dvh < Dv
        ms = mk[:, None] & mvh[None, :]
        xx = load_rows(x, t, mt, Hx, hx, Dv, dvh, mvh).to(tl.float32)
        s1 = tl.trans(tl.load(st1 + srow + dvh[None, :], mask=ms, other=0.))
        s2 = tl.trans(tl.load(st2 + srow + dvh[None, :], mask=ms, other=0.))
        if PRECISE:
            a1 += mm_precise(xx, s1, IEEE)
            a2 += mm_precise(xx, s2, IEEE)
        else:
            a1 += mm(xx, s1, IEEE)
            a2 += mm(xx, s2, IEEE)
    bt1 = load_rows(b1, t, mt, Hkv, hk, Dk, dk, mk)
    bt2 = load_rows(b2, t, mt, Hkv, hk, Dk, dk, mk)
    if FROM_START:
        e1, _ = decay_from_start(bt1, b1, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
        e2, _ = decay_from_start(bt2, b2, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
        a1 = a1 * e1
        a2 = a2 * e2
    else:
        a1, _ = decay_to_end(a1, bt1, b1, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
        a2, _ = decay_to_end(a2, bt2, b2, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    out = (t[:, None] * Hx + hx).to(tl.int64) * Dk + dk[None, :]
    m_out = mt[:, None] & mk[None, :]
    tl.store(X1 + out, a1 * scale, mask=m_out)
    tl.store(X2 + out, a2 * scale, mask=m_out)


@triton.jit
def dq_diag_exact(dPm, kI, gI, SUB: tl.constexpr):
    """sum_{s<t} dPm[t,s] k_s exp(sum_{u in (s, t]} g_u) inside one block, key column by key
    column: for a block that decays by more than RANGE_MAX, where a factored exp(-b) could
    overflow. dPm is zero for s >= t."""
    sr = tl.arange(0, SUB)
    out = tl.zeros_like(gI)
    for j in range(SUB):  # rows t <= j have dPm = 0: their exp(0) = 1 is harmless
        ps = tl.sum(tl.where((sr == j)[None, :], dPm, 0.), axis=1)
        out += ps[:, None] * row_of(kI, j, SUB)[None, :] * tl.exp(from_row(gI, j + 1, SUB))
    return out


@triton.jit
def block_cols(cu, cseq, coff, w, ic, ik, Dk: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr):
    """What a per-block backward program (dq, dk) starts from: global chunk ic's first token and
    its sequence's end, the within-block row index, Dk block ik's columns (and their mask), and
    both mixing weights."""
    t0, eos, _, _ = chunk_tile(cu, cseq, coff, ic, C)
    sr = tl.arange(0, SUB)
    dk = ik * BK + tl.arange(0, BK)
    mk = dk < Dk
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    return t0, eos, sr, dk, mk, w0, w1


@triton.jit
def _dA_bwd(do, v, dA, dpd, cu, cseq, coff, scale, Hq, Hkv, G: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
            BV: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, query head): dP = scale dO v^T over the chunk's pairs s < t (zeros elsewhere)
    into dA [total_T, Hq, C] (fp32), and its diagonal dpd_t = scale dO_t . v_t into [total_T, Hq].
    Once here instead of in every dq and dk program: those split Dk, so each recomputed the whole
    Dv product of every block pair (4x over at Dk block 32) and held a [16, Dv] dO tile."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    acc = tl.zeros([C, C], dtype=tl.float32)
    for iv in tl.static_range(0, Dv, BV):
        dv = iv + tl.arange(0, BV)
        mv = dv < Dv
        acc += mm(load_rows(do, t, mt, Hq, hq, Dv, dv, mv), tl.trans(load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)), IEEE)
    acc = acc * scale
    rows = tl.arange(0, C)
    tl.store(dpd + t * Hq + hq, tl.sum(tl.where(rows[:, None] == rows[None, :], acc, 0.), axis=1), mask=mt)
    tl.store(dA + (t[:, None] * Hq + hq).to(tl.int64) * C + rows[None, :],
             tl.where(rows[:, None] > rows[None, :], acc, 0.), mask=mt[:, None])


@triton.jit
def _dq_bwd(q, k, g1, g2, b1, b2, w, dA, dpdp, dq, dBq1, dBq2, dwp, cu, cseq, coff,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, query head, query block I, Dk block): dq of the block's rows, the query half
    of both gate gradients, and dw's per-program sums. dBq1, dBq2 hold `_inter_bwd`'s inter-chunk
    terms on entry (each program reads its rows before it overwrites them).

    Key blocks J < I are visited from I-1 down to 0 carrying mid_i = the log decay of the
    blocks strictly between J and I, so that for t in I, s in J
        exp(b_t - b_s) = exp(bI_t) exp(rest_J,s + mid_i)
    (bI: within-block inclusive cumsum, rest_J: decay from a key row to its block's end): the
    walk accumulates dP_IJ (k_J exp(rest_J + mid)) with exponents <= 0 and the block's rows take
    exp(bI) once at the end. The diagonal block starts the sum with dP_II (k_I exp(-bI)) when
    it decays by at most RANGE_MAX, else takes the exact form after."""
    pid = tl.program_id(0)
    hq = tl.program_id(1)
    ik = tl.program_id(2)
    hk = hq // G
    ic = pid // (C // SUB)
    I = C // SUB - 1 - pid % (C // SUB)  # the longest walks start first
    t0, eos, sr, dk, mk, w0, w1 = block_cols(cu, cseq, coff, w, ic, ik, Dk, C, SUB, BK)
    tI = t0 + I * SUB + sr
    mI = tI < eos
    # dP from `_dA_bwd`: pairs s < t only; the diagonal s = t stays out of dq~ (it cancels in the
    # gate gradient)
    arow = (tI[:, None] * Hq + hq).to(tl.int64) * C + sr[None, :]
    dPm = tl.load(dA + arow + I * SUB, mask=mI[:, None], other=0.)
    kI = load_rows(k, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
    bI1 = load_rows(b1, tI, mI, Hkv, hk, Dk, dk, mk)
    bI2 = load_rows(b2, tI, mI, Hkv, hk, Dk, dk, mk)
    fast1 = tl.max(-block_end_total(b1, I, t0, eos, Hkv, hk, Dk, dk, mk, SUB), axis=0) <= RANGE_MAX
    fast2 = tl.max(-block_end_total(b2, I, t0, eos, Hkv, hk, Dk, dk, mk, SUB), axis=0) <= RANGE_MAX
    acc1 = mm(tl.where(fast1, dPm, 0.), kI * tl.exp(tl.minimum(-bI1, RANGE_MAX)), IEEE)
    acc2 = mm(tl.where(fast2, dPm, 0.), kI * tl.exp(tl.minimum(-bI2, RANGE_MAX)), IEEE)
    mid1 = tl.zeros([BK], dtype=tl.float32)
    mid2 = tl.zeros([BK], dtype=tl.float32)
    # a block past the sequence's end stores zeros: it skips the walk
    for jj in range(0, tl.where(t0 + I * SUB < eos, I, 0)):
        J = I - 1 - jj
        tJ = t0 + J * SUB + sr
        mJ = tJ < eos
        kJ = load_rows(k, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
        dP = tl.load(dA + arow + J * SUB, mask=mI[:, None], other=0.)
        tot = block_end_total(b1, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
        acc1 += mm(dP, kJ * tl.exp(tot[None, :] - load_rows(b1, tJ, mJ, Hkv, hk, Dk, dk, mk) + mid1[None, :]), IEEE)
        mid1 += tot
        tot = block_end_total(b2, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
        acc2 += mm(dP, kJ * tl.exp(tot[None, :] - load_rows(b2, tJ, mJ, Hkv, hk, Dk, dk, mk) + mid2[None, :]), IEEE)
        mid2 += tot
    out = (tI[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :]
    m_out = mI[:, None] & mk[None, :]
    qI = load_rows(q, tI, mI, Hq, hq, Dk, dk, mk).to(tl.float32)
    dpd = tl.load(dpdp + tI * Hq + hq, mask=mI, other=0.)
    qk_diag = tl.sum(dpd * tl.sum(qI * kI, axis=1), axis=0)
    dq1 = tl.exp(bI1) * acc1 + tl.load(dBq1 + out, mask=m_out, other=0.)
    if not fast1:
        dq1 += dq_diag_exact(dPm, kI, load_rows(g1, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32), SUB)
    dq2 = tl.exp(bI2) * acc2 + tl.load(dBq2 + out, mask=m_out, other=0.)
    if not fast2:
        dq2 += dq_diag_exact(dPm, kI, load_rows(g2, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32), SUB)
    tl.store(dBq1 + out, w0 * qI * dq1, mask=m_out)
    tl.store(dBq2 + out, w1 * qI * dq2, mask=m_out)
    wp = dwp + ((pid * Hq + hq) * tl.num_programs(2) + ik) * 2
    tl.store(wp, tl.sum(tl.sum(qI * dq1, axis=1), axis=0) + qk_diag)
    tl.store(wp + 1, tl.sum(tl.sum(qI * dq2, axis=1), axis=0) + qk_diag)
    dq_tot = w0 * dq1 + w1 * dq2 + (w0 + w1) * dpd[:, None] * kI
    tl.store(dq + out, dq_tot.to(dq.dtype.element_ty), mask=m_out)


@triton.jit
def _dv_bwd(k, b1, b2, A, dS1, dS2, do, dv_out, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr, SUB: tl.constexpr):
    """Per (chunk, kv head, Dv block): dv = sum_group A^T dO' + sum_i (k exp(b_last - b_i)) dS_i."""
    ic = tl.program_id(0)
    hk = tl.program_id(1)
    iv = tl.program_id(2)
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk, dv, mk, mv, mst, hoff = chunk_state_tile(ic, hk, iv, Hkv, Dk, Dv, BK, BV)
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    kd, _ = decay_to_end(kk, load_rows(b1, t, mt, Hkv, hk, Dk, dk, mk), b1, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    acc = mm(kd.to(kk.dtype), tl.load(dS1 + hoff, mask=mst, other=0.).to(kk.dtype), IEEE)
    kd, _ = decay_to_end(kk, load_rows(b2, t, mt, Hkv, hk, Dk, dk, mk), b2, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    acc += mm(kd.to(kk.dtype), tl.load(dS2 + hoff, mask=mst, other=0.).to(kk.dtype), IEEE)
    cols = tl.arange(0, C)
    for gi in range(G):
        hq = hk * G + gi
        Am = tl.load(A + (t[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], mask=mt[:, None], other=0.)
        dd = (load_rows(do, t, mt, Hq, hq, Dv, dv, mv).to(tl.float32) * scale).to(kk.dtype)
        acc += mm(tl.trans(Am.to(kk.dtype)), dd, IEEE)
    tl.store(dv_out + (t[:, None] * Hkv + hk).to(tl.int64) * Dv + dv[None, :], acc.to(dv_out.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


@triton.jit
def dk_diag_state(dPt, qJ, b, fast, wi, g_ptr, goff, gmask, SUB: tl.constexpr, RANGE_MAX: tl.constexpr,
                  IEEE: tl.constexpr):
    """One state's dk_i from the diagonal block (b: its within-block cumsums): the block form when
    the block decays by at most RANGE_MAX, the exact row-by-row form (from the log decays at
    g_ptr + goff) otherwise."""
    d = wi * tl.exp(tl.minimum(-b, RANGE_MAX)) * mm(tl.where(fast, dPt, 0.), qJ * tl.exp(b), IEEE)
    if not fast:
        d += wi * dk_diag_exact(dPt, qJ, tl.load(g_ptr + goff, mask=gmask, other=0.).to(tl.float32), SUB)
    return d


@triton.jit
def dk_diag_exact(dPt, qJ, gJ, SUB: tl.constexpr):
    """sum_{t>s} dPt[s,t] q_t exp(sum_{u in (s, t]} g_u) inside one block, query row by query
    row: for a block that decays by more than RANGE_MAX. dPt (= dP^T) is zero for t <= s."""
    sr = tl.arange(0, SUB)
    out = tl.zeros_like(gJ)
    for i in range(SUB):  # rows s >= i have dPt = 0
        gm = tl.where((sr <= i)[:, None], gJ, 0.)
        pt = tl.sum(tl.where((sr == i)[None, :], dPt, 0.), axis=1)
        out += pt[:, None] * row_of(qJ, i, SUB)[None, :] * tl.exp(tl.cumsum(gm, axis=0, reverse=True) - gm)
    return out


@triton.jit
def _dk_bwd(q, k, g1, g2, b1, b2, w, dA, dpdp, dBq1, dBq2, dk_out, dgl1, dgl2, tot1, tot2, cu, cseq, coff,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, kv head, key block J, Dk block): dk of the block's rows (both states, the
    whole query group) and the gate gradients' block-local parts: dB_i and the block's total
    (`_dg_finish` reverse-cumsums dB_i inside the block and adds the later blocks' totals; reads
    dBq from `_dq_bwd`). dgl1, dgl2 hold `_inter_bwd`'s inter-chunk terms on entry (each program
    reads its rows before it overwrites them).

    Query blocks I > J are visited in order carrying mid_i = the log decay of the blocks
    strictly between J and I, so that for s in J, t in I
        exp(b_t - b_s) = exp(rest_J,s) exp(bI_t + mid_i)
    and the walk accumulates dP_IJ^T (q_I exp(bI + mid)) with exponents <= 0; the block's rows
    take exp(rest_J) once at the end. The diagonal block is exp(-bJ) dP_JJ^T (q_J exp(bJ))
    when it decays by at most RANGE_MAX, else exact."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    ik = tl.program_id(2)
    ic = pid // (C // SUB)
    J = pid % (C // SUB)  # the longest walks start first
    t0, eos, sr, dk, mk, w0, w1 = block_cols(cu, cseq, coff, w, ic, ik, Dk, C, SUB, BK)
    tJ = t0 + J * SUB + sr
    mJ = tJ < eos
    mJK = mJ[:, None] & mk[None, :]
    kJ = load_rows(k, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
    goff = (tJ[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :]
    bJ1 = tl.load(b1 + goff, mask=mJK, other=0.)
    bJ2 = tl.load(b2 + goff, mask=mJK, other=0.)
    totJ1 = block_end_total(b1, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
    totJ2 = block_end_total(b2, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
    fast1 = tl.max(-totJ1, axis=0) <= RANGE_MAX
    fast2 = tl.max(-totJ2, axis=0) <= RANGE_MAX
    # the diagonal block, the diagonal pairs s = t (they stay out of dk_i: they cancel in the
    # gate gradient) and the group's dBq; dk_i's diagonal part goes straight into dk and dB_i
    dk_tot = tl.zeros([SUB, BK], dtype=tl.float32)
    dB1 = tl.zeros([SUB, BK], dtype=tl.float32)
    dB2 = tl.zeros([SUB, BK], dtype=tl.float32)
    for gi in range(G):
        hq = hk * G + gi
        qoff = (tJ[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :]
        qJ = tl.load(q + qoff, mask=mJK, other=0.).to(tl.float32)
        dk_tot += (w0 + w1) * tl.load(dpdp + tJ * Hq + hq, mask=mJ, other=0.)[:, None] * qJ
        # dP^T [s, t] of the diagonal block from `_dA_bwd` (zero for t <= s)
        dPt = tl.trans(tl.load(dA + (tJ[:, None] * Hq + hq).to(tl.int64) * C + J * SUB + sr[None, :],
                               mask=mJ[:, None], other=0.))
        d = dk_diag_state(dPt, qJ, bJ1, fast1, w0, g1, goff, mJK, SUB, RANGE_MAX, IEEE)
        dk_tot += d
        dB1 += tl.load(dBq1 + qoff, mask=mJK, other=0.) - kJ * d
        d = dk_diag_state(dPt, qJ, bJ2, fast2, w1, g2, goff, mJK, SUB, RANGE_MAX, IEEE)
        dk_tot += d
        dB2 += tl.load(dBq2 + qoff, mask=mJK, other=0.) - kJ * d
    acc1 = tl.zeros([SUB, BK], dtype=tl.float32)
    acc2 = tl.zeros([SUB, BK], dtype=tl.float32)
    mid1 = tl.zeros([BK], dtype=tl.float32)
    mid2 = tl.zeros([BK], dtype=tl.float32)
    # blocks past the sequence's end add nothing (their b and q read 0)
    for I in range(J + 1, tl.minimum(tl.cdiv(eos - t0, SUB), C // SUB).to(tl.int32)):
        tI = t0 + I * SUB + sr
        mI = tI < eos
        e1 = tl.exp(load_rows(b1, tI, mI, Hkv, hk, Dk, dk, mk) + mid1[None, :])
        mid1 += block_end_total(b1, I, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
        e2 = tl.exp(load_rows(b2, tI, mI, Hkv, hk, Dk, dk, mk) + mid2[None, :])
        mid2 += block_end_total(b2, I, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
        for gi in range(G):
            hq = hk * G + gi
            qI = load_rows(q, tI, mI, Hq, hq, Dk, dk, mk).to(tl.float32)
            dPt = tl.trans(tl.load(dA + (tI[:, None] * Hq + hq).to(tl.int64) * C + J * SUB + sr[None, :],
                                   mask=mI[:, None], other=0.))  # [s, t]
            acc1 += mm(dPt, qI * e1, IEEE)
            acc2 += mm(dPt, qI * e2, IEEE)
    toff = (pid * Hkv + hk).to(tl.int64) * Dk + dk
    out = goff
    d = tl.exp(totJ1[None, :] - bJ1) * (w0 * acc1) + tl.load(dgl1 + out, mask=mJK, other=0.)
    dk_tot += d
    dB1 -= kJ * d
    tl.store(dgl1 + out, dB1, mask=mJK)
    tl.store(tot1 + toff, tl.sum(dB1, axis=0), mask=mk)
    d = tl.exp(totJ2[None, :] - bJ2) * (w1 * acc2) + tl.load(dgl2 + out, mask=mJK, other=0.)
    dk_tot += d
    dB2 -= kJ * d
    tl.store(dgl2 + out, dB2, mask=mJK)
    tl.store(tot2 + toff, tl.sum(dB2, axis=0), mask=mk)
    tl.store(dk_out + out, dk_tot.to(dk_out.dtype.element_ty), mask=mJK)


@triton.jit
def _dg_suffix(tot, fin, suf, coff, Hkv, Dk: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr, TB: tl.constexpr,
               HAS_FIN: tl.constexpr):
    """Per (sequence, kv head): for every 16-row block, the sum of the totals of the sequence's later
    blocks (tot, suf: [blocks, Hkv, Dk]) plus the final state's term fin [sequences, Hkv, Dk], walked
    from the sequence's end TB blocks at a time with a running sum: direct sums, so fp32 holds them
    (a difference of two whole-sequence suffix sums needed fp64)."""
    n = tl.program_id(0)
    hk = tl.program_id(1)
    b0 = tl.load(coff + n).to(tl.int64) * NB
    b1 = tl.load(coff + n + 1).to(tl.int64) * NB
    dk = tl.arange(0, BK)
    mk = dk < Dk
    if HAS_FIN:
        carry = tl.load(fin + (n * Hkv + hk).to(tl.int64) * Dk + dk, mask=mk, other=0.)
    else:
        carry = tl.zeros([BK], dtype=tl.float32)
    rows = tl.arange(0, TB)
    for it in range(tl.cdiv(b1 - b0, TB)):
        end = b1 - it * TB
        i = end - TB + rows
        m = (i >= b0)[:, None] & mk[None, :]
        off = (i[:, None] * Hkv + hk) * Dk + dk[None, :]
        # each row's exclusive sum from its successor's total: no "inclusive minus own" difference
        nxt = tl.load(tot + off + Hkv * Dk, mask=m & (i + 1 < end)[:, None], other=0.)
        tl.store(suf + off, tl.cumsum(nxt, axis=0, reverse=True) + carry[None, :], mask=m)
        carry += tl.sum(tl.load(tot + off, mask=m, other=0.), axis=0)


@triton.jit
def _dg_finish(dgl, suf, dg, cu, cseq, coff, Hkv, Dk: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
               BK: tl.constexpr):
    """dg = the reverse cumsum of dB inside each block + the later blocks' totals of the same sequence
    (the scans are here, not in `_dk_bwd`, where they sat on each program's critical path)."""
    ic, hk, t0, eos, dk, mk = chunk_head_cols(cu, cseq, coff, Dk, C, BK)
    for J in tl.static_range(C // SUB):
        t, mt = block_rows(t0, eos, J, SUB)
        x = tl.cumsum(load_rows(dgl, t, mt, Hkv, hk, Dk, dk, mk), axis=0, reverse=True)
        x += tl.load(suf + ((ic * (C // SUB) + J) * Hkv + hk).to(tl.int64) * Dk + dk, mask=mk, other=0.)[None, :]
        tl.store(dg + (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :], x.to(dg.dtype.element_ty),
                 mask=mt[:, None] & mk[None, :])
