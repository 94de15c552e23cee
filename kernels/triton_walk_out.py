"""The inference forward's state walk with the output pass folded in (Triton).

Without a backward to feed, the chunk states need not reach memory: a program that holds both
states' [Dk, BV] tiles (all of Dk, so that it can finish q h) computes each chunk's output from
them before carrying them over the chunk. Its operands come decayed from the scores pass
(`_scores_fwd` with EMIT): qe_i = q exp(c_i) and kd_i = k exp(c_i,end - c_i), rounded to q's
dtype as the unfused output pass and walk round them, so per chunk c and state i
    o   = scale (w_0 qe_1 S_1 + w_1 qe_2 S_2 + A v)
    S_i = exp(c_i,end) S_i + kd_i^T v
with exp(c_i,end) (the chunk's total decay, per Dk row) summed from the block cumsums' block
totals. What this saves against `_states_fwd` + `_output_fwd`: the chunk states' store and load
(2 x [chunks, Hkv, Dk, Dv]), and every gate read and exp of both.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_chunk_fwd import block_end_total, load_rows, load_state_pair, mm, walk_tile


@triton.jit
def chunk_decay(b_ptr, t0, eos, Hkv, hk, Dk: tl.constexpr, dk, mk, C: tl.constexpr, SUB: tl.constexpr):
    """exp(the chunk's total log decay) per Dk row, from its blocks' totals."""
    tot = block_end_total(b_ptr, 0, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
    for J in tl.static_range(1, C // SUB):
        tot += block_end_total(b_ptr, J, t0, eos, Hkv, hk, Dk, dk, mk, SUB)
    return tl.exp(tot)


@triton.jit
def _walk_out_fwd(qe1, qe2, kd1, kd2, v, b1, b2, w, A, o, s01, s02, sT1, sT2, cu, coff, scale,
                  Hq, Hkv, G: tl.constexpr, Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr,
                  SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, IEEE: tl.constexpr):
    # grid: (1, Dv blocks, sequences * kv heads); BK covers all of Dk
    hk, bos, eos, c0, nc, dk, dv, mk, mv, st, mst = walk_tile(cu, coff, Hkv, Dk, Dv, C, BK, BV)
    S1, S2 = load_state_pair(s01, s02, st, mst, HAS_S0, BK, BV)
    w0 = tl.load(w)
    w1 = tl.load(w + 1)
    cols = tl.arange(0, C)
    # each chunk's decays are loaded one chunk ahead: loaded in the chunk that uses them, the
    # state update waited on them (a quarter of the walk's stall samples under Nsight Compute);
    # past the sequence's last chunk every row is masked and the decays read exp(0)
    da = chunk_decay(b1, bos, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    db = chunk_decay(b2, bos, eos, Hkv, hk, Dk, dk, mk, C, SUB)
    for c in range(nc):
        t0 = bos + c * C
        da_next = chunk_decay(b1, t0 + C, eos, Hkv, hk, Dk, dk, mk, C, SUB)
        db_next = chunk_decay(b2, t0 + C, eos, Hkv, hk, Dk, dk, mk, C, SUB)
        t = t0 + tl.arange(0, C)
        mt = t < eos
        vv = load_rows(v, t, mt, Hkv, hk, Dv, dv, mv)
        S1h = S1.to(vv.dtype)
        S2h = S2.to(vv.dtype)
        for g in tl.static_range(G):
            hq = hk * G + g
            acc = w0 * mm(load_rows(qe1, t, mt, Hq, hq, Dk, dk, mk), S1h, IEEE)
            acc += w1 * mm(load_rows(qe2, t, mt, Hq, hq, Dk, dk, mk), S2h, IEEE)
            Am = tl.load(A + (t[:, None] * Hq + hq).to(tl.int64) * C + cols[None, :], mask=mt[:, None], other=0.)
            acc += mm(Am.to(vv.dtype), vv, IEEE)
            tl.store(o + (t[:, None] * Hq + hq).to(tl.int64) * Dv + dv[None, :],
                     (acc * scale).to(o.dtype.element_ty), mask=mt[:, None] & mv[None, :])
        S1 = S1 * da[:, None] + mm(tl.trans(load_rows(kd1, t, mt, Hkv, hk, Dk, dk, mk)), vv, IEEE)
        S2 = S2 * db[:, None] + mm(tl.trans(load_rows(kd2, t, mt, Hkv, hk, Dk, dk, mk)), vv, IEEE)
        da, db = da_next, db_next
    tl.store(sT1 + st, S1, mask=mst)
    tl.store(sT2 + st, S2, mask=mst)
