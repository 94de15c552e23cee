"""Fused dual-state chunked prefill, forward (Triton).

Tokens are packed as [total_T, H, D] with sequence offsets `cu` (varlen, as in
flash-linear-attention); a fixed [B, T] batch is the special case cu = [0, T, 2T, ...].
Chunks of C tokens never cross a sequence boundary; each chunk is cut into blocks of
SUB rows.

Three launches:
  1. `_scores_fwd`: per (chunk, query head, query block), in parallel: the mixed
     intra-chunk scores w_0 A_1 + w_1 A_2 of the block's rows (to memory: the output pass
     and the backward read them), and the within-block cumsums b_i of both log decays.
  2. `_states_fwd`: per (sequence, kv head, Dk block, Dv block), walk the chunks in order
     carrying BOTH states in registers; store each chunk's starting state and the final
     states. With PRE it reads the block cumsums, so a step needs no scan; the next
     chunk's loads are issued before the current chunk's arithmetic (PREFETCH).
  3. `_output_fwd`: per (chunk, query head, Dv block): A v plus q exp(b_i) h_i of both
     states, at M = C rows, exp(b_i) from the block cumsums.
Inference (no backward to keep chunk states for) folds 2 and 3 into one walk that computes each
chunk's output from the states it carries (triton_walk_out.py); its scores pass then reads the
block cumsums from `_block_cumsum_fwd` and also writes q and k decayed within the chunk (EMIT).

Every exponent is a sum of log decays over at most one block plus whole-block totals, so
it is <= 0 or bounded by the block's own decay (see `_scores_fwd`); a block that decays by
more than RANGE_MAX takes an exact column-by-column form (`exact_block`).
The timing history of the forms tried (per-chunk scores with 64-row tiles, scores fused
with the output, per-block inter-chunk products) is in bench/results/kernels.md.
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
def chunk_head_cols(cu, cseq, coff, Dk: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """A per (chunk, kv head) program's chunk ic and kv head, the chunk's first token, its
    sequence's end, and all Dk columns with their mask."""
    ic = tl.program_id(0)
    hk = tl.program_id(1)
    t0, eos, _, _ = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    return ic, hk, t0, eos, dk, dk < Dk


@triton.jit
def block_rows(t0, eos, J, SUB: tl.constexpr):
    """The token rows of a chunk's block J (from the chunk's first token t0) and their mask."""
    t = t0 + J * SUB + tl.arange(0, SUB)
    return t, t < eos


@triton.jit
def chunk_state_tile(ic, hk, iv, Hkv, Dk: tl.constexpr, Dv: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """All Dk columns and Dv block iv's columns (with masks) of kv head hk, and their offsets in a
    per-chunk state [chunks, Hkv, Dk, Dv] at global chunk ic."""
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < Dk
    mv = dv < Dv
    hoff = ((ic * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    return dk, dv, mk, mv, mk[:, None] & mv[None, :], hoff


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
def to_end(x, g):
    """x_s exp(sum_{u>s} g_u): rows decayed to the chunk's end (<= 1, a direct sum)."""
    return x * tl.exp(tl.cumsum(g, axis=0, reverse=True) - g)


@triton.jit
def block_end_total(b_ptr, J, t0, eos, Hkv, hk, Dk: tl.constexpr, dk, mk, SUB: tl.constexpr):
    """Block J's total log decay: the block cumsum at its last row inside the sequence (0 past the end)."""
    r = tl.minimum(t0 + J * SUB + SUB - 1, eos - 1) + 0 * dk  # a vector: the interpreter rejects scalar masks
    return tl.load(b_ptr + (r * Hkv + hk).to(tl.int64) * Dk + dk, mask=mk & (r >= t0 + J * SUB), other=0.)


@triton.jit
def decay_to_end(x, bt, b_ptr, t0, eos, Hkv, hk, Dk: tl.constexpr, dk, mk, C: tl.constexpr, SUB: tl.constexpr):
    """(x_s exp(sum_{u>s} g_u), exp(chunk total)) from the block cumsums bt that `_scores_fwd` writes:
    the exponent of row s in block J is (total_J - bt_s) + the totals of the later blocks, so
    the walk needs no scan."""
    rows = tl.arange(0, C)
    e = -bt
    later = tl.sum(bt * 0., axis=0)  # zeros in the column layout of bt
    for jj in tl.static_range(C // SUB):
        J = C // SUB - 1 - jj
        tot = block_end_total(b_ptr, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
        e = tl.where((rows // SUB == J)[:, None], e + (tot + later)[None, :], e)
        later += tot
    return x * tl.exp(e), tl.exp(later)


@triton.jit
def decay_from_start(bt, b_ptr, t0, eos, Hkv, hk, Dk: tl.constexpr, dk, mk, C: tl.constexpr, SUB: tl.constexpr):
    """(exp(b_t), exp(chunk total)) from the block cumsums bt, b_t the chunk-relative cumsum:
    bt_t + the totals of the earlier blocks, a direct sum with no scan."""
    rows = tl.arange(0, C)
    e = bt
    before = tl.sum(bt * 0., axis=0)
    for J in tl.static_range(C // SUB):
        e = tl.where((rows // SUB == J)[:, None], e + before[None, :], e)
        before += block_end_total(b_ptr, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
    return tl.exp(e), tl.exp(before)


@triton.jit
def walk_tile(cu, coff, Hkv, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr):
    """A state walk's program (grid: Dk block, Dv block, sequence * kv head): its kv head, the
    sequence's tokens [bos, eos), its first global chunk c0 and chunk count nc, and its [BK, BV]
    tile of a [sequences, Hkv, Dk, Dv] state: columns, masks, offsets."""
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
    return hk, bos, eos, c0, nc, dk, dv, mk, mv, st, mst


@triton.jit
def load_state_pair(p1, p2, st, mst, HAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Both states' tiles in fp32 from p1, p2 at offsets st, or zeros when there are none."""
    if HAS:
        S1 = tl.load(p1 + st, mask=mst, other=0.).to(tl.float32)
        S2 = tl.load(p2 + st, mask=mst, other=0.).to(tl.float32)
    else:
        S1 = tl.zeros([BK, BV], dtype=tl.float32)
        S2 = tl.zeros([BK, BV], dtype=tl.float32)
    return S1, S2


@triton.jit
def walk_rows(k, v, g1, g2, t, eos, Hkv, hk, Dk: tl.constexpr, Dv: tl.constexpr, dk, dv, mk, mv):
    """One chunk's k, v and both log decays (fp32) at token rows t of kv head hk; rows past
    eos read g = 0, k = v = 0, so they change neither state."""
    mt = t < eos
    kk = load_rows(k, t, mt, Hkv, hk, Dk, dk, mk)
    vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
    ga = load_rows(g1, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    gb = load_rows(g2, t, mt, Hkv, hk, Dk, dk, mk).to(tl.float32)
    return kk, vv, ga, gb


@triton.jit
def store_chunk_states(h1, h2, S1, S2, chunk, Hkv, hk, Dk: tl.constexpr, Dv: tl.constexpr, dk, dv, mst):
    """Both states' tiles as global chunk `chunk`'s starting states in h1, h2 [chunks, Hkv, Dk, Dv]."""
    hoff = ((chunk * Hkv + hk) * Dk + dk[:, None]).to(tl.int64) * Dv + dv[None, :]
    tl.store(h1 + hoff, S1.to(h1.dtype.element_ty), mask=mst)
    tl.store(h2 + hoff, S2.to(h2.dtype.element_ty), mask=mst)


@triton.jit
def walk_step(S1, S2, kk, vv, ba, bb, b1, b2, t0, eos, Hkv, hk, Dk: tl.constexpr, dk, mk, C: tl.constexpr,
              SUB: tl.constexpr, IEEE: tl.constexpr):
    """Both states carried over the chunk that starts at token t0 (its k, v and block cumsums ba, bb
    loaded; b1, b2 the block cumsums' tensors), and the chunk's total decays."""
    ka, da = decay_to_end(kk, ba, b1, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    kb, db = decay_to_end(kk, bb, b2, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    S1 = S1 * da[:, None] + mm(tl.trans(ka.to(vv.dtype)), vv, IEEE)
    S2 = S2 * db[:, None] + mm(tl.trans(kb.to(vv.dtype)), vv, IEEE)
    return S1, S2, da, db


@triton.jit
def _states_fwd(k, v, g1, g2, s01, s02, h1, h2, sT1, sT2, cu, coff,
                Hkv, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_S0: tl.constexpr, STORE_H: tl.constexpr, PREFETCH: tl.constexpr, IEEE: tl.constexpr,
                PRE: tl.constexpr = False, SUB: tl.constexpr = 16):
    hk, bos, eos, c0, nc, dk, dv, mk, mv, st, mst = walk_tile(cu, coff, Hkv, Dk, Dv, C, BK, BV)
    S1, S2 = load_state_pair(s01, s02, st, mst, HAS_S0, BK, BV)
    t = bos + tl.arange(0, C)
    kk, vv, ga, gb = walk_rows(k, v, g1, g2, t, eos, Hkv, hk, Dk, Dv, dk, dv, mk, mv)
    for c in range(nc):
        if PREFETCH:  # next chunk's loads in flight during this chunk's arithmetic
            tn = t + C
            kn, vn, gan, gbn = walk_rows(k, v, g1, g2, tn, eos, Hkv, hk, Dk, Dv, dk, dv, mk, mv)
        if STORE_H:
            store_chunk_states(h1, h2, S1, S2, c0 + c, Hkv, hk, Dk, Dv, dk, dv, mst)
        if PRE:  # g1, g2 hold the block cumsums
            S1, S2, _, _ = walk_step(S1, S2, kk, vv, ga, gb, g1, g2, bos + c * C, eos, Hkv, hk, Dk, dk, mk, C, SUB,
                                     IEEE)
        else:
            S1 = S1 * tl.exp(tl.sum(ga, axis=0))[:, None] + mm(tl.trans(to_end(kk, ga).to(vv.dtype)), vv, IEEE)
            S2 = S2 * tl.exp(tl.sum(gb, axis=0))[:, None] + mm(tl.trans(to_end(kk, gb).to(vv.dtype)), vv, IEEE)
        if PREFETCH:
            t, kk, vv, ga, gb = tn, kn, vn, gan, gbn
        else:
            t = t + C
            kk, vv, ga, gb = walk_rows(k, v, g1, g2, t, eos, Hkv, hk, Dk, Dv, dk, dv, mk, mv)
    tl.store(sT1 + st, S1, mask=mst)
    tl.store(sT2 + st, S2, mask=mst)


@triton.jit
def _block_cumsum_fwd(g1, g2, b1, b2, cu, cseq, coff, Hkv, Dk: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                      BK: tl.constexpr):
    """Per (chunk, kv head): the within-block inclusive cumsums b of both log decays, for a scores
    pass that reads them instead of scanning every earlier block again (B_PRE)."""
    _, hk, t0, eos, dk, mk = chunk_head_cols(cu, cseq, coff, Dk, C, BK)
    for J in tl.static_range(C // SUB):
        t, mt = block_rows(t0, eos, J, SUB)
        off = (t[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :]
        m = mt[:, None] & mk[None, :]
        tl.store(b1 + off, tl.cumsum(tl.load(g1 + off, mask=m, other=0.).to(tl.float32), axis=0), mask=m)
        tl.store(b2 + off, tl.cumsum(tl.load(g2 + off, mask=m, other=0.).to(tl.float32), axis=0), mask=m)


@triton.jit
def emit_decayed(qe, kd, qI, kI, bI, totI, b_ptr, I, tI, mI, t0, eos, Hq, hq, Hkv, hk, G: tl.constexpr,
                 Dk: tl.constexpr, dk, mk, C: tl.constexpr, SUB: tl.constexpr):
    """One state's decayed operands of block I for the fused inference walk: q exp(c) (c the decay
    from the chunk's start) at query head hq, and, from the group's first query head, k exp(c_end - c)."""
    before = (dk * 0).to(tl.float32)
    later = (dk * 0).to(tl.float32)
    for J in tl.static_range(C // SUB):
        tot = block_end_total(b_ptr, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
        before += tl.where(J < I, tot, 0.)
        later += tl.where(J > I, tot, 0.)
    m = mI[:, None] & mk[None, :]
    tl.store(qe + (tI[:, None] * Hq + hq).to(tl.int64) * Dk + dk[None, :],
             (qI * tl.exp(bI + before[None, :])).to(qe.dtype.element_ty), mask=m)
    if hq % G == 0:
        tl.store(kd + (tI[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :],
                 (kI * tl.exp(totI[None, :] + later[None, :] - bI)).to(kd.dtype.element_ty), mask=m)


@triton.jit
def _scores_fwd(q, k, g1, g2, w, A, b1, b2, cu, cseq, coff, Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr,
                C: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, RANGE_MAX: tl.constexpr, IEEE: tl.constexpr,
                B_PRE: tl.constexpr = False, qe1=None, qe2=None, kd1=None, kd2=None, EMIT: tl.constexpr = False):
    """Mixed scores w_0 A_1 + w_1 A_2 of the SUB query rows of block I of one chunk and query
    head, written to A [total_T, Hq, C] (zeros right of the diagonal block); the first query
    head of each kv group also writes the block cumsums b_i, which the states walks, the output
    pass and the backward read.

    Key blocks J < I are visited from I-1 down to 0 carrying mid_i = the log decay of the
    blocks strictly between J and I, so that
        A_i[I, J] = (q_I exp(bI_i)) (k_J exp(rest_J,i + mid_i))^T
    with bI the within-block inclusive cumsum and rest_J the decay from a key row to the
    end of its block: every exponent is <= 0 (no overflow; underflow is the true value) and
    only SUB-row scans and [SUB, Dk] exps are needed. The diagonal block uses
    q exp(bI) . k exp(-bI) when the block decays by at most RANGE_MAX, the exact
    column-by-column form otherwise.

    EMIT (with B_PRE): also the operands of the fused inference walk (`triton_walk_out.py`), in
    q's dtype, the rounding the output pass and the walk apply anyway: qe_i = q exp(c_i) (the
    decay from the chunk's start) per query head, kd_i = k exp(c_i,end - c_i) (to the chunk's end)
    per kv head. Both exponents are <= 0."""
    tl.static_assert(B_PRE or not EMIT, "EMIT reads other blocks' totals: they must come from an earlier launch")
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    I = tl.program_id(2)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk = tl.arange(0, BK)
    mk = dk < Dk
    sr = tl.arange(0, SUB)
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    tI = t0 + I * SUB + sr
    mI = tI < eos
    qI = load_rows(q, tI, mI, Hq, hq, Dk, dk, mk)
    kI = load_rows(k, tI, mI, Hkv, hk, Dk, dk, mk)
    if B_PRE:  # b1, b2 from `_block_cumsum_fwd`
        bI1 = load_rows(b1, tI, mI, Hkv, hk, Dk, dk, mk)
        bI2 = load_rows(b2, tI, mI, Hkv, hk, Dk, dk, mk)
        totI1 = block_end_total(b1, I, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
        totI2 = block_end_total(b2, I, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
    else:
        gI1 = load_rows(g1, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
        gI2 = load_rows(g2, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32)
        bI1 = tl.cumsum(gI1, axis=0)
        bI2 = tl.cumsum(gI2, axis=0)
        totI1 = tl.sum(gI1, axis=0)
        totI2 = tl.sum(gI2, axis=0)
        if hq % G == 0:
            boff = (tI[:, None] * Hkv + hk).to(tl.int64) * Dk + dk[None, :]
            tl.store(b1 + boff, bI1, mask=mI[:, None] & mk[None, :])
            tl.store(b2 + boff, bI2, mask=mI[:, None] & mk[None, :])
    if EMIT:  # here, so that q, k and b need not stay live through the walk below
        emit_decayed(qe1, kd1, qI, kI, bI1, totI1, b1, I, tI, mI, t0, eos, Hq, hq, Hkv, hk, G, Dk, dk, mk, C, SUB)
        emit_decayed(qe2, kd2, qI, kI, bI2, totI2, b2, I, tI, mI, t0, eos, Hq, hq, Hkv, hk, G, Dk, dk, mk, C, SUB)
    qd1 = (qI * tl.exp(bI1)).to(qI.dtype)
    qd2 = (qI * tl.exp(bI2)).to(qI.dtype)
    arow = (tI[:, None] * Hq + hq).to(tl.int64) * C
    cz = tl.arange(0, C)
    tl.store(A + arow + cz[None, :], tl.zeros([SUB, C], dtype=A.dtype.element_ty),
             mask=mI[:, None] & (cz >= (I + 1) * SUB)[None, :])
    if tl.max(-totI1, axis=0) <= RANGE_MAX:
        A1 = mm(qd1, tl.trans((kI * tl.exp(-bI1)).to(kI.dtype)), IEEE)
    else:
        A1 = exact_block(qI.to(tl.float32), load_rows(g1, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32), 0, SUB, SUB,
                         kI.to(tl.float32))
    if tl.max(-totI2, axis=0) <= RANGE_MAX:
        A2 = mm(qd2, tl.trans((kI * tl.exp(-bI2)).to(kI.dtype)), IEEE)
    else:
        A2 = exact_block(qI.to(tl.float32), load_rows(g2, tI, mI, Hkv, hk, Dk, dk, mk).to(tl.float32), 0, SUB, SUB,
                         kI.to(tl.float32))
    AJ = tl.where(sr[:, None] >= sr[None, :], w0 * A1 + w1 * A2, 0.)
    tl.store(A + arow + I * SUB + sr[None, :], AJ.to(A.dtype.element_ty), mask=mI[:, None])
    mid1 = tl.zeros([BK], dtype=tl.float32)
    mid2 = tl.zeros([BK], dtype=tl.float32)
    # a block past the sequence's end stores nothing: it skips the walk
    for jj in range(0, tl.where(t0 + I * SUB < eos, I, 0)):
        J = I - 1 - jj
        tJ = t0 + J * SUB + sr
        mJ = tJ < eos
        kJ = load_rows(k, tJ, mJ, Hkv, hk, Dk, dk, mk)
        if B_PRE:
            tot1 = block_end_total(b1, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
            tot2 = block_end_total(b2, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
            kJ1 = (kJ * tl.exp(tot1[None, :] - load_rows(b1, tJ, mJ, Hkv, hk, Dk, dk, mk) + mid1[None, :])).to(kJ.dtype)
            kJ2 = (kJ * tl.exp(tot2[None, :] - load_rows(b2, tJ, mJ, Hkv, hk, Dk, dk, mk) + mid2[None, :])).to(kJ.dtype)
        else:
            gJ1 = load_rows(g1, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
            gJ2 = load_rows(g2, tJ, mJ, Hkv, hk, Dk, dk, mk).to(tl.float32)
            tot1 = tl.sum(gJ1, axis=0)
            tot2 = tl.sum(gJ2, axis=0)
            kJ1 = (kJ * tl.exp(tl.cumsum(gJ1, axis=0, reverse=True) - gJ1 + mid1[None, :])).to(kJ.dtype)
            kJ2 = (kJ * tl.exp(tl.cumsum(gJ2, axis=0, reverse=True) - gJ2 + mid2[None, :])).to(kJ.dtype)
        AJ = w0 * mm(qd1, tl.trans(kJ1), IEEE) + w1 * mm(qd2, tl.trans(kJ2), IEEE)
        tl.store(A + arow + J * SUB + sr[None, :], AJ.to(A.dtype.element_ty), mask=mI[:, None])
        mid1 += tot1
        mid2 += tot2


@triton.jit
def _output_fwd(q, v, b1, b2, w, h1, h2, A, o, cu, cseq, coff, scale,
                      Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr,
                      SUB: tl.constexpr):
    """o = scale (w0 (q exp(b1)) h1 + w1 (q exp(b2)) h2 + A v) for one chunk, query head and
    Dv block: the inter-chunk products at M = C rows (per 16-row block they cost more than
    the scores: bench/results/kernels.md). exp(b) from the block cumsums (no scan)."""
    ic = tl.program_id(0)
    hq = tl.program_id(1)
    iv = tl.program_id(2)
    hk = hq // G
    t0, eos, t, mt = chunk_tile(cu, cseq, coff, ic, C)
    dk, dv, mk, mv, mst, hoff = chunk_state_tile(ic, hk, iv, Hkv, Dk, Dv, BK, BV)
    qq = load_rows(q, t, mt, Hq, hq, Dk, dk, mk)
    vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
    e, _ = decay_from_start(load_rows(b1, t, mt, Hkv, hk, Dk, dk, mk), b1, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    # h is q's dtype, or fp32 kept for the backward: rounded to q's dtype here either way
    hh = tl.load(h1 + hoff, mask=mst, other=0.).to(qq.dtype)
    acc = tl.load(w) * mm((qq * e).to(hh.dtype), hh, IEEE)
    e, _ = decay_from_start(load_rows(b2, t, mt, Hkv, hk, Dk, dk, mk), b2, t0, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    hh = tl.load(h2 + hoff, mask=mst, other=0.).to(qq.dtype)
    acc += tl.load(w + 1) * mm((qq * e).to(hh.dtype), hh, IEEE)
    cols = tl.arange(0, C)
    Am = tl.load(A + (t[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], mask=mt[:, None], other=0.)
    acc += mm(Am.to(vv.dtype), vv, IEEE)
    tl.store(o + (t[:, None] * Hq + hq).to(tl.int64) * Dv + dv[None, :], (acc * scale).to(o.dtype.element_ty),
             mask=mt[:, None] & mv[None, :])
