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
  3. `_dq_bwd` per (chunk, query head, 16-row query block, Dk block):
         dq~_i = (dO' h_i^T) exp(b_i) + sum_{s<t} dP[t,s] k_s exp(b_t - b_s)     (unweighted)
         dq    = sum_i w_i dq~_i + (w_0 + w_1) dpd k,   dpd_t = dO'_t . v_t (the diagonal)
     and writes dBq_i = w_i q dq~_i (the query half of the gate gradient) and per-program dw sums.
  4. `_dv_bwd` per (chunk, kv head): dv = sum_group A^T dO' + sum_i (k exp(b_last - b_i)) dS_i,
     with A the mixed scores the forward stored.
  5. `_dk_bwd` per (chunk, kv head, 16-row key block, Dk block):
         dk_i = w_i sum_{t>s} dP[t,s] q_t exp(b_t - b_s) + (v dS_i^T) exp(b_last - b_i)
         dk   = sum_i dk_i + (w_0 + w_1) sum_group dpd q
     and the gate gradient's block-local part: dB_i = sum_group dBq_i - k dk_i, reverse-cumsummed
     inside the block, plus each block's total; `_dg_suffix` sums the later blocks' totals of the
     sequence (and the final state's term) and `_dg_finish` adds them.
The diagonal pairs s = t cancel in the gate gradient, so they stay out of dq~ and dk_i.
Every output column depends only on the same column of k, q and g (dP does not depend on Dk),
so dq and dk also split Dk across programs, which keeps their tiles small.
The intra-chunk sums use the forward's block walk (triton_chunk_fwd.py): a program
owns one block and walks the other blocks carrying the decay of the blocks strictly between,
so every exponent is a direct sum of log decays <= 0 and only 16-row scans are needed; the
diagonal block factors exp(b) when it decays by at most RANGE_MAX, else takes an exact form.

Product order: Triton (warpsPerTileV2, mma v2) gives every tensor-core product of a region
the warp layout of the one it lays out first, the last in program order. A [16, 16] product
(dP) laid out first puts all warps on its 16 rows, which makes the [16, Dk] products of the
region run replicated in every warp with the whole right operand in each (255 registers and
heavy spills, measured with ptxas). So each region ends with a [16, Dk] product.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import (chunk_state_tile, chunk_tile, decay_from_start, decay_to_end, from_row,
                                     load_rows, load_state_pair, mm, mm_precise, row_of, to_end, walk_tile)


@triton.jit
def _states_bwd(q, g1, g2, w, do, dsT1, dsT2, dS1, dS2, ds01, ds02, cu, coff, scale,
                Hq, Hkv, G, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr, IEEE: tl.constexpr):
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
def block_cols(cu, cseq, coff, w, ic, ik, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
               SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """What a per-block backward program (dq, dk) starts from: global chunk ic's first token and
    its sequence's end, the within-block row index, Dk block ik's columns, all Dv columns (and
    their masks), and both mixing weights."""
    t0, eos, _, _ = chunk_tile(cu, cseq, coff, ic, C)
    sr = tl.arange(0, SUB)
    dk = ik * BK + tl.arange(0, BK)
    dv = tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    return t0, eos, sr, dk, dv, mk, mv, w0, w1


@triton.jit
def _dq_bwd(q, k, v, g1, g2, w, do, dq, dBq1, dBq2, dwp, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
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
    t0, eos, sr, dk, dv, mk, mv, w0, w1 = block_cols(cu, cseq, coff, w, ic, ik, Dk, Dv, C, SUB, BK, BV)
    tI = t0 + I * SUB + sr
    mI = tI < eos
    # dP = dO' v^T from the inputs' own dtype (exact bf16 products, fp32 sums), scaled after;
    # pairs s < t only: the diagonal s = t stays out of dq~ (it cancels in the gate gradient)
    dd = load_rows(do, tI, mI, Hq, hq, Dv, dv, mv)
    dPm = tl.where(sr[:, None] > sr[None, :], mm(dd, tl.trans(load_rows(v, tI, mI, Hkv, hk, Dv, dv, mv)), IEEE), 0.)
    dPm = dPm * scale
    kI = load_rows(k, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
    gI = load_rows(g1, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
    fast1 = tl.max(-tl.sum(gI, axis=0), axis=0) <= RANGE_MAX
    acc1 = mm(tl.where(fast1, dPm, 0.), kI * tl.exp(tl.minimum(-tl.cumsum(gI, axis=0), RANGE_MAX)), IEEE)
    gI = load_rows(g2, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
    fast2 = tl.max(-tl.sum(gI, axis=0), axis=0) <= RANGE_MAX
    acc2 = mm(tl.where(fast2, dPm, 0.), kI * tl.exp(tl.minimum(-tl.cumsum(gI, axis=0), RANGE_MAX)), IEEE)
    mid1 = tl.zeros([BK], dtype=tl.float32)
    mid2 = tl.zeros([BK], dtype=tl.float32)
    # a block past the sequence's end stores zeros: it skips the walk
    for jj in range(0, tl.where(t0 + I * SUB < eos, I, 0)):
        J = I - 1 - jj
        tJ = t0 + J * SUB + sr
        mJ = tJ < eos
        kJ = load_rows(k, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
        dP = mm(dd, tl.trans(load_rows(v, tJ, mJ, Hkv, hk, Dv, dv, mv)), IEEE) * scale
        gJ = load_rows(g1, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
        acc1 += mm(dP, kJ * tl.exp(tl.cumsum(gJ, axis=0, reverse=True) - gJ + mid1[None, :]), IEEE)
        mid1 += tl.sum(gJ, axis=0)
        gJ = load_rows(g2, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
        acc2 += mm(dP, kJ * tl.exp(tl.cumsum(gJ, axis=0, reverse=True) - gJ + mid2[None, :]), IEEE)
        mid2 += tl.sum(gJ, axis=0)
    out = (tI[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :]
    m_out = mI[:, None] & mk[None, :]
    qI = load_rows(q, tI, mI, Hq, hq, Dk, dk, mk).to(tl.float32)
    dpd = scale * tl.sum(dd.to(tl.float32) * load_rows(v, tI, mI, Hkv, hk, Dv, dv, mv).to(tl.float32), axis=1)
    qk_diag = tl.sum(dpd * tl.sum(qI * kI, axis=1), axis=0)
    gI = load_rows(g1, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
    dq1 = tl.exp(tl.cumsum(gI, axis=0)) * acc1 + tl.load(dBq1 + out, mask=m_out, other=0.)
    if not fast1:
        dq1 += dq_diag_exact(dPm, kI, gI, SUB)
    gI = load_rows(g2, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
    dq2 = tl.exp(tl.cumsum(gI, axis=0)) * acc2 + tl.load(dBq2 + out, mask=m_out, other=0.)
    if not fast2:
        dq2 += dq_diag_exact(dPm, kI, gI, SUB)
    tl.store(dBq1 + out, w0 * qI * dq1, mask=m_out)
    tl.store(dBq2 + out, w1 * qI * dq2, mask=m_out)
    wp = dwp + ((pid * Hq + hq) * tl.num_programs(2) + ik) * 2
    tl.store(wp, tl.sum(tl.sum(qI * dq1, axis=1), axis=0) + qk_diag)
    tl.store(wp + 1, tl.sum(tl.sum(qI * dq2, axis=1), axis=0) + qk_diag)
    dq_tot = w0 * dq1 + w1 * dq2 + (w0 + w1) * dpd[:, None] * kI
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
    dk, dv, mk, mv, mst, hoff = chunk_state_tile(ic, hk, iv, Hkv, Dk, Dv, BK, BV)
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
def dk_diag_state(dPt, qJ, gJ, fast, wi, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """One state's dk_i from the diagonal block: the block form when the block decays by at
    most RANGE_MAX, the exact row-by-row form otherwise."""
    b = tl.cumsum(gJ, axis=0)
    d = wi * tl.exp(tl.minimum(-b, RANGE_MAX)) * mm(tl.where(fast, dPt, 0.), qJ * tl.exp(b), IEEE)
    if not fast:
        d += wi * dk_diag_exact(dPt, qJ, gJ, SUB)
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
def _dk_bwd(q, k, v, g1, g2, w, do, dBq1, dBq2, dk_out, dgl1, dgl2, tot1, tot2, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, kv head, key block J, Dk block): dk of the block's rows (both states, the
    whole query group) and the gate gradients' block-local parts: the reverse cumsum of dB_i
    inside the block and the block's total (`_dg_finish` adds the later blocks'; reads dBq
    from `_dq_bwd`). dgl1, dgl2 hold `_inter_bwd`'s inter-chunk terms on entry (each program
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
    t0, eos, sr, dk, dv, mk, mv, w0, w1 = block_cols(cu, cseq, coff, w, ic, ik, Dk, Dv, C, SUB, BK, BV)
    tJ = t0 + J * SUB + sr
    mJ = tJ < eos
    mJK = mJ[:, None] & mk[None, :]
    vJ = load_rows(v, tJ, mJ, Hkv, hk, Dv, dv, mv)  # dP from the inputs' own dtype, scaled after
    kJ = load_rows(k, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
    gJ1 = load_rows(g1, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
    gJ2 = load_rows(g2, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
    fast1 = tl.max(-tl.sum(gJ1, axis=0), axis=0) <= RANGE_MAX
    fast2 = tl.max(-tl.sum(gJ2, axis=0), axis=0) <= RANGE_MAX
    # the diagonal block, the diagonal pairs s = t (they stay out of dk_i: they cancel in the
    # gate gradient) and the group's dBq; dk_i's diagonal part goes straight into dk and dB_i
    dk_tot = tl.zeros([SUB, BK], dtype=tl.float32)
    dB1 = tl.zeros([SUB, BK], dtype=tl.float32)
    dB2 = tl.zeros([SUB, BK], dtype=tl.float32)
    for gi in range(G):
        hq = hk * G + gi
        qoff = (tJ[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :]
        qJ = tl.load(q + qoff, mask=mJK, other=0.).to(tl.float32)
        dJ = load_rows(do, tJ, mJ, Hq, hq, Dv, dv, mv)
        dk_tot += (w0 + w1) * (scale * tl.sum(dJ.to(tl.float32) * vJ.to(tl.float32), axis=1))[:, None] * qJ
        dPt = tl.where(sr[:, None] < sr[None, :], mm(vJ, tl.trans(dJ), IEEE), 0.) * scale  # [s, t]
        d = dk_diag_state(dPt, qJ, gJ1, fast1, w0, SUB, RANGE_MAX, IEEE)
        dk_tot += d
        dB1 += tl.load(dBq1 + qoff, mask=mJK, other=0.) - kJ * d
        d = dk_diag_state(dPt, qJ, gJ2, fast2, w1, SUB, RANGE_MAX, IEEE)
        dk_tot += d
        dB2 += tl.load(dBq2 + qoff, mask=mJK, other=0.) - kJ * d
    acc1 = tl.zeros([SUB, BK], dtype=tl.float32)
    acc2 = tl.zeros([SUB, BK], dtype=tl.float32)
    mid1 = tl.zeros([BK], dtype=tl.float32)
    mid2 = tl.zeros([BK], dtype=tl.float32)
    # blocks past the sequence's end add nothing (their g reads 0, so neither does their decay)
    for I in range(J + 1, tl.minimum(tl.cdiv(eos - t0, SUB), C // SUB).to(tl.int32)):
        tI = t0 + I * SUB + sr
        mI = tI < eos
        gI = load_rows(g1, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
        e1 = tl.exp(tl.cumsum(gI, axis=0) + mid1[None, :])
        mid1 += tl.sum(gI, axis=0)
        gI = load_rows(g2, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
        e2 = tl.exp(tl.cumsum(gI, axis=0) + mid2[None, :])
        mid2 += tl.sum(gI, axis=0)
        for gi in range(G):
            hq = hk * G + gi
            qI = load_rows(q, tI, mI, Hq, hq, Dk, dk, mk).to(tl.float32)
            dPt = mm(vJ, tl.trans(load_rows(do, tI, mI, Hq, hq, Dv, dv, mv)), IEEE) * scale  # [s, t]
            acc1 += mm(dPt, qI * e1, IEEE)
            acc2 += mm(dPt, qI * e2, IEEE)
    toff = (pid * Hkv + hk).to(tl.int64) * Dk + dk
    out = (tJ[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :]
    d = tl.exp(tl.cumsum(gJ1, axis=0, reverse=True) - gJ1) * (w0 * acc1) + tl.load(dgl1 + out, mask=mJK, other=0.)
    dk_tot += d
    dB1 -= kJ * d
    tl.store(dgl1 + out, tl.cumsum(dB1, axis=0, reverse=True), mask=mJK)
    tl.store(tot1 + toff, tl.sum(dB1, axis=0), mask=mk)
    d = tl.exp(tl.cumsum(gJ2, axis=0, reverse=True) - gJ2) * (w1 * acc2) + tl.load(dgl2 + out, mask=mJK, other=0.)
    dk_tot += d
    dB2 -= kJ * d
    tl.store(dgl2 + out, tl.cumsum(dB2, axis=0, reverse=True), mask=mJK)
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
    """dg = block-local reverse cumsum + the later blocks' totals of the same sequence."""
    ic = tl.program_id(0)
    hk = tl.program_id(1)
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    mk = dk < Dk
    blk = ic * (C // SUB) + tl.arange(0, C) // SUB
    x = load_rows(dgl, t, mt, Hkv, hk, Dk, dk, mk)
    x += tl.load(suf + (blk[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :], mask=mk[None, :], other=0.)
    tl.store(dg + (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :], x.to(dg.dtype.element_ty),
             mask=mt[:, None] & mk[None, :])
