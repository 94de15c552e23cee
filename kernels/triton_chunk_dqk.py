"""Fused dual-state chunked prefill, backward: dP, dq and dk at whole-chunk tiles (Triton).

Notation per state i and Dk column: g = log decay, blocks of SUB rows inside a chunk of C,
bt = inclusive cumsum of g inside the row's block, T_K = total of block K, b = chunk-relative
cumsum (b_t = sum_{K < block(t)} T_K + bt_t), dP[t,s] = scale dO_t . v_s (stored for s <= t).

  1. `_dp_bwd` per (chunk, query head): dP, once, for both states and both of dq and dk.
  2. `_dq_bwd` per (chunk, query head, Dk block):
         dq~_i[t] = sum_{s<t} dP[t,s] k_s exp(b_t - b_s) + scale (dO_t h_i^T) exp(b_t)
         dq = sum_i w_i dq~_i + (w_0 + w_1) dP[t,t] k_t;  dBq_i = w_i q dq~_i;  dw sums.
  3. `_dk_bwd` per (chunk, kv head, Dk block), summing the query group:
         dk_i[s] = w_i sum_{t>s} dP[t,s] q_t exp(b_t - b_s) + (v_s dS_i^T) exp(b_last - b_s)
         dk = sum_i dk_i + (w_0 + w_1) dP[s,s] q_s;  the gate gradient's chunk-local reverse
         cumsum of dB_i = sum_group dBq_i - k dk_i, and the chunk's total.
The diagonal pairs s = t cancel in the gate gradient, so they stay out of dq~ and dk_i.

Every product is C rows tall (tensor cores at M = 64). Exponents are direct sums of log
decays (never a difference of two long cumsums): for s in block J and t in block I > J,
    exp(b_t - b_s) = exp(bt_t) * prod_{J<K<I} exp(T_K) * exp(T_J - bt_s),
every factor <= 1, so the pairs of key block J are one product dP[:, J] (k exp(T_J - bt))
scaled per row by exp(bt) and the between-blocks factor. Pairs inside one block use
exp(bt_t) exp(-bt_s), bounded by exp(RANGE_MAX) when no block decays by more than that;
otherwise (a recency gate of -5/step and below) they take an exact column-by-column form.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import chunk_tile, load_rows, mm, mm_precise


@triton.jit
def _seg_add(a, fa, b, fb):
    return tl.where(fb, b, a + b), fa | fb


@triton.jit
def block_cumsum(x, C: tl.constexpr, SUB: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive cumsum of a [C, D] tile restarted at every block of SUB rows (from the
    block's end with REVERSE): a segmented scan, so each value is a direct sum."""
    r = tl.arange(0, C) % SUB
    if REVERSE:
        edge = tl.broadcast_to((r == SUB - 1)[:, None], x.shape)
    else:
        edge = tl.broadcast_to((r == 0)[:, None], x.shape)
    s, _ = tl.associative_scan((x, edge), 0, _seg_add, reverse=REVERSE)
    return s


@triton.jit
def block_total(g, K, C: tl.constexpr, SUB: tl.constexpr):
    """T_K: the log decay of block K, per column."""
    return tl.sum(tl.where((tl.arange(0, C) // SUB == K)[:, None], g, 0.), axis=0)


@triton.jit
def later_blocks_decay(g, C: tl.constexpr, SUB: tl.constexpr):
    """exp(sum of T_K over the blocks after the row's block): [C, D], <= 1."""
    blk = tl.arange(0, C) // SUB
    f = tl.full(g.shape, 1., tl.float32)
    for K in tl.static_range(1, C // SUB):
        f = tl.where((blk < K)[:, None], f * tl.exp(block_total(g, K, C, SUB))[None, :], f)
    return f


@triton.jit
def load_dp(dP, t, mt, Hq, hq, C: tl.constexpr):
    r = tl.arange(0, C)
    return tl.load(dP + (t[:, None] * Hq + hq).to(tl.int64) * C + r[None, :], mask=mt[:, None], other=0.)


@triton.jit
def _dp_bwd(v, do, dP, cu, cseq, coff, scale, Hq, Hkv, G: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
            BV: tl.constexpr, IEEE: tl.constexpr):
    """dP = scale dO v^T of one chunk and query head for s <= t (zeros above the diagonal),
    from the inputs' own dtype (exact bf16 products, fp32 sums)."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    acc = tl.zeros([C, C], dtype=tl.float32)
    for iv in tl.static_range(0, Dv, BV):
        d = iv + tl.arange(0, BV)
        md = d < Dv
        acc += mm(load_rows(do, t, mt, Hq, hq, Dv, d, md), tl.trans(load_rows(v, t, mt, Hkv, hk, Dv, d, md)), IEEE)
    r = tl.arange(0, C)
    tl.store(dP + (t[:, None] * Hq + hq).to(tl.int64) * C + r[None, :],
             tl.where(r[:, None] >= r[None, :], acc * scale, 0.), mask=mt[:, None])


@triton.jit
def dq_state(P, Pd, kk, g, x, k, t0, eos, Hkv, hk, Dk: tl.constexpr, dk, mk,
             C: tl.constexpr, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """dq~_i of the chunk's rows for one state; x = scale dO h_i^T (the inter-chunk part)."""
    blk = tl.arange(0, C) // SUB
    bt = block_cumsum(g, C, SUB, False)
    fast = tl.max(tl.max(-bt, axis=1), axis=0) <= RANGE_MAX
    acc = mm(tl.where(fast, Pd, 0.), kk * tl.exp(tl.minimum(-bt, RANGE_MAX)), IEEE)
    kR = kk * tl.exp(block_cumsum(g, C, SUB, True) - g)  # k_s exp(T_J - bt_s)
    F = tl.zeros_like(g)
    for jj in tl.static_range(C // SUB - 1):  # key block J; F: the decay of the blocks between
        J = C // SUB - 2 - jj
        F = tl.where((blk > J + 1)[:, None], F * tl.exp(block_total(g, J + 1, C, SUB))[None, :],
                     tl.where((blk == J + 1)[:, None], 1., 0.))
        acc += F * mm(tl.where((blk == J)[None, :], P, 0.), kR, IEEE)
    F = tl.where((blk > 0)[:, None], F * tl.exp(block_total(g, 0, C, SUB))[None, :], 1.)  # exp(b_t - bt_t)
    out = tl.exp(bt) * (acc + F * x)
    if not fast:
        out += dq_diag_exact(Pd, k, t0, eos, Hkv, hk, Dk, dk, mk, g, C, SUB)
    return out


@triton.jit
def dq_diag_exact(Pd, k, t0, eos, Hkv, hk, Dk: tl.constexpr, dk, mk, g, C: tl.constexpr, SUB: tl.constexpr):
    """sum over s < t in t's block of dP[t,s] k_s exp(sum_{u in (s, t]} g_u), key offset by key
    offset: for chunks with a block that decays by more than RANGE_MAX."""
    r = tl.arange(0, C)
    out = tl.zeros_like(g)
    for j in range(SUB):
        s = (r // SUB) * SUB + j  # the key of offset j in each row's block
        ps = tl.sum(tl.where(r[None, :] == s[:, None], Pd, 0.), axis=1)  # 0 unless s < t
        ks = load_rows(k, t0 + s, t0 + s < eos, Hkv, hk, Dk, dk, mk).to(tl.float32)
        e = block_cumsum(tl.where((r % SUB > j)[:, None], g, 0.), C, SUB, False)  # 0 for t <= s
        out += ps[:, None] * ks * tl.exp(e)
    return out


@triton.jit
def _dq_bwd(q, k, g1, g2, w, h1, h2, do, dP, dq, dBq1, dBq2, dwp, cu, cseq, coff, scale,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVH: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, query head, Dk block): dq, the query half of both gate gradients (dBq_i)
    and dw's per-program sums. h is read BVH columns of Dv at a time."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    ik = tl.program_id(2)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = ik * BK + tl.arange(0, BK)
    mk = dk < Dk
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    x1 = tl.zeros([C, BK], dtype=tl.float32)
    x2 = tl.zeros([C, BK], dtype=tl.float32)
    hrow = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv
    for iv in tl.static_range(0, BV, BVH):
        dvh = iv + tl.arange(0, BVH)
        mvh = dvh < Dv
        mh = mk[:, None] & mvh[None, :]
        ddh = load_rows(do, t, mt, Hq, hq, Dv, dvh, mvh).to(tl.float32)
        x1 += mm(ddh, tl.trans(tl.load(h1 + hrow + dvh[None, :], mask=mh, other=0.)), IEEE)
        x2 += mm(ddh, tl.trans(tl.load(h2 + hrow + dvh[None, :], mask=mh, other=0.)), IEEE)
    P = load_dp(dP, t, mt, Hq, hq, C)
    r = tl.arange(0, C)
    dpd = tl.load(dP + (t * Hq + hq).to(tl.int64) * C + r, mask=mt, other=0.)
    Pd = tl.where((r[:, None] // SUB == r[None, :] // SUB) & (r[:, None] > r[None, :]), P, 0.)
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk).to(tl.float32)
    g = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    dq1 = dq_state(P, Pd, kk, g, x1 * scale, k, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
    g = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    dq2 = dq_state(P, Pd, kk, g, x2 * scale, k, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
    out = (t[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :]
    m_out = mt[:, None] & mk[None, :]
    tl.store(dBq1 + out, w0 * qq * dq1, mask=m_out)
    tl.store(dBq2 + out, w1 * qq * dq2, mask=m_out)
    qk_diag = tl.sum(dpd * tl.sum(qq * kk, axis=1), axis=0)
    wp = dwp + ((ic * Hq + hq) * tl.num_programs(2) + ik) * 2
    tl.store(wp, tl.sum(tl.sum(qq * dq1, axis=1), axis=0) + qk_diag)
    tl.store(wp + 1, tl.sum(tl.sum(qq * dq2, axis=1), axis=0) + qk_diag)
    dq_tot = w0 * dq1 + w1 * dq2 + (w0 + w1) * dpd[:, None] * kk
    tl.store(dq + out, dq_tot.to(dq.dtype.element_ty), mask=m_out)


@triton.jit
def dk_state(PT, qq, g, q, t0, eos, Hq, hq, Dk: tl.constexpr, dk, mk,
             C: tl.constexpr, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """sum_{t>s} dP[t,s] q_t exp(b_t - b_s) of the chunk's key rows for one state and query
    head; PT = dP^T [s, t]."""
    r = tl.arange(0, C)
    blk = r // SUB
    bt = block_cumsum(g, C, SUB, False)
    fast = tl.max(tl.max(-bt, axis=1), axis=0) <= RANGE_MAX
    QR = qq * tl.exp(bt)
    PdT = tl.where((blk[:, None] == blk[None, :]) & (r[:, None] < r[None, :]), PT, 0.)
    out = tl.exp(tl.minimum(-bt, RANGE_MAX)) * mm(tl.where(fast, PdT, 0.), QR, IEEE)
    F = tl.zeros_like(g)
    off = tl.zeros_like(g)
    for I in tl.static_range(1, C // SUB):  # query block I; F: the decay of the blocks between
        F = tl.where((blk < I - 1)[:, None], F * tl.exp(block_total(g, I - 1, C, SUB))[None, :],
                     tl.where((blk == I - 1)[:, None], 1., 0.))
        off += F * mm(tl.where((blk == I)[None, :], PT, 0.), QR, IEEE)
    out += tl.exp(block_cumsum(g, C, SUB, True) - g) * off
    if not fast:
        out += dk_diag_exact(PdT, q, t0, eos, Hq, hq, Dk, dk, mk, g, C, SUB)
    return out


@triton.jit
def dk_group(q, dP, dBq, g, Hq, hk, G: tl.constexpr, t0, eos, t, mt, Dk: tl.constexpr, dk, mk,
             C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """One state, summed over the query group: the intra-chunk dk (unweighted) and dBq."""
    m_out = mt[:, None] & mk[None, :]
    acc = tl.zeros([C, BK], dtype=tl.float32)
    dB = tl.zeros([C, BK], dtype=tl.float32)
    for gi in range(G):
        hq = hk * G + gi
        qoff = (t[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :]
        qq = tl.load(q + qoff, mask=m_out, other=0.).to(tl.float32)
        acc += dk_state(tl.trans(load_dp(dP, t, mt, Hq, hq, C)), qq, g, q, t0, eos, Hq, hq, Dk, dk, mk,
                        C, SUB, RANGE_MAX, IEEE)
        dB += tl.load(dBq + qoff, mask=m_out, other=0.)
    return acc, dB


@triton.jit
def dk_diag_exact(PdT, q, t0, eos, Hq, hq, Dk: tl.constexpr, dk, mk, g, C: tl.constexpr, SUB: tl.constexpr):
    """sum over t > s in s's block of dP[t,s] q_t exp(sum_{u in (s, t]} g_u), query offset by
    query offset: for chunks with a block that decays by more than RANGE_MAX."""
    r = tl.arange(0, C)
    out = tl.zeros_like(g)
    for i in range(SUB):
        t = (r // SUB) * SUB + i  # the query of offset i in each row's block
        pt = tl.sum(tl.where(r[None, :] == t[:, None], PdT, 0.), axis=1)  # dP[t, s]: 0 unless s < t
        qt = load_rows(q, t0 + t, t0 + t < eos, Hq, hq, Dk, dk, mk).to(tl.float32)
        gm = tl.where((r % SUB <= i)[:, None], g, 0.)
        e = tl.where((r % SUB < i)[:, None], block_cumsum(gm, C, SUB, True) - gm, 0.)
        out += pt[:, None] * qt * tl.exp(e)
    return out


@triton.jit
def dk_inter(v, dS, t, mt, hk, Hkv, srow, Dv: tl.constexpr, mk, C: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr, BVH: tl.constexpr, IEEE: tl.constexpr):
    """v dS^T, BVH columns of Dv at a time. fp32 dS and a near-fp32 product: k.dk from the
    final state cancels against the final-state term of the gate gradient (dS_T . S_T)."""
    x = tl.zeros([C, BK], dtype=tl.float32)
    for iv in tl.static_range(0, BV, BVH):
        dvh = iv + tl.arange(0, BVH)
        mvh = dvh < Dv
        vh = load_rows(v, t, mt, Hkv, hk, Dv, dvh, mvh).to(tl.float32)
        dSh = tl.load(dS + srow + dvh[None, :], mask=mk[:, None] & mvh[None, :], other=0.)
        x += mm_precise(vh, tl.trans(dSh), IEEE)
    return x


@triton.jit
def dk_one_state(q, v, dP, dBq, dS, g_ptr, wi, kk, Hq, Hkv, hk, G: tl.constexpr, t0, eos, t, mt, Dk: tl.constexpr,
                 dk, mk, Dv: tl.constexpr, ic, C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, BVH: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr, dgl, tot):
    """dk_i of one state; stores its gate gradient's chunk-local reverse cumsum and total."""
    g = load_rows(g_ptr, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    acc, dB = dk_group(q, dP, dBq, g, Hq, hk, G, t0, eos, t, mt, Dk, dk, mk, C, SUB, BK, RANGE_MAX, IEEE)
    x = dk_inter(v, dS, t, mt, hk, Hkv, ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv, Dv, mk,
                 C, BK, BV, BVH, IEEE)
    # exp(b_last - b_s) = exp(T_J - bt_s) * exp(the later blocks' totals)
    d = wi * acc + tl.exp(block_cumsum(g, C, SUB, True) - g) * later_blocks_decay(g, C, SUB) * x
    dB -= kk * d
    m_out = mt[:, None] & mk[None, :]
    tl.store(dgl + (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :], tl.cumsum(dB, axis=0, reverse=True),
             mask=m_out)
    tl.store(tot + (ic * Hkv + hk).to(tl.int64) * Dk + dk, tl.sum(dB, axis=0), mask=mk)
    return d


@triton.jit
def _dk_bwd(q, k, v, g1, g2, w, dS1, dS2, dP, dBq1, dBq2, dk_out, dgl1, dgl2, tot1, tot2, cu, cseq, coff,
            Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
            C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVH: tl.constexpr,
            RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Per (chunk, kv head, Dk block): dk of the chunk's rows (both states, the whole query
    group) and the gate gradients' chunk-local parts: the reverse cumsum of dB_i inside the
    chunk and its total (`_dg_finish` adds the later chunks'; reads dBq from `_dq_bwd`)."""
    ic = tl.program_id(0)
    hk = tl.program_id(1)
    ik = tl.program_id(2)
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = ik * BK + tl.arange(0, BK)
    mk = dk < Dk
    m_out = mt[:, None] & mk[None, :]
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    dk_tot = tl.zeros([C, BK], dtype=tl.float32)
    for gi in range(G):  # the diagonal pairs s = t of every query head of the group
        hq = hk * G + gi
        dpd = tl.load(dP + (t * Hq + hq).to(tl.int64) * C + tl.arange(0, C), mask=mt, other=0.)
        dk_tot += (w0 + w1) * dpd[:, None] * load_rows(q, t, mt, Hq, hq, Dk, dk, mk).to(tl.float32)
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    out = (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :]
    # one state at a time: fewer live tiles
    dk_tot += dk_one_state(q, v, dP, dBq1, dS1, g1, w0, kk, Hq, Hkv, hk, G, t0, eos, t, mt, Dk, dk, mk, Dv,
                           ic, C, SUB, BK, BV, BVH, RANGE_MAX, IEEE, dgl1, tot1)
    dk_tot += dk_one_state(q, v, dP, dBq2, dS2, g2, w1, kk, Hq, Hkv, hk, G, t0, eos, t, mt, Dk, dk, mk, Dv,
                           ic, C, SUB, BK, BV, BVH, RANGE_MAX, IEEE, dgl2, tot2)
    tl.store(dk_out + out, dk_tot.to(dk_out.dtype.element_ty), mask=m_out)
