"""Fused dual-state chunked prefill, forward (Triton).

Tokens are packed as [total_T, H, D] with sequence offsets `cu` (varlen, as in
flash-linear-attention); a fixed [B, T] batch is the special case cu = [0, T, 2T, ...].
Chunks of C tokens never cross a sequence boundary.

Three launches:
  1. `_states_fwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks in
     order carrying BOTH states in registers; store each chunk's starting state
     (for the output pass) and the final states.
  2. `_scores_fwd`: per (chunk, query head, sub-chunk), in parallel: the intra-chunk
     scores of both states, mixed by w, stored as A [total_T, Hq, C] (kept for the
     backward, which needs the same mixed scores for dv).
  3. `_output_fwd`: per (chunk, query head, Dv block): q exp(b) h for both states
     plus the single product A v.
(A first version did 2 and 3 in one program, assembling the sub-chunks' scores with
3-D selects and a reshape, and took 0.5 ms per 1K tokens on an H200:
bench/results/kernels.run1-h200.md.)

Numerical stability (decays may be strong, down to -50 per step): every exponent
that multiplies an operand is kept <= 0, except inside a sub-chunk's own diagonal
block where it is bounded by the sub-chunk's decay range. The intra-chunk scores
A[t,s] = sum_d q_td k_sd exp(b_td - b_sd) are computed per query sub-chunk of SUB
rows with the reference point r = the sub-chunk's first row:
    q' = q_t exp(b_t - b_r)   (<= 1 for t >= r)
    k' = k_s exp(b_r - b_s)   (<= 1 for s < r; <= exp(range) inside the sub-chunk)
If some key dim decays by more than RANGE_MAX inside a sub-chunk, that sub-chunk
falls back to an exact row-by-row form whose exponents are all <= 0.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

CHUNK = 64
SUB = 16
RANGE_MAX = 60.0  # exp(60) ~ 1e26: far from fp32/bf16 overflow, products stay normal
# Triton's CPU interpreter (3.9) returns garbage for tl.dot on bf16 operands (relative
# error ~1e9 on a plain 16x16 product); under the interpreter only, products run in fp32.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def mm(a, b, IEEE: tl.constexpr):
    """Matrix product; fp32 inputs use exact fp32 (not tf32) so fp32 callers get fp32 accuracy."""
    if _INTERPRET:
        if not IEEE and a.dtype == tl.float32:  # emulate tf32 operands: 10-bit mantissa, nearest
            a = ((a.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
            b = ((b.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def mm_precise(a, b, IEEE: tl.constexpr):
    """fp32 operands at ~fp32 accuracy: exact for fp32 callers, three tf32 passes otherwise."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def load_rows(ptr, t, mt, H, h, D: tl.constexpr, d, md):
    """Rows t of head h from a packed [total_T, H, D] tensor; masked rows/cols read 0."""
    return tl.load(ptr + (t[:, None] * H + h).to(tl.int64) * D + d[None, :], mask=mt[:, None] & md[None, :], other=0.)


@triton.jit
def sub_cumsum(g_ptr, t0, eos, hk, Hkv, Dk: tl.constexpr, dk, mk, base, SUB: tl.constexpr):
    """Cumulative log decay of rows [t0, t0+SUB) on top of `base` (the chunk-relative
    value before the sub-chunk). Returns (b rows, b at first row, b at last row)."""
    sr = tl.arange(0, SUB)
    tr = t0 + sr
    gR = load_rows(g_ptr, tr, tr < eos, Hkv, hk, Dk, dk, mk).to(tl.float32)
    bR = base[None, :] + tl.cumsum(gR, axis=0)
    bref = base + tl.sum(tl.where(sr[:, None] == 0, gR, 0.), axis=0)
    blast = base + tl.sum(gR, axis=0)
    return bR, bref, blast


@triton.jit
def pair_decay(gc, a, C: tl.constexpr):
    """exp(b_a - b_s) for every key row s <= a of the chunk, [C, BK] (rows s > a: 1).
    Summed directly over u = s+1..a, not as a difference of two long cumsums, so a pair
    a few steps apart stays exact even when the cumsums have grown to -1000s."""
    rows = tl.arange(0, C)
    gm = tl.where((rows <= a)[:, None], gc, 0.)
    return tl.exp(tl.cumsum(gm, axis=0, reverse=True) - gm)


@triton.jit
def intra_scores_rows(qR, bR, bref, blast, kk, b, gc, i, C: tl.constexpr, SUB: tl.constexpr,
                      RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Scores A[t, s] for the SUB query rows of sub-chunk i against all C keys of the
    chunk (causal, s <= t), one state. qR [SUB,BK], bR [SUB,BK] fp32, kk [C,BK],
    b [C,BK] (chunk cumsum), gc [C,BK] (chunk log decays)."""
    sr = tl.arange(0, SUB)
    cols = tl.arange(0, C)
    rng = tl.max(bref - blast, axis=0)
    if rng <= RANGE_MAX:
        kq = (kk * tl.exp(tl.minimum(bref[None, :] - b, RANGE_MAX))).to(kk.dtype)
        qr = (qR * tl.exp(bR - bref[None, :])).to(kk.dtype)
        A = mm(qr, tl.trans(kq), IEEE)
    else:
        # Exact: row by row, every exponent a sum of log decays (<= 0).
        A = tl.zeros([SUB, C], dtype=tl.float32)
        kf = kk.to(tl.float32)
        qf = qR.to(tl.float32)
        for tt in range(SUB):
            sel = (sr == tt)[:, None]
            qt = tl.sum(tl.where(sel, qf, 0.), axis=0)
            e = pair_decay(gc, i * SUB + tt, C)
            at = tl.sum(kf * e * qt[None, :], axis=1)
            A = tl.where(sel, at[None, :], A)
    causal = cols[None, :] <= (i * SUB + sr)[:, None]
    return tl.where(causal, A, 0.)


@triton.jit
def _states_fwd(k, v, g1, g2, s01, s02, h1, h2, sT1, sT2, cu, coff,
                Hkv, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_S0: tl.constexpr, STORE_H: tl.constexpr, IEEE: tl.constexpr):
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
    if HAS_S0:
        S1 = tl.load(s01 + st, mask=mst, other=0.).to(tl.float32)
        S2 = tl.load(s02 + st, mask=mst, other=0.).to(tl.float32)
    else:
        S1 = tl.zeros([BK, BV], dtype=tl.float32)
        S2 = tl.zeros([BK, BV], dtype=tl.float32)
    rows = tl.arange(0, C)
    for c in range(nc):
        if STORE_H:
            hoff = (((c0 + c) * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
            tl.store(h1 + hoff, S1.to(h1.dtype.element_ty), mask=mst)
            tl.store(h2 + hoff, S2.to(h2.dtype.element_ty), mask=mst)
        t = bos + c * C + rows
        mt = t < eos
        kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
        vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
        # padded rows read g = 0, k = v = 0: they change neither state
        ga = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
        b = tl.cumsum(ga, axis=0)
        last = tl.sum(ga, axis=0)
        kd = (kk * tl.exp(last[None, :] - b)).to(vv.dtype)  # decay from s to the chunk's end: <= 1
        S1 = S1 * tl.exp(last)[:, None] + mm(tl.trans(kd), vv, IEEE)
        ga = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
        b = tl.cumsum(ga, axis=0)
        last = tl.sum(ga, axis=0)
        kd = (kk * tl.exp(last[None, :] - b)).to(vv.dtype)
        S2 = S2 * tl.exp(last)[:, None] + mm(tl.trans(kd), vv, IEEE)
    tl.store(sT1 + st, S1, mask=mst)
    tl.store(sT2 + st, S2, mask=mst)


@triton.jit
def sub_rows(g, gc, i, t0, eos, hk, Hkv, Dk: tl.constexpr, dk, mk, C: tl.constexpr, SUB: tl.constexpr):
    """Chunk-relative cumsum rows of sub-chunk i: (b rows, b at its first row, b at its last row),
    from the chunk's log decays gc [C,BK] (for the offset) and the sub-chunk's own rows."""
    rows = tl.arange(0, C)
    base = tl.sum(tl.where((rows < i * SUB)[:, None], gc, 0.), axis=0)
    return sub_cumsum(g, t0 + i * SUB, eos, hk, Hkv, Dk, dk, mk, base, SUB)


@triton.jit
def _scores_one_state(g, qR, kk, t, mt, t0, eos, i, hk, Hkv, Dk: tl.constexpr, dk, mk,
                      C: tl.constexpr, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    gc = load_rows(g, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    b = tl.cumsum(gc, axis=0)
    bR, bref, blast = sub_rows(g, gc, i, t0, eos, hk, Hkv, Dk, dk, mk, C, SUB)
    return intra_scores_rows(qR, bR, bref, blast, kk, b, gc, i, C, SUB, RANGE_MAX, IEEE)


@triton.jit
def _scores_fwd(q, k, g1, g2, w, A, cu, cseq, coff,
                Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                BK: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Mixed intra-chunk scores w0 A1 + w1 A2 for the SUB query rows of one sub-chunk,
    written to A [total_T, Hq, C] (row t holds the scores against its chunk's C keys)."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    i = tl.program_id(2)
    hk = hq // G
    n = tl.load(cseq + ic)
    t0 = tl.load(cu + n).to(tl.int64) + (ic - tl.load(coff + n)).to(tl.int64) * C
    eos = tl.load(cu + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, C)
    mt = t < eos
    tr = t0 + i * SUB + tl.arange(0, SUB)
    mr = tr < eos
    dk = tl.arange(0, BK)
    mk = dk < Dk
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    qR = load_rows(q, tr, mr, Hq, hq, Dk, dk, mk)
    A1 = _scores_one_state(g1, qR, kk, t, mt, t0, eos, i, hk, Hkv, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
    A2 = _scores_one_state(g2, qR, kk, t, mt, t0, eos, i, hk, Hkv, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
    Am = tl.load(w) * A1 + tl.load(w + 1) * A2
    cols = tl.arange(0, C)
    tl.store(A + (tr[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], Am.to(A.dtype.element_ty),
             mask=mr[:, None])


@triton.jit
def _output_fwd(q, v, g1, g2, w, h1, h2, A, o, cu, cseq, coff, scale,
                Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """o = scale (w0 (q exp(b1)) h1 + w1 (q exp(b2)) h2 + A v) for one chunk, query head, Dv block."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    iv = tl.program_id(2)
    hk = hq // G
    n = tl.load(cseq + ic)
    t0 = tl.load(cu + n).to(tl.int64) + (ic - tl.load(coff + n)).to(tl.int64) * C
    eos = tl.load(cu + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, C)
    mt = t < eos
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk)
    vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
    b = tl.cumsum(load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32), axis=0)
    hh = tl.load(h1 + hoff, mask=mst, other=0.)
    acc = tl.load(w) * mm((qq * tl.exp(b)).to(hh.dtype), hh, IEEE)
    b = tl.cumsum(load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32), axis=0)
    hh = tl.load(h2 + hoff, mask=mst, other=0.)
    acc += tl.load(w + 1) * mm((qq * tl.exp(b)).to(hh.dtype), hh, IEEE)
    cols = tl.arange(0, C)
    Am = tl.load(A + (t[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], mask=mt[:, None], other=0.)
    acc += mm(Am.to(vv.dtype), vv, IEEE)
    tl.store(o + (t[:, None] * Hq + hq).to(tl.int64) * Dv + dv[None, :], (acc * scale).to(o.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


@triton.jit
def _scores_fwd_chunk(q, k, g1, g2, w, A, cu, cseq, coff,
                      Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                      BK: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Same output as `_scores_fwd`, one program per (chunk, query head) for all sub-chunks:
    the chunk's k, gates and cumsums are loaded and computed once instead of once per
    sub-chunk. Not yet measured on a GPU (selected by LAUNCH["scores_per_chunk"])."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    hk = hq // G
    n = tl.load(cseq + ic)
    t0 = tl.load(cu + n).to(tl.int64) + (ic - tl.load(coff + n)).to(tl.int64) * C
    eos = tl.load(cu + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, C)
    mt = t < eos
    dk = tl.arange(0, BK)
    mk = dk < Dk
    sr = tl.arange(0, SUB)
    cols = tl.arange(0, C)
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    gc1 = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    gc2 = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    b1 = tl.cumsum(gc1, axis=0)
    b2 = tl.cumsum(gc2, axis=0)
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    base1 = tl.zeros_like(tl.sum(gc1, axis=0))
    base2 = tl.zeros_like(base1)
    for i in tl.static_range(C // SUB):
        tr = t0 + i * SUB + sr
        mr = tr < eos
        qR = load_rows(q, tr, mr, Hq, hq, Dk, dk, mk)
        bR, bref, bl = sub_cumsum(g1, t0 + i * SUB, eos, hk, Hkv, Dk, dk, mk, base1, SUB)
        Am = w0 * intra_scores_rows(qR, bR, bref, bl, kk, b1, gc1, i, C, SUB, RANGE_MAX, IEEE)
        base1 = bl
        bR, bref, bl = sub_cumsum(g2, t0 + i * SUB, eos, hk, Hkv, Dk, dk, mk, base2, SUB)
        Am += w1 * intra_scores_rows(qR, bR, bref, bl, kk, b2, gc2, i, C, SUB, RANGE_MAX, IEEE)
        base2 = bl
        tl.store(A + (tr[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], Am.to(A.dtype.element_ty),
                 mask=mr[:, None])
