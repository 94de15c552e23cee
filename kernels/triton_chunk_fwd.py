"""Fused dual-state chunked prefill, forward (Triton).

Tokens are packed as [total_T, H, D] with sequence offsets `cu` (varlen, as in
flash-linear-attention); a fixed [B, T] batch is the special case cu = [0, T, 2T, ...].
Chunks of C tokens never cross a sequence boundary.

Two launches (or three: LAUNCH["split_output"] in triton_dsla.py splits 2. into
`_scores_fwd` + `_output_split_fwd`, with the mixed scores through memory):
  1. `_states_fwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks in
     order carrying BOTH states in registers; store each chunk's starting state
     (for the output pass) and the final states. The next chunk's loads are issued
     before the current chunk's arithmetic (PREFETCH) so the walk is not one memory
     latency per step.
  2. `_output_fwd`: per (chunk, query head, Dv block), in parallel: both states'
     intra-chunk scores, mixed by w, times v, plus q exp(b) h of both states. The
     C x C scores never go to memory (they are written only when the backward
     needs them, STORE_A).

Intra-chunk scores A[t,s] = sum_d q_td k_sd exp(b_td - b_sd) (s <= t) come from tensor-core
products over key blocks J of SUB rows. With r_J = b at the row just before J:
    q' = q_t exp(b_t - r_J)        <= 1 for every t >= first(J)  (rows before J are masked)
    k' = k_s exp(r_J - b_s)        in [1, exp(range_J)] for s in J
(each exponent a direct sum of the log decays between the two rows, so pairs a few steps
apart stay exact to fp32 rounding however large the chunk's cumulative decay has grown)
so A[:, J] = q' k'^T is one [C, Dk] x [Dk, SUB] product, every exponent bounded, and the
columns of J land in one [C, SUB] block that multiplies v_J directly (no assembly).
If some key dim decays by more than RANGE_MAX inside J, that block falls back to an
exact column-by-column form whose exponents are direct sums of log decays (<= 0).
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
def row_of(x, r, N: tl.constexpr):
    """Row r of an [N, D] tile as a [D] vector (zeros when r is outside 0..N-1)."""
    return tl.sum(tl.where((tl.arange(0, N) == r)[:, None], x, 0.), axis=0)


@triton.jit
def chunk_tile(cu, cseq, coff, ic, C: tl.constexpr):
    """First token of global chunk ic, its sequence's end, and the chunk's token rows."""
    n = tl.load(cseq + ic)
    t0 = tl.load(cu + n).to(tl.int64) + (ic - tl.load(coff + n)).to(tl.int64) * C
    eos = tl.load(cu + n + 1).to(tl.int64)
    t = t0 + tl.arange(0, C)
    return t0, eos, t, t < eos


@triton.jit
def exact_block(q, g, J, C: tl.constexpr, SUB: tl.constexpr, kJ):
    """Scores of all C query rows against the SUB keys of block J, exactly: column s uses
    exp(sum_{u in (s, t]} g_u), a direct sum of log decays (<= 0), never a difference of
    two long cumsums. q [C,BK] fp32, g [C,BK] fp32 chunk log decays, kJ [SUB,BK] fp32."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, SUB)
    A = tl.zeros([C, SUB], dtype=tl.float32)
    for j in range(SUB):
        s = J * SUB + j
        ks = row_of(kJ, j, SUB)
        e = tl.where((rows >= s)[:, None], tl.exp(tl.cumsum(tl.where((rows > s)[:, None], g, 0.), axis=0)), 0.)
        col = tl.sum(q * e * ks[None, :], axis=1)
        A = tl.where((cols == j)[None, :], col[:, None], A)
    return A


@triton.jit
def from_row(g, r, C: tl.constexpr):
    """sum_{u=r..t} g_u for every row t >= r of a [C, BK] tile of log decays (0 for t < r):
    b_t - b_{r-1} as a direct sum, not a difference of two long cumsums."""
    return tl.cumsum(tl.where((tl.arange(0, C) >= r)[:, None], g, 0.), axis=0)


@triton.jit
def block_scores(q, g_ptr, t, mt, J, tJ, mJ, kJ, hk, Hkv, Dk: tl.constexpr, dk, mk,
                 C: tl.constexpr, SUB: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Unmasked scores A[:, J] [C, SUB] of one state (see the module docstring).
    q [C,BK] and kJ [SUB,BK] as loaded. The chunk's log decays are re-read here (from cache)
    rather than kept in registers across the blocks: the kernel is register-bound."""
    gc = load_rows(g_ptr, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    gJ = load_rows(g_ptr, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
    if tl.max(-tl.sum(gJ, axis=0), axis=0) <= RANGE_MAX:
        qp = (q * tl.exp(from_row(gc, J * SUB, C))).to(kJ.dtype)  # rows before J: exp(0), masked later
        kp = (kJ * tl.exp(-tl.cumsum(gJ, axis=0))).to(kJ.dtype)
        A = mm(qp, tl.trans(kp), IEEE)
    else:
        A = exact_block(q.to(tl.float32), gc, J, C, SUB, kJ.to(tl.float32))
    return A


@triton.jit
def to_end(x, g):
    """x_s exp(sum_{u>s} g_u): rows decayed to the chunk's end (<= 1, a direct sum)."""
    return x * tl.exp(tl.cumsum(g, axis=0, reverse=True) - g)


@triton.jit
def _states_fwd(k, v, g1, g2, s01, s02, h1, h2, sT1, sT2, cu, coff,
                Hkv, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_S0: tl.constexpr, STORE_H: tl.constexpr, PREFETCH: tl.constexpr, IEEE: tl.constexpr):
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
    t = bos + tl.arange(0, C)
    mt = t < eos
    # padded rows read g = 0, k = v = 0: they change neither state
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
    ga = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    gb = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    for c in range(nc):
        if PREFETCH:  # next chunk's loads in flight during this chunk's arithmetic
            tn = t + C
            mn = tn < eos
            kn = load_rows(k, tn, mn, Hkv, hk, Dk, dk, mk)
            vn = load_rows(v, tn, mn, Hkv, hk, Dv, dv, mv)
            gan = load_rows(g1, tn, mn, Hkv, hk, Dk, dk, mk).to(tl.float32)
            gbn = load_rows(g2, tn, mn, Hkv, hk, Dk, dk, mk).to(tl.float32)
        if STORE_H:
            hoff = (((c0 + c) * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
            tl.store(h1 + hoff, S1.to(h1.dtype.element_ty), mask=mst)
            tl.store(h2 + hoff, S2.to(h2.dtype.element_ty), mask=mst)
        S1 = S1 * tl.exp(tl.sum(ga, axis=0))[:, None] + mm(tl.trans(to_end(kk, ga).to(vv.dtype)), vv, IEEE)
        S2 = S2 * tl.exp(tl.sum(gb, axis=0))[:, None] + mm(tl.trans(to_end(kk, gb).to(vv.dtype)), vv, IEEE)
        if PREFETCH:
            t, kk, vv, ga, gb = tn, kn, vn, gan, gbn
        else:
            t = t + C
            mt = t < eos
            kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
            vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
            ga = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
            gb = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    tl.store(sT1 + st, S1, mask=mst)
    tl.store(sT2 + st, S2, mask=mst)


@triton.jit
def _output_fwd(q, k, v, g1, g2, w, h1, h2, A, o, cu, cseq, coff, scale,
                Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
                SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, RANGE_MAX: tl.constexpr,
                STORE_A: tl.constexpr, IEEE: tl.constexpr):
    """o = scale (sum_i w_i (q exp(b_i)) h_i + (w_0 A_1 + w_1 A_2) v) for one chunk, query head,
    Dv block. A (mixed, [total_T, Hq, C]) is stored for the backward when STORE_A."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    iv = tl.program_id(2)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    mst = mk[:, None] & mv[None, :]
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk)
    hh = tl.load(h1 + hoff, mask=mst, other=0.)
    b = tl.cumsum(load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32), axis=0)
    acc = w0 * mm((qq * tl.exp(b)).to(hh.dtype), hh, IEEE)
    hh = tl.load(h2 + hoff, mask=mst, other=0.)
    b = tl.cumsum(load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32), axis=0)
    acc += w1 * mm((qq * tl.exp(b)).to(hh.dtype), hh, IEEE)
    rows = tl.arange(0, C)
    cols = tl.arange(0, SUB)
    for J in tl.static_range(C // SUB):
        tJ = t0 + J * SUB + cols
        mJ = tJ < eos
        kJ = load_rows(k, tJ, mJ, Hkv, hk, Dk, dk, mk)
        AJ = w0 * block_scores(qq, g1, t, mt, J, tJ, mJ, kJ, hk, Hkv, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
        AJ += w1 * block_scores(qq, g2, t, mt, J, tJ, mJ, kJ, hk, Hkv, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
        AJ = tl.where(rows[:, None] >= (J * SUB + cols)[None, :], AJ, 0.)
        if STORE_A:
            if iv == 0:
                tl.store(A + (t[:, None] * Hq + hq).to(tl.int64) * C + J * SUB + cols[None, :],
                         AJ.to(A.dtype.element_ty), mask=mt[:, None])
        vJ = load_rows(v, tJ, mJ, Hkv, hk, Dv, dv, mv)
        acc += mm(AJ.to(vJ.dtype), vJ, IEEE)
    tl.store(o + (t[:, None] * Hq + hq).to(tl.int64) * Dv + dv[None, :], (acc * scale).to(o.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])


@triton.jit
def _scores_fwd(q, k, g1, g2, w, A, cu, cseq, coff, Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr,
                C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr):
    """Split form, first half: the mixed scores w_0 A_1 + w_1 A_2 of one chunk and query head,
    written to A [total_T, Hq, C]. Holding no [C, Dv] accumulator, it needs far fewer registers
    than the fused `_output_fwd` (which spilled on an H200: bench/results/kernels.md)."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    mk = dk < Dk
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk)
    rows = tl.arange(0, C)
    cols = tl.arange(0, SUB)
    for J in tl.static_range(C // SUB):
        tJ = t0 + J * SUB + cols
        mJ = tJ < eos
        kJ = load_rows(k, tJ, mJ, Hkv, hk, Dk, dk, mk)
        AJ = w0 * block_scores(qq, g1, t, mt, J, tJ, mJ, kJ, hk, Hkv, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
        AJ += w1 * block_scores(qq, g2, t, mt, J, tJ, mJ, kJ, hk, Hkv, Dk, dk, mk, C, SUB, RANGE_MAX, IEEE)
        AJ = tl.where(rows[:, None] >= (J * SUB + cols)[None, :], AJ, 0.)
        tl.store(A + (t[:, None] * Hq + hq).to(tl.int64) * C + J * SUB + cols[None, :], AJ.to(A.dtype.element_ty),
                 mask=mt[:, None])


@triton.jit
def _output_split_fwd(q, v, g1, g2, w, h1, h2, A, o, cu, cseq, coff, scale,
                      Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Split form, second half: o = scale (w0 (q exp(b1)) h1 + w1 (q exp(b2)) h2 + A v)."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    iv = tl.program_id(2)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
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
